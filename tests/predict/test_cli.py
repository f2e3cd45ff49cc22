"""scripts/predict_report.py, run in-process on the bundled example and on synthetic run directories, plus one
subprocess run of the real entry point on bad input (exit code 2, message on stderr, nothing written)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_quagmire.predict.analysis import analyze, fit_records
from nemo_quagmire.predict.table import read_table

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "scripts" / "examples" / "predict" / "checkpoints.csv"
SCRIPT = REPO_ROOT / "scripts" / "predict_report.py"

_spec = importlib.util.spec_from_file_location("predict_report", SCRIPT)
predict_report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = predict_report
_spec.loader.exec_module(predict_report)

FIT_KEYS = {"features", "n", "r2", "r2_loo", "spearman", "kendall", "coef", "intercept"}


def _run(*argv: str) -> int:
    return predict_report.main(list(argv))


@pytest.fixture(scope="module")
def example_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("example") / "out"
    status = _run(
        "--table", str(EXAMPLE), "--target", "post_rl_pass@1", "--out", str(out), "--bootstrap", "300"
    )
    assert status == 0
    return out


def test_example_writes_the_three_outputs_and_nothing_else(example_out):
    assert sorted(p.name for p in example_out.iterdir()) == ["fit.json", "predictions.csv", "report.html"]


def test_fit_json_matches_the_library_and_the_documented_schema(example_out):
    records = json.loads((example_out / "fit.json").read_text())
    assert all(FIT_KEYS <= set(r) for r in records)
    expected = fit_records(analyze(read_table(EXAMPLE, "post_rl_pass@1"), resamples=300, seed=0))
    assert records == json.loads(json.dumps(expected))
    assert [r["r2_loo"] for r in records] == sorted((r["r2_loo"] for r in records), reverse=True)


def test_predictions_csv_ranks_every_row_under_the_best_set(example_out):
    rows = list(csv.DictReader((example_out / "predictions.csv").open()))
    table = read_table(EXAMPLE, "post_rl_pass@1")
    assert sorted(r["run"] for r in rows) == sorted(table.ids)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(table.ids) + 1))
    predicted = [float(r["predicted"]) for r in rows]
    assert predicted == sorted(predicted, reverse=True)
    candidates = [r for r in rows if r["status"] == "candidate"]
    num_candidates = int((~table.labelled).sum())
    assert num_candidates > 0
    assert [int(r["candidate_rank"]) for r in candidates] == list(range(1, num_candidates + 1))
    assert all(r["post_rl_pass@1"] == "" for r in candidates)
    for r in rows:
        assert float(r["ci_low"]) <= float(r["predicted"]) <= float(r["ci_high"])


def test_feature_sets_can_be_named(tmp_path):
    out = tmp_path / "out"
    status = _run(
        "--table", str(EXAMPLE), "--target", "post_rl_pass@1", "--out", str(out), "--bootstrap", "50",
        "--features", "pass@1,heldout_loss+pass@64",
    )  # fmt: skip
    assert status == 0
    records = json.loads((out / "fit.json").read_text())
    assert sorted(r["features"] for r in records) == [["heldout_loss", "pass@64"], ["pass@1"]]
    assert records[0]["r2_loo"] >= records[1]["r2_loo"]  # best first


def _write_run(root: Path, name: str, val: dict, init_from: str | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "time": 0.0, **val}) + "\n")
    if init_from:
        (run / "run_info.json").write_text(json.dumps({"init_from": init_from}))
    return run


def test_run_directories_give_the_same_report_as_their_table(tmp_path):
    pre_rl = [(0.3, 0.8, 0.6), (0.35, 0.7, 0.65), (0.4, 0.9, 0.5), (0.2, 0.85, 0.55)]
    sft = [
        _write_run(
            tmp_path,
            f"sft-{i}",
            {"val/macro/pass@1": p1, "val/macro/pass@8": p8, "val/heldout_loss/token_mean": loss},
        )
        for i, (p1, p8, loss) in enumerate(pre_rl)
    ]
    rl = [
        _write_run(tmp_path, f"rl-{i}", {"val/macro/pass@1": post}, init_from=str(sft[i]))
        for i, post in enumerate([0.41, 0.33, 0.47])
    ]
    runs_out, table_out = tmp_path / "from-runs", tmp_path / "from-table"
    argv = ("--bootstrap", "40", "--seed", "3")
    assert _run("--sft-runs", *map(str, sft), "--rl-runs", *map(str, rl), "--out", str(runs_out), *argv) == 0
    assert (runs_out / "table.csv").read_text().startswith("run,pass@1,pass@8,heldout_loss,post_rl_pass@1\n")
    status = _run(
        "--table", str(runs_out / "table.csv"), "--target", "post_rl_pass@1", "--out", str(table_out), *argv
    )
    assert status == 0
    for name in ("fit.json", "predictions.csv"):
        assert (runs_out / name).read_text() == (table_out / name).read_text()


@pytest.mark.parametrize(
    ("table_text", "extra", "message"),
    [
        ("run,x,post\na,1,0.1\nb,2,0.2\nc,x3,\n", (), "t.csv:4: column 'x': 'x3' is not a number"),
        ("run,x,post\na,1,0.1\nb,2,0.2\n", ("--features", "x,y"), "missing column(s) ['y']"),
        ("run,x,post\na,1,0.1\nb,2,\n", (), "1 row(s) of"),
        ("run,x,w,post\na,1,5,0.1\nb,1,6,0.2\nc,1,7,0.3\n", (), "feature 'x' is constant"),
        ("run,x,post\na,1,0.1\nb,,0.2\nc,3,0.3\n", (), "t.csv:3: column 'x': empty value"),
        ("run,x,post\na,1,0.1\na,2,0.2\nc,3,0.3\n", (), "run id 'a' appears 2 times"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, table_text, extra, message):
    (tmp_path / "t.csv").write_text(table_text)
    out = tmp_path / "out"
    assert _run("--table", str(tmp_path / "t.csv"), "--target", "post", "--out", str(out), *extra) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not out.exists()


def test_conflicting_arguments_exit_2(tmp_path):
    for argv in (
        ["--out", str(tmp_path)],
        ["--table", str(EXAMPLE), "--out", str(tmp_path)],
        ["--table", str(EXAMPLE), "--target", "t", "--rl-runs", "x", "--out", str(tmp_path)],
        ["--table", str(EXAMPLE), "--target", "t", "--level", "1.5", "--out", str(tmp_path)],
    ):
        with pytest.raises(SystemExit) as exit_info:
            _run(*argv)
        assert exit_info.value.code == 2


def test_entry_point_reports_bad_input_on_stderr(tmp_path):
    (tmp_path / "t.csv").write_text("run,x,post\na,1,0.1\nb,nan,0.2\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--table",
            str(tmp_path / "t.csv"),
            "--target",
            "post",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "t.csv:3: column 'x': 'nan' is not a finite number" in result.stderr
    assert result.stdout == "" and not out.exists()
