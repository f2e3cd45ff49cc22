"""Benchmark loading: schema validation with file:line errors, directory resolution, prompt templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_quagmire.eval.benchmarks import (
    BENCHMARKS_DIR_ENV,
    INSTRUCTION,
    STANDARD_BENCHMARKS,
    BenchmarkError,
    Problem,
    available_benchmarks,
    format_prompt,
    load_benchmark,
    load_benchmarks,
)

# Row counts promised by ../shared/benchmarks/README.md.
README_COUNTS = {
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "gsm8k": 1319,
    "minerva_math": 272,
    "olympiadbench": 675,
}


def _row(i: int, **overrides) -> dict:
    return {
        "id": f"toy-{i}",
        "problem": f"What is {i}+{i}?",
        "answer": str(2 * i),
        "solution": "",
        "source": "t",
    } | (overrides)


def _write(directory: Path, name: str, lines: list) -> Path:
    path = directory / f"{name}.jsonl"
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )
    return path


def test_loads_rows_in_file_order(tmp_path):
    _write(tmp_path, "toy", [_row(1, solution="1+1=2"), _row(2)])
    assert load_benchmark("toy", tmp_path) == [
        Problem("toy", "toy-1", "What is 1+1?", "2", "1+1=2"),
        Problem("toy", "toy-2", "What is 2+2?", "4", ""),
    ]


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _write(tmp_path, "toy", [_row(1)])
    monkeypatch.setenv(BENCHMARKS_DIR_ENV, str(tmp_path))
    assert [p.id for p in load_benchmark("toy")] == ["toy-1"]


def test_no_data_dir_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv(BENCHMARKS_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=f"{BENCHMARKS_DIR_ENV}.*prepare_benchmarks.py"):
        load_benchmark("math500")


def test_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}.*prepare_benchmarks.py"):
        load_benchmark("math500", tmp_path / "nope")


def test_missing_standard_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'aime24.jsonl'}.*prepare_benchmarks.py"):
        load_benchmark("aime24", tmp_path)


def test_unknown_name_lists_available(tmp_path):
    _write(tmp_path, "toy", [_row(1)])
    _write(tmp_path, "amc23", [_row(1)])
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nope'.*available: amc23, toy"):
        load_benchmark("nope", tmp_path)
    assert available_benchmarks(tmp_path) == ["amc23", "toy"]  # standard ones first


def test_load_benchmarks_defaults_to_the_standard_seven(tmp_path):
    for name in STANDARD_BENCHMARKS:
        _write(tmp_path, name, [_row(1)])
    _write(tmp_path, "extra", [_row(1)])
    assert tuple(load_benchmarks(data_dir=tmp_path)) == STANDARD_BENCHMARKS
    assert list(load_benchmarks(["extra", "gsm8k"], tmp_path)) == ["extra", "gsm8k"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": "toy-2", "problem": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (_row(2) | {"extra": "x"}, r"unexpected \['extra'\]"),
        ({k: v for k, v in _row(2).items() if k != "solution"}, r"missing \['solution'\]"),
        (_row(2, answer=4), "'answer' must be a string, got int"),
        (_row(2, source=None), "'source' must be a string, got NoneType"),
        (_row(2, problem="  "), "'problem' is empty"),
        (_row(2, answer=""), "'answer' is empty"),
        (_row(1), "duplicate id 'toy-1' \\(first on line 1\\)"),
        ("", "not valid JSON"),  # a blank line inside the file
    ],
)
def test_invalid_rows_are_reported_with_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path, "toy", [_row(1), bad_line, _row(3)])
    with pytest.raises(BenchmarkError, match=message) as info:
        load_benchmark("toy", tmp_path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "toy.jsonl").write_text("")
    with pytest.raises(BenchmarkError, match="no problems"):
        load_benchmark("toy", tmp_path)


def test_non_utf8_file_is_an_error(tmp_path):
    (tmp_path / "toy.jsonl").write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(BenchmarkError, match="not UTF-8"):
        load_benchmark("toy", tmp_path)


def test_real_benchmarks_load_with_readme_counts(shared_benchmarks_dir):
    loaded = load_benchmarks(data_dir=shared_benchmarks_dir)
    assert {name: len(rows) for name, rows in loaded.items()} == README_COUNTS
    assert loaded["aime24"][0].id == "aime24-0060" and loaded["aime24"][0].answer == "204"
    assert loaded["math500"][0].id == "test/precalculus/807.json"


def test_chat_prompt_is_one_user_message_asking_for_a_box():
    problem = Problem("toy", "toy-1", "What is 1+1?", "2", "")
    assert format_prompt(problem) == [{"role": "user", "content": f"What is 1+1?\n{INSTRUCTION}"}]
    assert "\\boxed{}" in INSTRUCTION


def test_plain_prompt_ends_with_a_cue():
    prompt = format_prompt("What is 1+1?", template="plain")
    assert prompt == f"Problem:\nWhat is 1+1?\n\n{INSTRUCTION}\n\nSolution:"


class _RecordingTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.call = (messages, tokenize, add_generation_prompt)
        return "<rendered>"


def test_chat_prompt_with_tokenizer_renders_with_generation_prompt():
    tokenizer = _RecordingTokenizer()
    assert format_prompt("What is 1+1?", "chat", tokenizer) == "<rendered>"
    assert tokenizer.call == ([{"role": "user", "content": f"What is 1+1?\n{INSTRUCTION}"}], False, True)


def test_prompt_template_errors():
    with pytest.raises(ValueError, match="unknown template 'fancy'"):
        format_prompt("x", template="fancy")
    with pytest.raises(ValueError, match="chat' only"):
        format_prompt("x", template="plain", tokenizer=_RecordingTokenizer())
