"""scripts/grade.py, run in-process on tests/scripts/fixtures/grade/ (benchmarks alpha, beta; 12 interleaved
samples), plus one subprocess run of the real entry point on the bundled example and a gold-answer check on
the real benchmark data."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "grade"
BENCHMARKS = FIXTURES / "benchmarks"
SAMPLES = FIXTURES / "samples.jsonl"

_spec = importlib.util.spec_from_file_location("grade", REPO_ROOT / "scripts" / "grade.py")
grade = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = grade
_spec.loader.exec_module(grade)


def _run(samples: Path, out: Path, *extra: str, benchmarks: Path = BENCHMARKS) -> int:
    argv = [
        "--samples",
        str(samples),
        "--benchmarks-dir",
        str(benchmarks),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    return grade.main([*argv, *extra])


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_samples(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def graded_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graded") / "out"
    assert _run(SAMPLES, out) == 0
    return out


# Hand derivation for the fixture (default ks: n = 4 everywhere -> 1, 2, 4).
#   alpha-1: 12 ok, 13, (no box), 12 ok  -> n=4, c=2, no answer 1/4; majority of all 4 is "12" (right)
#   alpha-2: 4, 4, 5 ok, 6               -> n=4, c=1;               majority of all 4 is "4" (wrong)
#   beta-1 : 1/2 ok, 1, 1/2 ok, 2        -> n=4, c=2;               majority of all 4 is "1/2" (right)
# pass@k = 1 - C(n-c, k) / C(n, k): c=2 -> 1/2, 5/6, 1 ; c=1 -> 1/4, 1/2, 1 (k = 1, 2, 4).
# maj@1 is pass@1 (one sample votes alone; the no-box sample is wrong either way).
EXPECTED = {
    "alpha": {
        "num_problems": 2,  # alpha-3 has no samples and is not counted
        "num_samples": 8,
        "n": 4,
        "n_max": 4,
        "pass@1": (1 / 2 + 1 / 4) / 2,
        "pass@2": (5 / 6 + 1 / 2) / 2,
        "pass@4": 1.0,
        "maj@1": (1 / 2 + 1 / 4) / 2,
        "maj@4": (1 + 0) / 2,
        "mean@n": (2 / 4 + 1 / 4) / 2,
        "no_answer": (1 / 4 + 0) / 2,
    },
    "beta": {
        "num_problems": 1,
        "num_samples": 4,
        "n": 4,
        "n_max": 4,
        "pass@1": 1 / 2,
        "pass@2": 5 / 6,
        "pass@4": 1.0,
        "maj@1": 1 / 2,
        "maj@4": 1.0,
        "mean@n": 1 / 2,
        "no_answer": 0.0,
    },
}


def test_metrics_match_hand_derived_values(graded_out):
    metrics = json.loads((graded_out / "metrics.json").read_text())
    assert list(metrics["per_benchmark"]) == ["alpha", "beta"]
    for bench, expected in EXPECTED.items():
        got = metrics["per_benchmark"][bench]
        assert set(got) == set(expected) | {"maj@2"}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (bench, key)
        assert 0.0 <= got["maj@2"] <= 1.0
    # macro: unweighted mean over the two benchmarks
    for key in ("pass@1", "pass@2", "pass@4", "maj@1", "maj@4", "mean@n", "no_answer"):
        assert metrics["macro"][key] == pytest.approx((EXPECTED["alpha"][key] + EXPECTED["beta"][key]) / 2)
    assert metrics["macro"]["pass@1"] == pytest.approx(0.4375)


def test_graded_jsonl_keeps_input_order_and_keys(graded_out):
    inputs, graded = _read_jsonl(SAMPLES), _read_jsonl(graded_out / "graded.jsonl")
    assert [g["line"] for g in graded] == list(range(1, 13))
    for before, after in zip(inputs, graded, strict=True):
        assert list(after) == [*before, "correct", "extracted", "reason"]
        assert {k: after[k] for k in before} == before
    assert [g["correct"] for g in graded] == [
        True,
        True,
        False,
        False,
        False,
        False,
        False,
        True,
        True,
        True,
    ] + [
        False,
        False,
    ]
    assert graded[6]["extracted"] is None and graded[6]["reason"] == "no_answer"  # "twelve, no box"
    assert graded[3]["reason"] == "wrong" and graded[0]["reason"] == "correct"


def test_summary_table_goes_to_stdout(tmp_path, capsys):
    assert _run(SAMPLES, tmp_path / "out", "--k", "1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["benchmark", "problems", "n", "pass@1", "maj@1", "mean@n", "no_answer"]
    assert [line.split()[0] for line in lines[1:]] == ["alpha", "beta", "macro"]
    assert lines[1].split()[:4] == ["alpha", "2", "4", "37.5"]


def test_explicit_ks(tmp_path):
    assert _run(SAMPLES, tmp_path / "out", "--k", "2,1") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["macro"]) == {"pass@1", "pass@2", "maj@1", "maj@2", "mean@n", "no_answer"}


def test_uneven_samples_per_problem(tmp_path, capsys):
    # drop beta-1's last sample (line 12): beta-1 has n=3, c=2, so the smallest n is 3
    samples = _write_samples(tmp_path / "s.jsonl", _read_jsonl(SAMPLES)[:11])
    assert _run(samples, tmp_path / "out") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    beta = metrics["per_benchmark"]["beta"]
    assert set(metrics["macro"]) == {"pass@1", "pass@2", "maj@1", "maj@2", "mean@n", "no_answer"}  # ks 1, 2
    assert beta["n"] == beta["n_max"] == 3
    assert beta["pass@1"] == pytest.approx(2 / 3)
    assert beta["pass@2"] == pytest.approx(1.0)  # n - c = 1 < k: every pair holds a correct sample
    out = tmp_path / "out2"
    assert _run(samples, out, "--k", "1,4") == 2
    err = capsys.readouterr().err
    assert "pass@4 needs at least 4 samples per problem, but beta problem 'beta-1' has n=3" in err
    assert not out.exists()


GOOD = {"benchmark": "alpha", "id": "alpha-1", "completion": r"\boxed{12}"}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"benchmark": "alpha", ', "not valid JSON"),
        ("", "not valid JSON"),
        ('["alpha", "alpha-1"]', "expected a JSON object, got list"),
        ({"benchmark": "alpha", "id": "alpha-1"}, "missing key(s) ['completion']"),
        ({"id": "alpha-1", "completion": "x"}, "missing key(s) ['benchmark']"),
        (GOOD | {"completion": None}, "'completion' is NoneType"),
        (GOOD | {"completion": 12}, "'completion' is int"),
        (GOOD | {"id": 1}, "'id' is int"),
        (GOOD | {"benchmark": "gamma"}, "unknown benchmark 'gamma': no gamma.jsonl in"),
        (GOOD | {"id": "alpha-9"}, "no problem with id 'alpha-9' in benchmark 'alpha'"),
    ],
)
def test_bad_input_exits_2_naming_file_line_and_writes_nothing(tmp_path, capsys, bad_line, message):
    samples = _write_samples(tmp_path / "s.jsonl", [GOOD, bad_line, GOOD])
    out = tmp_path / "out"
    assert _run(samples, out) == 2
    err = capsys.readouterr().err
    assert f"{samples}:2: {message}" in err
    assert f"{samples}:1" not in err and f"{samples}:3" not in err
    assert not out.exists()


def test_unknown_benchmark_lists_available(tmp_path, capsys):
    samples = _write_samples(tmp_path / "s.jsonl", [GOOD | {"benchmark": "gamma"}])
    assert _run(samples, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "available: alpha, beta" in err


def test_every_bad_line_is_reported(tmp_path, capsys):
    samples = _write_samples(tmp_path / "s.jsonl", ["nope", GOOD, GOOD | {"id": "x"}, "[]"])
    assert _run(samples, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "3 invalid line(s)" in err
    assert all(f"{samples}:{i}:" in err for i in (1, 3, 4))


def test_existing_outputs_survive_bad_input(tmp_path, graded_out):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    samples = _write_samples(tmp_path / "s.jsonl", ["nope"])
    assert _run(samples, out) == 2
    assert (out / "metrics.json").read_text() == "old" and not (out / "graded.jsonl").exists()


def test_empty_samples_file(tmp_path, capsys):
    samples = _write_samples(tmp_path / "s.jsonl", [])
    assert _run(samples, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no samples" in err


def test_missing_benchmarks_dir(tmp_path, capsys):
    samples = _write_samples(tmp_path / "s.jsonl", [GOOD])
    assert _run(samples, tmp_path / "out", benchmarks=tmp_path / "nope") == 2
    err = capsys.readouterr().err
    assert f"{samples}:1: benchmark directory {tmp_path / 'nope'} does not exist" in err


def test_invalid_benchmark_file_is_reported(tmp_path, capsys):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "alpha.jsonl").write_text('{"id": "alpha-1"}\n')
    samples = _write_samples(tmp_path / "s.jsonl", [GOOD])
    assert _run(samples, tmp_path / "out", benchmarks=tmp_path / "bench") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bench' / 'alpha.jsonl'}:1: keys must be exactly" in err


@pytest.mark.parametrize("option", [["--k", "1,x"], ["--k", "0,1"], ["--workers", "0"], ["--timeout", "-1"]])
def test_bad_options_are_usage_errors(tmp_path, option):
    with pytest.raises(SystemExit) as info:
        _run(SAMPLES, tmp_path / "out", *option)
    assert info.value.code == 2
    assert not (tmp_path / "out").exists()


def test_partial_coverage_is_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert _run(SAMPLES, tmp_path / "out") == 0
    assert "alpha: samples cover 2 of its 3 problems" in caplog.text
    assert "beta: samples cover" not in caplog.text


def test_gold_answers_of_real_benchmarks_grade_correct(shared_benchmarks_dir, tmp_path):
    from nemo_quagmire.eval.benchmarks import STANDARD_BENCHMARKS, load_benchmarks

    # rows whose answers the cleaning rules rewrote, plus 5 random rows per benchmark
    edited = {
        "aime24-0067",
        "gsm8k-0611",
        "minerva_math-0001",
        "minerva_math-0005",
        "minerva_math-0044",
        "minerva_math-0072",
        "olympiadbench-1664",
        "olympiadbench-2203",
        "olympiadbench-2255",
    }
    rng = random.Random(0)
    records = []
    for name, problems in load_benchmarks(STANDARD_BENCHMARKS, shared_benchmarks_dir).items():
        for p in rng.sample(problems, 5) + [p for p in problems if p.id in edited]:
            records.append(
                {"benchmark": name, "id": p.id, "completion": f"So the answer is $\\boxed{{{p.answer}}}$."}
            )
    samples = _write_samples(tmp_path / "s.jsonl", records)
    assert _run(samples, tmp_path / "out", benchmarks=shared_benchmarks_dir) == 0
    graded = _read_jsonl(tmp_path / "out" / "graded.jsonl")
    assert len(graded) == 7 * 5 + len(edited)
    assert [g["id"] for g in graded if not g["correct"]] == []


def test_entry_point_on_the_bundled_example(tmp_path):
    """The README's command, as a subprocess: exit 0, both outputs, the table on stdout, no bar off a TTY."""
    out = tmp_path / "grade-example"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    examples = REPO_ROOT / "scripts" / "examples"
    command = [sys.executable, "scripts/grade.py", "--samples", str(examples / "samples.jsonl")]
    command += ["--benchmarks-dir", str(examples / "benchmarks"), "--out", str(out), "--workers", "1"]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[0] == "toy_math"
    assert "sample/s" not in proc.stderr  # tqdm is off when stderr is not a terminal
    reasons = {g["reason"] for g in _read_jsonl(out / "graded.jsonl")}
    assert reasons == {"correct", "wrong", "no_answer"}  # the example shows all three
    assert json.loads((out / "metrics.json").read_text())["per_benchmark"]["toy_math"]["num_problems"] == 5
