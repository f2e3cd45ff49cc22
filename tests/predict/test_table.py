"""nemo_quagmire.predict.table: reading and validating the CSV table, each problem named by file:line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nemo_quagmire.predict.table import PredictInputError, read_table, table_to_csv

GOOD = """run,pass@1,pass@64,heldout_loss,post_rl_pass@1
a,0.30,0.90,0.55,0.41
b,0.35,0.80,0.60,
c,0.40,0.95,0.50,0.45
"""


def _write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_ids_features_in_column_order_and_empty_targets_as_candidates(tmp_path):
    table = read_table(_write(tmp_path, GOOD), "post_rl_pass@1")
    assert table.ids == ("a", "b", "c")
    assert list(table.columns) == ["pass@1", "pass@64", "heldout_loss"]
    assert table.columns["pass@64"] == (0.90, 0.80, 0.95)
    assert table.target[0] == 0.41 and math.isnan(table.target[1]) and table.target[2] == 0.45
    assert table.labelled.tolist() == [True, False, True]
    assert table.matrix(["heldout_loss", "pass@1"]).tolist() == [[0.55, 0.30], [0.60, 0.35], [0.50, 0.40]]


def test_named_features_ignore_other_columns_even_non_numeric_ones(tmp_path):
    text = "run,notes,pass@1,post_rl\na,long run,0.3,0.4\nb,,0.4,\n"
    table = read_table(_write(tmp_path, text), "post_rl", features=["pass@1"])
    assert list(table.columns) == ["pass@1"]
    with pytest.raises(
        PredictInputError, match=r"t\.csv:2: column 'notes': 'long run' is not a number"
    ) as err:
        read_table(_write(tmp_path, text), "post_rl")
    assert "unless features are named" in str(err.value)


def test_round_trips_through_table_to_csv(tmp_path):
    table = read_table(_write(tmp_path, GOOD), "post_rl_pass@1")
    again = read_table(_write(tmp_path, table_to_csv(table), "again.csv"), "post_rl_pass@1")
    assert again.ids == table.ids and again.columns == table.columns
    assert [x for x in again.target if x == x] == [x for x in table.target if x == x]


def test_bom_and_blank_lines_are_tolerated(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(("\ufeff" + GOOD + "\n\n").encode("utf-8"))
    assert read_table(path, "post_rl_pass@1").ids == ("a", "b", "c")


def test_missing_columns_are_named_with_the_available_ones(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(PredictInputError) as err:
        read_table(path, "post_rl_pass@4", features=["pass@1", "pass@8"])
    message = str(err.value)
    assert "missing column(s) ['post_rl_pass@4', 'pass@8']" in message
    assert "['run', 'pass@1', 'pass@64', 'heldout_loss', 'post_rl_pass@1']" in message
    with pytest.raises(PredictInputError, match=r"missing column\(s\) \['run'\]"):
        read_table(_write(tmp_path, "id,x,y\na,1,2\n"), "y")


def test_every_bad_cell_is_reported_by_line_and_column(tmp_path):
    text = GOOD + "d,abc,0.9,,0.5\ne,0.3,nan,0.5,inf\n,0.3,0.9,0.5,0.4\nf,0.3,0.9\n"
    path = _write(tmp_path, text)
    with pytest.raises(PredictInputError) as err:
        read_table(path, "post_rl_pass@1")
    message = str(err.value)
    assert f"{path}:5: column 'pass@1': 'abc' is not a number" in message
    assert f"{path}:5: column 'heldout_loss': empty value" in message
    assert f"{path}:6: column 'pass@64': 'nan' is not a finite number" in message
    assert (
        f"{path}:6: column 'post_rl_pass@1': 'inf' is not a finite number (leave the target empty" in message
    )
    assert f"{path}:7: empty 'run'" in message
    assert f"{path}:8: 3 cells, the header has 5" in message
    assert message.startswith("6 problem(s)")


def test_duplicate_ids_are_named_with_their_lines(tmp_path):
    with pytest.raises(PredictInputError, match=r"run id 'a' appears 2 times \(line 2, line 5\)"):
        read_table(_write(tmp_path, GOOD + "a,0.1,0.2,0.3,\n"), "post_rl_pass@1")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "is empty"),
        ("run,x,y\n", "no data rows"),
        ("run,y\na,1\n", "no feature columns"),
        ("run,x,x,y\na,1,2,3\n", r"column\(s\) \['x'\] appear more than once"),
    ],
)
def test_structural_problems(tmp_path, text, match):
    with pytest.raises(PredictInputError, match=match):
        read_table(_write(tmp_path, text), "y")


def test_target_cannot_be_a_feature_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(PredictInputError, match="cannot also be a feature"):
        read_table(_write(tmp_path, GOOD), "pass@1", features=["pass@1"])
    with pytest.raises(PredictInputError, match="cannot read table .*nope.csv"):
        read_table(tmp_path / "nope.csv", "y")
