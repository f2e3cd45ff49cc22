"""nemo_quagmire.predict.analysis: feature sets, validation, choice of the best set, ranks and the summary."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from nemo_quagmire.predict.analysis import (
    analyze,
    default_feature_sets,
    fit_records,
    label,
    parse_feature_sets,
    prediction_rows,
    summarize,
)
from nemo_quagmire.predict.table import PredictInputError, Table, read_table

EXAMPLE = Path(__file__).resolve().parents[2] / "scripts" / "examples" / "predict" / "checkpoints.csv"
NAN = math.nan


def _table(columns: dict[str, list[float]], target: list[float]) -> Table:
    ids = tuple(f"ckpt-{i}" for i in range(len(target)))
    return Table(ids, {k: tuple(v) for k, v in columns.items()}, "post", tuple(target), "test table")


def test_default_feature_sets_are_singles_plus_loss_with_the_largest_k():
    assert default_feature_sets(["pass@1", "pass@64", "pass@8", "heldout_loss"]) == [
        ("pass@1",), ("pass@64",), ("pass@8",), ("heldout_loss",), ("heldout_loss", "pass@64"),
    ]  # fmt: skip
    assert default_feature_sets(["pass@1", "other"]) == [("pass@1",), ("other",)]


def test_parse_feature_sets():
    assert parse_feature_sets("pass@1, heldout_loss+pass@64") == [("pass@1",), ("heldout_loss", "pass@64")]
    for bad in ("pass@1,,x", "a+", "a,b+a,a+b", "a+a"):
        with pytest.raises(PredictInputError, match="bad feature list"):
            parse_feature_sets(bad)


def test_label_reads_like_the_paper():
    assert label(("heldout_loss", "pass@64")) == "held-out loss + pre-RL pass@64"


def test_best_set_has_the_highest_loo_r2_and_ties_go_to_fewer_features():
    # y is exactly linear in x: x alone and x + z both fit perfectly (LOO R^2 = 1), so the single wins the tie
    x = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 2.5]
    z = [1.0, 0.0, 3.0, 1.0, 2.0, 0.5, 0.0]
    y = [2 * v + 1 for v in x[:6]] + [NAN]
    analysis = analyze(_table({"z": z, "x": x}, y), [("x", "z"), ("z",), ("x",)], resamples=20)
    assert [f.features for f in analysis.fits] == [("x",), ("x", "z"), ("z",)]
    assert analysis.best.r2_loo == pytest.approx(1.0)
    assert analysis.best.predicted[6] == pytest.approx(6.0)  # 2 * 2.5 + 1


def test_ranks_follow_the_best_prediction_in_either_direction():
    x = [0.0, 1.0, 2.0, 3.0, 1.5, 0.5]
    y = [0.0, 1.1, 1.9, 3.0, NAN, NAN]
    higher = analyze(_table({"x": x}, y), resamples=0)
    assert higher.ranks() == (6, 4, 2, 1, 3, 5)  # the slope is positive: by x, largest first
    assert higher.candidate_ranks() == (None, None, None, None, 1, 2)
    lower = analyze(_table({"x": x}, y), resamples=0, higher_is_better=False)
    assert lower.ranks() == (1, 3, 5, 6, 4, 2)
    assert lower.candidate_ranks() == (None, None, None, None, 2, 1)
    rows = prediction_rows(higher)
    assert [r["run"] for r in rows] == ["ckpt-3", "ckpt-2", "ckpt-4", "ckpt-1", "ckpt-5", "ckpt-0"]
    assert list(rows[0]) == [
        "rank", "candidate_rank", "run", "status", "post", "predicted", "ci_low", "ci_high", "pi_low",
        "pi_high", "loo_predicted",
    ]  # fmt: skip
    assert rows[2]["status"] == "candidate" and rows[2]["post"] is None and rows[2]["loo_predicted"] is None
    assert rows[3]["status"] == "labelled" and rows[3]["post"] == 1.1 and rows[3]["candidate_rank"] is None


@pytest.mark.parametrize(
    ("columns", "target", "sets", "match"),
    [
        ({"x": [1, 2, 3]}, [0.1, NAN, NAN], None, r"1 row\(s\) of test table have a target"),
        ({"x": [1, 2, 3]}, [NAN, NAN, NAN], None, r"0 row\(s\)"),
        (
            {"x": [1, 1, 3], "w": [1, 2, 3]},
            [0.1, 0.2, NAN],
            None,
            r"feature 'x' is constant \(1\) over the 2",
        ),
        ({"x": [1, 2, 3]}, [0.5, 0.5, 0.5], None, "is the same for all 3 labelled rows"),
        ({"x": [1, 2, 3]}, [0.1, 0.2, 0.3], [("x", "y")], r"feature\(s\) \['y'\] are not columns .* \['x'\]"),
        ({"x": [1, NAN, 3]}, [0.1, 0.2, 0.3], None, r"'x' is NaN or infinite for run\(s\) \['ckpt-1'\]"),
        ({"x": [1, 2, 3]}, [0.1, 0.2, 0.3], [], "no feature sets"),
        ({"x": [1, 2, 3]}, [0.1, 0.2, 0.3], [("x", "x")], r"feature set \['x', 'x'\] names a feature twice"),
    ],
)
def test_unusable_tables_are_rejected_with_the_reason(columns, target, sets, match):
    with pytest.raises(PredictInputError, match=match):
        analyze(_table(columns, target), sets, resamples=0)


def test_fewer_than_three_labelled_rows_warn(caplog):
    analysis = analyze(_table({"x": [1.0, 2.0, 3.0]}, [0.1, 0.3, NAN]), resamples=10)
    assert len(analysis.warnings) == 1 and "only 2 rows have a target" in analysis.warnings[0]
    assert "only 2 rows have a target" in caplog.text
    assert analysis.best.model == "ridge"  # p = 1 >= n - 1
    assert analyze(_table({"x": [1.0, 2.0, 3.0]}, [0.1, 0.3, 0.2]), resamples=0).warnings == ()


def test_example_table_numbers_and_summary():
    table = read_table(EXAMPLE, "post_rl_pass@1")
    analysis = analyze(table, resamples=200, seed=0)
    labelled = table.labelled
    y = np.asarray(table.target)[labelled]
    records = {tuple(r["features"]): r for r in fit_records(analysis)}
    assert len(records) == len(table.columns) + 1  # each feature alone, and heldout_loss + pass@<max k>
    for k in (1, 64):
        x = np.asarray(table.columns[f"pass@{k}"])[labelled]
        ref = stats.linregress(x, y)
        record = records[(f"pass@{k}",)]
        assert record["coef"][f"pass@{k}"] == pytest.approx(ref.slope)
        assert record["intercept"] == pytest.approx(ref.intercept)
        assert record["r2"] == pytest.approx(ref.rvalue**2)
        assert record["feature_spearman"][f"pass@{k}"] == pytest.approx(stats.spearmanr(x, y).statistic)
    loss = np.asarray(table.columns["heldout_loss"])[labelled]
    assert records[("heldout_loss",)]["feature_spearman"]["heldout_loss"] == pytest.approx(
        stats.spearmanr(loss, y).statistic
    )
    summary = summarize(analysis)
    assert summary[0].startswith(f"{label(analysis.best.features)[0].upper()}")
    assert f"leave-one-out R^2 {analysis.best.r2_loo:.2f}" in summary[0]
    if analysis.best.features != ("pass@1",):
        assert "Pre-RL pass@1 alone (the SFT score) is a" in summary[1]
    assert "optimistic" in summary[-2]
    top = analysis.candidate_ranks().index(1)
    assert summary[-1].startswith(f"Top candidate: {table.ids[top]}")


def test_fit_records_follow_the_documented_schema():
    analysis = analyze(
        _table({"x": [0.0, 1.0, 2.0, 3.0], "w": [1.0, 0.0, 1.0, 5.0]}, [0, 1, 2.5, 2.9]), resamples=5
    )
    for record in fit_records(analysis):
        assert {"features", "n", "r2", "r2_loo", "spearman", "kendall", "coef", "intercept"} <= set(record)
        assert isinstance(record["n"], int) and list(record["coef"]) == record["features"]
        assert record["bootstrap"] == {"resamples": 5, "used": record["bootstrap"]["used"], "seed": 0}
