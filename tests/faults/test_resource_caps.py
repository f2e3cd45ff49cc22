"""Unbounded resources: grading workers are capped at the CPUs with a message, the predictor's memory grows
linearly with the table (a 10,000-row table used to ask for 83 GiB), and JSON nesting is bounded (see
test_json_lines.py)."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from nemo_quagmire.predict import regression
from nemo_quagmire.predict.regression import fit_feature_set, kendall_tau_b, rankdata
from nemo_quagmire.rewards.pool import usable_cpus
from tests.faults.conftest import GRADE_FIXTURES, load_script


@pytest.mark.parametrize("workers", ["1000", str(usable_cpus() + 1)])
def test_grade_refuses_more_workers_than_cpus_before_any_work(tmp_path, capsys, workers):
    grade = load_script("grade")
    start = time.monotonic()
    code = grade.main(
        [
            "--samples",
            str(GRADE_FIXTURES / "samples.jsonl"),
            "--benchmarks-dir",
            str(GRADE_FIXTURES / "benchmarks"),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            workers,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"--workers={workers}" in err and f"1..{usable_cpus()}" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert time.monotonic() - start < 5  # refused, not started


def test_evaluate_refuses_too_many_grader_workers(tmp_path, capsys):
    evaluate = load_script("evaluate")
    code = evaluate.main(
        ["--regrade", str(tmp_path), "--out", str(tmp_path / "out"), "--grader-workers", "1000"]
    )
    assert code == 2 and "--grader-workers=1000" in capsys.readouterr().err


def test_bootstrap_memory_is_linear_in_rows():
    """1,000 labelled rows x 40 resamples: the all-pairs Kendall signs alone took 2 x 40 x 1,000^2 x 8 B =
    640 MB before (83 GiB at 10,000 rows x 2,000 resamples); now chunks and sorting bound it."""
    rng = np.random.default_rng(0)
    x = rng.random((1000, 2))
    y = x @ np.array([0.5, -0.2]) + 0.05 * rng.random(1000)
    tracemalloc.start()
    try:
        fit = fit_feature_set(x, y, ["a", "b"], resamples=40, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 300 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert fit.resamples_used == 40 and fit.r2 > 0.9


def test_sorting_ranks_and_tau_equal_the_all_pairs_ones(monkeypatch):
    """The large-input paths (sorting, scipy's O(n log n) tau) agree with the all-pairs formulas."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 7, size=(3, 40)).astype(float)  # many ties
    b = rng.integers(0, 5, size=(3, 40)).astype(float)
    all_pairs = rankdata(a), kendall_tau_b(a, b)
    monkeypatch.setattr(regression, "PAIRWISE_MAX_ELEMENTS", 10)  # every input is "large" now
    np.testing.assert_array_equal(rankdata(a), all_pairs[0])
    np.testing.assert_allclose(kendall_tau_b(a, b), all_pairs[1], atol=1e-12)
