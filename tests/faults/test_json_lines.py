"""JSONL reading, one strict reader for every file kind: lines end at "\n" only (U+2028, U+0085, form feeds
inside strings are text), bare NaN / Infinity and runaway nesting are refused naming file:line."""

from __future__ import annotations

import json

import pytest

from nemo_quagmire.callbacks.heldout_loss import HeldOutDataError, read_heldout_examples
from nemo_quagmire.data.jsonl import SFT_FIELDS, RecordFileError, read_records
from nemo_quagmire.eval.benchmarks import BenchmarkError, parse_benchmark
from nemo_quagmire.utils.errors import InputError
from nemo_quagmire.utils.metrics_file import read_metrics
from tests.faults.conftest import GRADE_FIXTURES, load_script

SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x0c", "\x0b", "\x1c", "\r"]
TEXT = "first" + "".join(f"{sep}part{i}" for i, sep in enumerate(SEPARATORS))


def _benchmark_row(i: int, problem: str = "p") -> dict:
    return {"id": f"b-{i}", "problem": problem, "answer": "1", "solution": "", "source": "t"}


def _readers():
    """(name, write(path, records_as_text_lines), read(path) -> the string values read back)"""
    return {
        "benchmark": (
            lambda i, text: json.dumps(_benchmark_row(i, text), ensure_ascii=False),
            lambda path: [p.problem for p in parse_benchmark(path, "b")],
            BenchmarkError,
        ),
        "sft_records": (
            lambda i, text: json.dumps({"prompt": f"q{i}", "response": text}, ensure_ascii=False),
            lambda path: [r["response"] for r in read_records(path, SFT_FIELDS)],
            RecordFileError,
        ),
        "heldout": (
            lambda i, text: json.dumps({"prompt": f"q{i}", "response": text}, ensure_ascii=False),
            lambda path: [r["response"] for r in read_heldout_examples(path)],
            HeldOutDataError,
        ),
        "metrics": (
            lambda i, text: json.dumps({"step": i, "note": text}, ensure_ascii=False),
            lambda path: [r["note"] for r in read_metrics(path)],
            InputError,
        ),
    }


@pytest.mark.parametrize("kind", sorted(_readers()))
def test_unicode_line_separators_inside_strings_are_text(tmp_path, kind):
    line, read, _ = _readers()[kind]
    path = tmp_path / "f.jsonl"
    path.write_bytes(("\n".join(line(i, TEXT) for i in range(3)) + "\n").encode("utf-8"))
    assert read(path) == [TEXT] * 3


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("kind", sorted(_readers()))
def test_bare_nan_and_infinity_are_refused_naming_file_line(tmp_path, kind, constant):
    line, read, error = _readers()[kind]
    bad = line(1, "x").replace('"x"', constant)
    path = tmp_path / "f.jsonl"
    path.write_text(line(0, "ok") + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(error, match=rf"{path}:2: bare {constant} is not JSON"):
        read(path)


@pytest.mark.parametrize("kind", sorted(_readers()))
def test_deeply_nested_line_is_an_error_not_a_recursion_error(tmp_path, kind):
    line, read, error = _readers()[kind]
    path = tmp_path / "f.jsonl"
    path.write_text(line(0, "ok") + "\n" + "[" * 200_000 + "]" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(error, match=rf"{path}:2: JSON nested too deeply"):
        read(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(json.dumps(_benchmark_row(0)).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(BenchmarkError, match=rf"{path}:2: not UTF-8"):
        parse_benchmark(path, "b")


def test_grade_reads_separators_and_refuses_nan_per_line(tmp_path, capsys):
    grade = load_script("grade")
    samples = tmp_path / "s.jsonl"
    good = {"benchmark": "alpha", "id": "alpha-1", "completion": "so\u2028\\boxed{12}\u0085 done"}
    samples.write_text(json.dumps(good, ensure_ascii=False) + "\n", encoding="utf-8")
    argv = [
        "--samples",
        str(samples),
        "--benchmarks-dir",
        str(GRADE_FIXTURES / "benchmarks"),
        "--workers",
        "1",
    ]
    assert grade.main([*argv, "--out", str(tmp_path / "ok")]) == 0
    graded = (tmp_path / "ok" / "graded.jsonl").read_text(encoding="utf-8").split("\n")
    assert json.loads(graded[0])["completion"] == good["completion"] and graded[1:] == [""]

    samples.write_text(
        json.dumps(good)
        + "\n"
        + '{"benchmark": "alpha", "id": "alpha-1", "completion": NaN}\n'
        + "[" * 100_000,
        encoding="utf-8",
    )
    capsys.readouterr()
    assert grade.main([*argv, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"{samples}:2: bare NaN is not JSON" in err and f"{samples}:3: JSON nested too deeply" in err
    assert "Traceback" not in err and not (tmp_path / "bad").exists()
