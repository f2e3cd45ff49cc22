"""What a finished study says: the ranking, the proxies side by side, seed noise, and a consistency check.

Why here and not in the report: the predictor report (`scripts/predict_report.py`) answers "which proxy
predicts the post-RL score, and how well" for any table. A study knows more: which runs are seeds of one
variant. So it can also say whether the post-RL differences between variants stand out from seed noise —
the question to ask before trusting any proxy at this scale — and it checks that every artefact exists and
agrees with the runs' own metrics (`verify_study`, what `--quick` asserts in CI).

Everything is read from the study directory (the report's fit.json, predictions.csv and table.csv, the
runs' metrics.jsonl and run_info.json); nothing is typed in.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nemo_quagmire.predict.analysis import analyze, fit_records, label, pass_at_k_of
from nemo_quagmire.predict.regression import spearman
from nemo_quagmire.predict.report import k_curve_png
from nemo_quagmire.predict.runs import RUN_INFO_FILE, resolve_checkpoint, validation_records
from nemo_quagmire.predict.table import Table, read_table
from nemo_quagmire.study.plan import Job, StudyConfig
from nemo_quagmire.study.runner import is_done
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import get_logger

__all__ = [
    "MAIN_PLOT",
    "StudySummary",
    "ranking_lines",
    "summarize_study",
    "verify_study",
]

logger = get_logger(__name__)

TARGET = "post_rl_pass@1"
MAIN_PLOT = "k_curve.png"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
_ROW_ID = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)@(?P<step>\d+)$")


@dataclass(frozen=True)
class StudySummary:
    """The study's answer; `as_json()` is summary.json."""

    report_dir: Path
    best: dict[str, Any]  # fit.json record of the best feature set
    proxies: list[dict[str, Any]]  # fit.json records of SFT pass@1, pass@<max k>, held-out loss, both
    variants: list[dict[str, Any]]  # per variant: mean and std over seeds of target and proxies
    noise: dict[str, Any]  # between-variant spread against seed noise of the target
    per_seed_spearman: dict[str, list[float]]  # proxy -> Spearman with the target within each seed
    same_data_proxies: list[
        dict[str, Any]
    ]  # the proxies' fits over the variants of one SFT data distribution

    def as_json(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "proxies": self.proxies,
            "variants": self.variants,
            "noise": self.noise,
            "per_seed_spearman": self.per_seed_spearman,
            "same_data_proxies": self.same_data_proxies,
        }


def _proxy_names(fits: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    features = {f for fit in fits for f in fit["features"]}
    ks = sorted(k for f in features if (k := pass_at_k_of(f)) is not None)
    sets: list[tuple[str, ...]] = [("pass@1",), (f"pass@{ks[-1]}",), ("heldout_loss",)]
    sets.append(("heldout_loss", f"pass@{ks[-1]}"))
    return [s for s in sets if any(tuple(fit["features"]) == s for fit in fits)]


def _nan_to_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def summarize_study(study_dir: Path, cfg: StudyConfig) -> StudySummary:
    """Read the report of `study_dir`, write summary.json, summary.md and the main plot next to it.

    Raises:
        OSError, ValueError: the report is missing or malformed (run the study first).
    """
    report_dir = study_dir / "report"
    fits = json.loads((report_dir / "fit.json").read_text(encoding="utf-8"))
    table = read_table(report_dir / "table.csv", TARGET)
    by_set = {tuple(fit["features"]): fit for fit in fits}
    proxies = [by_set[s] for s in _proxy_names(fits)]

    rows = [_ROW_ID.match(run_id) for run_id in table.ids]
    variants_of = [m.group("variant") if m else run_id for m, run_id in zip(rows, table.ids, strict=True)]
    seeds_of = [int(m.group("seed")) if m else 0 for m in rows]
    target = np.asarray(table.target, dtype=float)  # [N]
    features = sorted({f for s in _proxy_names(fits) for f in s})
    variant_rows = []
    for variant in cfg.variants:
        idx = [i for i, v in enumerate(variants_of) if v == variant.name]
        if not idx:
            continue
        record: dict[str, Any] = {"variant": variant.name, "contrast": variant.contrast, "seeds": len(idx)}
        for name, values in [(TARGET, target), *((f, np.asarray(table.columns[f])) for f in features)]:
            picked = values[idx]
            record[name] = float(picked.mean())
            record[f"{name}_std"] = float(picked.std(ddof=1)) if len(idx) > 1 else None
        variant_rows.append(record)
    variant_rows.sort(key=lambda r: -r[TARGET])

    means = np.array([r[TARGET] for r in variant_rows])
    stds = [r[f"{TARGET}_std"] for r in variant_rows if r[f"{TARGET}_std"] is not None]
    seed_std = float(np.sqrt(np.mean(np.square(stds)))) if stds else None
    noise = {
        "between_variants_std": float(means.std(ddof=1)) if len(means) > 1 else None,
        "within_variant_seed_std": seed_std,
        "ratio": float(means.std(ddof=1) / seed_std) if seed_std else None,
        "spearman_of_variant_means": {
            label(s): _nan_to_none(
                spearman(np.array([r[s[0]] for r in variant_rows]), means) if len(s) == 1 else math.nan
            )
            for s in _proxy_names(fits)
        },
    }
    per_seed: dict[str, list[float]] = {}
    for feature in features:
        values = np.asarray(table.columns[feature])
        per_seed[feature] = []
        for seed in sorted(set(seeds_of)):
            idx = [i for i, s in enumerate(seeds_of) if s == seed]
            rho = spearman(values[idx], target[idx]) if len(idx) > 2 else math.nan
            per_seed[feature].append(_nan_to_none(rho))
    # The paper compares held-out loss across runs on the same SFT data (other epochs, sizes), not across data
    # sets: the same fits over the variants that are not short-only.
    short = {v.name for v in cfg.variants if v.short_only}
    same = [i for i, v in enumerate(variants_of) if v not in short]
    same_data: list[dict[str, Any]] = []
    if short and len(same) >= 3:
        subset = Table(
            ids=tuple(table.ids[i] for i in same),
            columns={f: tuple(table.columns[f][i] for i in same) for f in features},
            target_name=table.target_name,
            target=tuple(table.target[i] for i in same),
            source=f"{table.source}, without the short-only variants",
        )
        try:
            analysis = analyze(subset, _proxy_names(fits), resamples=cfg.report_bootstrap, seed=0)
        except ValueError as err:  # e.g. the subset's post-RL scores are all equal: nothing to rank
            logger.warning("no fits over the variants of one SFT data distribution: %s", err)
        else:
            order = _proxy_names(fits)
            same_data = sorted(fit_records(analysis), key=lambda r: order.index(tuple(r["features"])))
    summary = StudySummary(report_dir, fits[0], proxies, variant_rows, noise, per_seed, same_data)

    with atomic_write(report_dir / SUMMARY_JSON) as handle:
        json.dump(summary.as_json(), handle, indent=2)
    with atomic_write(report_dir / SUMMARY_MD) as handle:
        handle.write(summary_markdown(summary) + "\n")
    analysis = analyze(table, resamples=cfg.report_bootstrap, seed=0)
    plot = k_curve_png(analysis)
    if plot is not None:
        with atomic_write(report_dir / MAIN_PLOT, "wb", encoding=None) as handle:
            handle.write(base64.b64decode(plot))
    return summary


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _with_interval(fit: dict[str, Any], key: str) -> str:
    low, high = fit["intervals"].get(key, [None, None])
    return f"{_fmt(fit[key])} [{_fmt(low)}, {_fmt(high)}]"


def _proxy_table(fits: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| proxy (pre-RL) | sign | Spearman | Kendall | R² | LOO R² |", "|---|---|---|---|---|---|"]
    for fit in fits:
        signs = "".join("+" if (fit["feature_spearman"][f] or 0) >= 0 else "−" for f in fit["features"])
        lines.append(
            f"| {label(fit['features'])} | {signs} | {_with_interval(fit, 'spearman')} | "
            f"{_with_interval(fit, 'kendall')} | {_with_interval(fit, 'r2')} | {_fmt(fit['r2_loo'])} |"
        )
    return lines


def _feature_keys(summary: StudySummary) -> list[str]:
    """The proxies' columns of the per-variant table: pass@k by k, then the held-out loss."""
    keys = [k for k in summary.variants[0] if pass_at_k_of(k) is not None or k == "heldout_loss"]
    return sorted(keys, key=lambda k: (pass_at_k_of(k) is None, pass_at_k_of(k) or 0))


def _mean_std(row: dict[str, Any], key: str) -> str:
    std = row[f"{key}_std"]
    return f"{_fmt(row[key], 3)}" + ("" if std is None else f" ± {_fmt(std, 3)}")


def summary_markdown(summary: StudySummary) -> str:
    """The study's tables in Markdown (summary.md; the README's result section quotes it)."""
    n = summary.best["n"]
    level = int(round(100 * summary.best["level"]))
    lines = [
        f"Proxies of post-RL pass@1 over {n} SFT checkpoints ({level}% bootstrap intervals, "
        f"{summary.best['bootstrap']['used']} resamples; Spearman/Kendall of the fitted line, i.e. the "
        "proxy's own rank order up to its sign):",
        "",
        *_proxy_table(summary.proxies),
    ]
    if summary.same_data_proxies:
        lines += [
            "",
            f"The same over the {summary.same_data_proxies[0]['n']} checkpoints trained on one SFT data "
            "distribution (the short-only variants left out: the paper compares held-out loss within one):",
            "",
            *_proxy_table(summary.same_data_proxies),
        ]
    lines += [
        "",
        f"Best feature set (highest LOO R²): {label(summary.best['features'])}.",
        "",
        "| variant | what it stands for | seeds | post-RL pass@1 | "
        + " | ".join(label([f]) for f in _feature_keys(summary))
        + " |",
        "|---|---|---|---|" + "---|" * len(_feature_keys(summary)),
    ]
    for row in summary.variants:
        cells = [_mean_std(row, f) for f in (TARGET, *_feature_keys(summary))]
        lines.append(f"| {row['variant']} | {row['contrast']} | {row['seeds']} | " + " | ".join(cells) + " |")
    noise = summary.noise
    lines += [
        "",
        "(mean ± standard deviation over seeds.) Post-RL pass@1: spread of the variant means "
        f"{_fmt(noise['between_variants_std'], 3)} (std) against seed noise "
        f"{_fmt(noise['within_variant_seed_std'], 3)} (pooled within-variant std); "
        f"ratio {_fmt(noise['ratio'])}.",
        "Spearman of the variant means (over seeds) with post-RL pass@1: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in noise["spearman_of_variant_means"].items() if v is not None)
        + ".",
        "Spearman within each seed: "
        + "; ".join(
            f"{f}: " + ", ".join(_fmt(v) for v in values) for f, values in summary.per_seed_spearman.items()
        )
        + ".",
    ]
    return "\n".join(lines)


def ranking_lines(report_dir: Path) -> list[str]:
    """The SFT checkpoints ranked by the best proxy's prediction of post-RL pass@1, with the actual value."""
    rows = list(csv.DictReader((report_dir / "predictions.csv").open(encoding="utf-8")))
    table = {r["run"]: r for r in csv.DictReader((report_dir / "table.csv").open(encoding="utf-8"))}
    lines = [f"{'rank':>4}  {'SFT checkpoint':<24} {'predicted':>9} {'actual':>7}  {'SFT pass@1':>10}"]
    for row in rows:
        actual = float(row[TARGET]) if row.get(TARGET) else math.nan
        sft_pass1 = float(table[row["run"]]["pass@1"])
        lines.append(
            f"{row['rank']:>4}  {row['run']:<24} {float(row['predicted']):>9.3f} {actual:>7.3f}  "
            f"{sft_pass1:>10.3f}"
        )
    return lines


def verify_study(study_dir: Path, cfg: StudyConfig, jobs: Sequence[Job]) -> list[str]:
    """Every artefact of the finished `jobs` exists and agrees with the runs' own metrics; the problems found.

    Checked for each GRPO job and the SFT job it starts from: the SFT run validated pass@1 ... pass@<samples>
    and the held-out loss at its last step, only there, and saved that checkpoint; the GRPO run links to that
    checkpoint (run_info.json) and validated at its last step only; the report's table has one row per SFT
    run with exactly those numbers; fit.json covers every row; predictions.csv ranks every row; every job has
    a done marker; report.html, the summary and the main plot exist.
    """
    problems: list[str] = []
    study_dir = study_dir.resolve()
    report_dir = study_dir / "report"
    for name in (
        "fit.json",
        "predictions.csv",
        "report.html",
        "table.csv",
        SUMMARY_JSON,
        SUMMARY_MD,
        MAIN_PLOT,
    ):
        if not (report_dir / name).is_file():
            problems.append(f"missing {report_dir / name}")
    if problems:
        return problems
    table = read_table(report_dir / "table.csv", TARGET)
    rows = dict(zip(table.ids, range(len(table.ids)), strict=True))
    expected_ks = [2**i for i in range(int(math.log2(cfg.samples)) + 1)]
    by_name = {job.name: job for job in jobs}
    pairs = [(by_name[job.after[0]], job) for job in jobs if job.kind == "grpo"]
    for sft_job, grpo_job in pairs:
        sft_dir, grpo_dir = sft_job.run_dir, grpo_job.run_dir
        (load_from,) = [a.split("=", 1)[1] for a in grpo_job.argv if a.startswith("checkpoint.load_from=")]
        checkpoint = Path(load_from)  # the SFT run's last checkpoint, as planned
        steps = int(checkpoint.name.removeprefix("step_"))
        if not (checkpoint / "checkpoint_meta.json").is_file():
            problems.append(f"missing SFT checkpoint {checkpoint}")
        sft_val = validation_records(sft_dir)
        if list(sft_val) != [steps]:
            problems.append(f"{sft_dir}: validated at steps {list(sft_val)}, expected only [{steps}]")
            continue
        record = sft_val[steps]
        missing = [k for k in expected_ks if f"val/macro/pass@{k}" not in record]
        if missing or "val/heldout_loss/token_mean" not in record:
            problems.append(f"{sft_dir}: lacks pass@{missing} or the held-out loss at step {steps}")
            continue
        info = json.loads((grpo_dir / RUN_INFO_FILE).read_text(encoding="utf-8"))
        if resolve_checkpoint(info["init_from"], grpo_dir) != (sft_dir, steps):
            problems.append(f"{grpo_dir}: starts from {info['init_from']}, not {checkpoint}")
        grpo_val = validation_records(grpo_dir)
        if list(grpo_val) != [cfg.grpo_steps]:
            problems.append(f"{grpo_dir}: validated at steps {list(grpo_val)}, expected [{cfg.grpo_steps}]")
            continue
        row_id = f"{sft_dir.name}@{steps}"
        if row_id not in rows:
            problems.append(f"report/table.csv has no row {row_id}")
            continue
        i = rows[row_id]
        pairs_to_check = [(TARGET, table.target[i], grpo_val[cfg.grpo_steps]["val/macro/pass@1"])]
        pairs_to_check += [
            (f"pass@{k}", table.columns[f"pass@{k}"][i], record[f"val/macro/pass@{k}"]) for k in expected_ks
        ]
        pairs_to_check.append(
            ("heldout_loss", table.columns["heldout_loss"][i], record["val/heldout_loss/token_mean"])
        )
        for column, in_table, in_run in pairs_to_check:
            if not math.isclose(in_table, in_run, rel_tol=1e-5, abs_tol=1e-6):
                problems.append(f"table.csv {row_id} {column} = {in_table}, but the run logged {in_run}")
    if len(table.ids) != len(pairs):
        problems.append(f"table.csv has {len(table.ids)} rows, expected {len(pairs)}")
    fits = json.loads((report_dir / "fit.json").read_text(encoding="utf-8"))
    problems += [
        f"fit.json {f['features']}: n = {f['n']}, expected {len(pairs)}" for f in fits if f["n"] != len(pairs)
    ]
    predicted = [r["run"] for r in csv.DictReader((report_dir / "predictions.csv").open(encoding="utf-8"))]
    if sorted(predicted) != sorted(table.ids):
        problems.append(f"predictions.csv ranks {sorted(predicted)}, the table has {sorted(table.ids)}")
    if unmarked := [job.name for job in jobs if not is_done(study_dir, job)]:
        problems.append(f"not marked done: {unmarked}")
    return problems
