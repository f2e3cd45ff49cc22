"""The study summary on a hand-made report: per-variant means and seed spread, the spread of variant means
against seed noise, Spearman within seeds — checked against direct numpy/scipy computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from nemo_quagmire.predict.analysis import analyze, fit_records
from nemo_quagmire.predict.table import read_table
from nemo_quagmire.study.plan import STUDY_CONF_DIR, load_study_config
from nemo_quagmire.study.results import MAIN_PLOT, SUMMARY_MD, ranking_lines, summarize_study

POST = {
    "full-1ep": (0.30, 0.34),
    "half-2ep": (0.40, 0.36),
    "half-1ep": (0.10, 0.16),
    "short-1ep": (0.20, 0.18),
}
PASS1 = {
    "full-1ep": (0.10, 0.12),
    "half-2ep": (0.15, 0.11),
    "half-1ep": (0.02, 0.05),
    "short-1ep": (0.30, 0.26),
}


def _make_study(tmp_path, post):
    rows = ["run,pass@1,pass@2,heldout_loss,post_rl_pass@1"]
    for variant, targets in post.items():
        for seed, target in enumerate(targets):
            p1 = PASS1[variant][seed]
            loss = 1.0 - target + 0.01 * seed
            rows.append(f"{variant}-s{seed}@100,{p1},{min(1.0, 2.5 * p1)},{loss},{target}")
    report = tmp_path / "report"
    report.mkdir()
    (report / "table.csv").write_text("\n".join(rows) + "\n")
    analysis = analyze(read_table(report / "table.csv", "post_rl_pass@1"), resamples=100, seed=0)
    (report / "fit.json").write_text(json.dumps(fit_records(analysis)))
    (report / "predictions.csv").write_text(
        "rank,candidate_rank,run,status,post_rl_pass@1,predicted\n"
        + "".join(
            f"{i + 1},,{r.split(',')[0]},labelled,{r.split(',')[-1]},0.5\n" for i, r in enumerate(rows[1:])
        )
    )
    cfg = load_study_config(STUDY_CONF_DIR / "quick.yaml", {"seeds": 2, "report_bootstrap": 100})
    return tmp_path, cfg


@pytest.fixture()
def study(tmp_path):
    return _make_study(tmp_path, POST)


def test_variant_means_seed_noise_and_within_seed_ranks(study):
    study_dir, cfg = study
    summary = summarize_study(study_dir, cfg)
    by_variant = {r["variant"]: r for r in summary.variants}
    assert [r["variant"] for r in summary.variants] == ["half-2ep", "full-1ep", "short-1ep", "half-1ep"]
    for variant, targets in POST.items():
        assert by_variant[variant]["post_rl_pass@1"] == pytest.approx(np.mean(targets))
        assert by_variant[variant]["post_rl_pass@1_std"] == pytest.approx(np.std(targets, ddof=1))
        assert by_variant[variant]["pass@1"] == pytest.approx(np.mean(PASS1[variant]))
    means = [np.mean(t) for t in POST.values()]
    seed_std = np.sqrt(np.mean([np.var(t, ddof=1) for t in POST.values()]))
    assert summary.noise["between_variants_std"] == pytest.approx(np.std(means, ddof=1))
    assert summary.noise["within_variant_seed_std"] == pytest.approx(seed_std)
    assert summary.noise["ratio"] == pytest.approx(np.std(means, ddof=1) / seed_std)
    pass1_means = [np.mean(PASS1[v]) for v in POST]
    expected = stats.spearmanr(pass1_means, means).statistic
    assert summary.noise["spearman_of_variant_means"]["pre-RL pass@1"] == pytest.approx(expected)
    for seed in (0, 1):
        expected = stats.spearmanr([PASS1[v][seed] for v in POST], [POST[v][seed] for v in POST]).statistic
        assert summary.per_seed_spearman["pass@1"][seed] == pytest.approx(expected)
    assert [tuple(p["features"]) for p in summary.proxies] == [
        ("pass@1",),
        ("pass@2",),
        ("heldout_loss",),
        ("heldout_loss", "pass@2"),
    ]
    same = [v for v in POST if v != "short-1ep"]  # quick.yaml's short-only variant left out
    (loss_fit,) = [f for f in summary.same_data_proxies if f["features"] == ["heldout_loss"]]
    losses = [1.0 - t + 0.01 * seed for v in same for seed, t in enumerate(POST[v])]
    targets = [t for v in same for t in POST[v]]
    assert loss_fit["n"] == 6
    assert loss_fit["feature_spearman"]["heldout_loss"] == pytest.approx(
        stats.spearmanr(losses, targets).statistic
    )
    md = (study_dir / "report" / SUMMARY_MD).read_text()
    assert "| half-2ep |" in md and "seed noise" in md
    assert (study_dir / "report" / MAIN_PLOT).read_bytes().startswith(b"\x89PNG")
    assert json.loads((study_dir / "report" / "summary.json").read_text())["noise"] == summary.noise


def test_ranking_lists_every_checkpoint_with_its_sft_score(study):
    study_dir, _ = study
    lines = ranking_lines(study_dir / "report")
    assert len(lines) == 1 + 2 * len(POST)
    assert lines[1].split()[:2] == ["1", "full-1ep-s0@100"] and lines[1].split()[-1] == "0.100"


def test_equal_scores_within_one_data_distribution_leave_only_the_pooled_fits(tmp_path, caplog):
    flat = {v: ((0.2, 0.2) if v != "short-1ep" else t) for v, t in POST.items()}
    study_dir, cfg = _make_study(tmp_path, flat)
    summary = summarize_study(study_dir, cfg)
    assert summary.same_data_proxies == [] and summary.proxies
    assert "no fits over the variants of one SFT data distribution" in caplog.text
    assert "trained on one SFT data distribution" not in (study_dir / "report" / SUMMARY_MD).read_text()
