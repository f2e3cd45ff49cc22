"""The study plan: the shipped plans validate, every job's command is a valid run config of its entry script
(composed and validated exactly as the script would, without training), and the variants are the paper's
contrasts."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from nemo_quagmire.data.synthetic import generate_splits
from nemo_quagmire.study.plan import STUDY_CONF_DIR, StudyConfig, load_study_config, plan_jobs
from nemo_quagmire.trainer.entry import compose_run_config, compose_sft_config

PLANS = sorted(p.name for p in STUDY_CONF_DIR.glob("*.yaml"))


def _overrides(job) -> list[str]:
    return list(job.argv[2:])  # after the interpreter and the script


@pytest.mark.parametrize("plan", PLANS)
def test_every_job_is_a_valid_run_of_its_entry_script(plan, tmp_path):
    cfg = load_study_config(STUDY_CONF_DIR / plan)
    jobs = plan_jobs(cfg, tmp_path)
    assert len(jobs) == 2 * len(cfg.variants) * cfg.seeds + 1
    names = {job.name for job in jobs}
    for job in jobs:
        assert set(job.after) <= names and job.run_dir.is_relative_to(tmp_path)
        assert Path(job.argv[1]).is_file()
    sft = {job.name: compose_sft_config("tiny", _overrides(job)) for job in jobs if job.kind == "sft"}
    for job in (j for j in jobs if j.kind == "grpo"):
        run = compose_run_config("tiny", _overrides(job))
        (parent,) = job.after
        sft_run = sft[parent]
        steps = sft_run.data.num_sft // sft_run.sft.global_batch_size * sft_run.sft.epochs
        assert run.checkpoint.load_from == f"{sft_run.run_dir}/checkpoints/step_{steps:08d}"
        assert run.sft_warmup.steps == 0 and run.max_steps == cfg.grpo_steps
        # Before and after RL on the same held-out problems, with the same pass@k budget.
        for key in ("num_problems", "num_samples", "max_new_tokens"):
            grpo_value = (
                run.validation_max_new_tokens if key == "max_new_tokens" else getattr(run.validation, key)
            )
            assert getattr(sft_run.validation, key) == grpo_value, key
        assert not run.validation.at_start and not sft_run.validation.at_start
        a = generate_splits(run.data.synthetic, seed=run.seed, num_sft=1, num_rl=1, num_heldout=cfg.problems)
        b = generate_splits(
            sft_run.data.synthetic, seed=sft_run.seed, num_sft=1, num_rl=1, num_heldout=cfg.problems
        )
        assert a.heldout == b.heldout
    report = jobs[-1]
    assert report.kind == "report" and set(report.after) == {j.name for j in jobs if j.kind == "grpo"}


def test_the_default_plan_has_the_papers_contrasts():
    cfg = load_study_config(STUDY_CONF_DIR / "tiny.yaml")
    assert len(cfg.variants) >= 8 and cfg.samples >= 64
    by_name = {v.name: v for v in cfg.variants}
    compute = {n: v.data * v.epochs for n, v in by_name.items()}
    assert compute["full-1ep"] == compute["half-2ep"]  # unique x 1 against half x 2, same compute
    assert by_name["half-4ep"].epochs > by_name["half-2ep"].epochs  # more epochs on the same data
    assert compute["half-1ep"] < compute["full-1ep"]  # less data
    assert any(v.short_only for v in cfg.variants) and any(not v.short_only for v in cfg.variants)


def test_seeds_share_the_data_and_change_the_training(tmp_path):
    cfg = load_study_config(STUDY_CONF_DIR / "quick.yaml", {"seeds": 2})
    jobs = [j for j in plan_jobs(cfg, tmp_path) if j.kind == "sft" and j.name.startswith("sft/full-1ep")]
    runs = [compose_sft_config("tiny", _overrides(j)) for j in jobs]
    assert [r.seed for r in runs] == [0, 1]
    assert runs[0].data == runs[1].data
    assert [j.seed for j in plan_jobs(cfg, tmp_path)][:-1] == sorted(
        j.seed for j in plan_jobs(cfg, tmp_path)[:-1]
    )


def test_select_keeps_the_named_variants_in_order():
    cfg = load_study_config(STUDY_CONF_DIR / "tiny.yaml")
    assert [v.name for v in cfg.select(["short-1ep", "full-1ep", "half-2ep"]).variants] == [
        "short-1ep",
        "full-1ep",
        "half-2ep",
    ]
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['nope'\]; this plan has \['full-1ep'"):
        cfg.select(["full-1ep", "half-2ep", "nope"])
    with pytest.raises(ValidationError, match="at least 3"):
        cfg.select(["full-1ep", "half-2ep"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"samples": 1}, "greater than or equal to 2"),
        ({"problems": 300}, "heldout_examples=256 < problems=300"),
        ({"short_max_digits": 5}, r"short_max_digits=5 must lie in \[min_digits, max_digits\]"),
        ({"sft_steps": 2}, "under one batch"),
        ({"epochs": 3}, "Extra inputs are not permitted"),
    ],
)
def test_bad_plans_are_rejected_naming_the_key(change, message):
    raw = load_study_config(STUDY_CONF_DIR / "tiny.yaml").model_dump()
    with pytest.raises(ValidationError, match=message):
        StudyConfig.model_validate({**raw, **change})


def test_duplicate_variant_names_are_rejected():
    raw = load_study_config(STUDY_CONF_DIR / "tiny.yaml").model_dump()
    raw["variants"][1]["name"] = raw["variants"][0]["name"]
    with pytest.raises(ValidationError, match="variant names must be unique"):
        StudyConfig.model_validate(raw)
