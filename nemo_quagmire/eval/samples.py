"""Graded samples on disk: one parquet row per completion, enough to re-grade it or recompute any metric.

Why keep every sample: pass@k at large k is read from hundreds of completions per problem, and a grader
fix, a new extraction rule or another metric (maj@k, per-difficulty slices) must not need the model again.
Each row therefore carries the completion text and the gold answer beside the verdict; `regrade_samples`
re-grades records with the current grader, and `summarize` recomputes the report and the logged metrics
(`val/<bench>/...`, `val/macro/...`) from the verdicts. An evaluation directory holds `report.json` and the
samples: `samples.parquet`, or with several data-parallel ranks one part per rank,
`samples.rank-XXXXX-of-YYYYY.parquet` (each rank writes the completions it generated, so no rank ever holds
all of them); `read_samples` reads either a file or a directory's parts.

Columns (`SAMPLE_COLUMNS`): benchmark, id, sample (index among the problem's n samples), completion, gold,
extracted (null without a final answer), correct, reason (correct / wrong / no_answer / timeout / error),
length (completion tokens), truncated (cut at the token budget). Files are written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nemo_quagmire.eval.grading import GradedSample, compute_metrics
from nemo_quagmire.utils.io import atomic_write

__all__ = [
    "REPORT_FILE",
    "SAMPLES_FILE",
    "SAMPLE_COLUMNS",
    "SampleRecord",
    "read_samples",
    "regrade_samples",
    "samples_file",
    "summarize",
    "write_report",
    "write_samples",
]

SAMPLES_FILE = "samples.parquet"
REPORT_FILE = "report.json"

SAMPLE_COLUMNS = (
    "benchmark",
    "id",
    "sample",
    "completion",
    "gold",
    "extracted",
    "correct",
    "reason",
    "length",
    "truncated",
)


@dataclass(frozen=True)
class SampleRecord:
    """One graded completion (the file's columns, `problem_id` stored as `id`, `sample_index` as `sample`)."""

    benchmark: str
    problem_id: str
    sample_index: int
    completion: str
    gold: str
    extracted: str | None
    correct: bool
    reason: str
    length: int
    truncated: bool


def write_samples(path: str | os.PathLike, records: Sequence[SampleRecord]) -> Path:
    """Write `records` as one parquet file (atomically: a crash leaves the previous file or none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list[Any]] = {
        "benchmark": [r.benchmark for r in records],
        "id": [r.problem_id for r in records],
        "sample": [r.sample_index for r in records],
        "completion": [r.completion for r in records],
        "gold": [r.gold for r in records],
        "extracted": [r.extracted for r in records],
        "correct": [r.correct for r in records],
        "reason": [r.reason for r in records],
        "length": [r.length for r in records],
        "truncated": [r.truncated for r in records],
    }
    schema = pa.schema(
        [
            ("benchmark", pa.string()),
            ("id", pa.string()),
            ("sample", pa.int32()),
            ("completion", pa.string()),
            ("gold", pa.string()),
            ("extracted", pa.string()),
            ("correct", pa.bool_()),
            ("reason", pa.string()),
            ("length", pa.int32()),
            ("truncated", pa.bool_()),
        ]
    )
    table = pa.table(columns, schema=schema)
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        pq.write_table(table, handle)
    return path


def samples_file(out_dir: str | os.PathLike, rank: int = 0, size: int = 1) -> Path:
    """Where data-parallel rank `rank` of `size` writes its samples in an evaluation directory."""
    name = SAMPLES_FILE if size == 1 else f"samples.rank-{rank:05d}-of-{size:05d}.parquet"
    return Path(out_dir) / name


def read_samples(path: str | os.PathLike) -> list[SampleRecord]:
    """The records of a samples file, or of every samples file of an evaluation directory (in name order).

    Raises:
        ValueError: a file lacks some of `SAMPLE_COLUMNS` (named).
        FileNotFoundError: the path does not exist, or the directory holds no samples file.
    """
    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("samples*.parquet"))
        if not parts:
            raise FileNotFoundError(f"{path} holds no samples*.parquet")
        return [record for part in parts for record in read_samples(part)]
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if missing := [c for c in SAMPLE_COLUMNS if c not in table.column_names]:
        raise ValueError(f"{path}: not a samples file of this project, missing columns {missing}")
    rows = table.to_pydict()
    return [
        SampleRecord(
            benchmark=rows["benchmark"][i],
            problem_id=rows["id"][i],
            sample_index=rows["sample"][i],
            completion=rows["completion"][i],
            gold=rows["gold"][i],
            extracted=rows["extracted"][i],
            correct=rows["correct"][i],
            reason=rows["reason"][i],
            length=rows["length"][i],
            truncated=rows["truncated"][i],
        )
        for i in range(table.num_rows)
    ]


def regrade_samples(records: Sequence[SampleRecord], grader: Any) -> list[SampleRecord]:
    """The records with `extracted`, `correct` and `reason` recomputed by `grader` (a `MathGrader`)."""
    results = grader.grade(
        [r.gold for r in records],
        [r.completion for r in records],
        problem_keys=[(r.benchmark, r.problem_id) for r in records],
    )
    return [
        replace(record, extracted=result.extracted, correct=result.correct, reason=result.reason)
        for record, result in zip(records, results, strict=True)
    ]


def summarize(
    records: Sequence[SampleRecord], ks: Sequence[int] | None = None
) -> tuple[dict, dict[str, float]]:
    """The pass@k report of graded records and the metrics a validation logs from it.

    Args:
        records: graded samples of any benchmarks, in any order.
        ks: ks of pass@k and maj@k; None = powers of two up to the smallest n.

    Returns:
        `(report, metrics)`: the report of `nemo_quagmire.eval.grading.compute_metrics` with each benchmark's
        mean completion length in tokens added as `response_length`; and the flat metrics
        `val/<bench>/<metric>` and `val/macro/<metric>` (macro = unweighted mean over benchmarks).
    """
    samples = [GradedSample(r.benchmark, r.problem_id, r.correct, r.extracted) for r in records]
    report = compute_metrics(samples, ks)
    totals: dict[str, list[int]] = {}
    for record in records:
        total = totals.setdefault(record.benchmark, [0, 0])
        total[0] += record.length
        total[1] += 1
    metrics: dict[str, float] = {}
    for name, values in report["per_benchmark"].items():
        metrics |= {f"val/{name}/{k}": v for k, v in values.items() if isinstance(v, float)}
        values["response_length"] = totals[name][0] / totals[name][1]
        metrics[f"val/{name}/response_length"] = values["response_length"]
    metrics |= {f"val/macro/{k}": v for k, v in report["macro"].items()}
    lengths = [values["response_length"] for values in report["per_benchmark"].values()]
    report["macro"]["response_length"] = metrics["val/macro/response_length"] = sum(lengths) / len(lengths)
    return report, metrics


def write_report(out_dir: str | os.PathLike, step: int, report: dict) -> Path:
    """Write `report.json` (`{"step", "per_benchmark", "macro"}`) into `out_dir`, atomically."""
    path = Path(out_dir) / REPORT_FILE
    with atomic_write(path) as handle:
        json.dump({"step": step, **report}, handle, indent=2)
    return path
