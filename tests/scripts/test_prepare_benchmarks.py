"""scripts/prepare_benchmarks.py on small source fixtures in tests/scripts/fixtures/prepare_benchmarks/,
laid out as <owner>/<repo>/<path> like the real checkouts. The fixture rows are made up, except for the
answers of the rows with individual repairs, which must be the source's text. Every general rule and every
repair is hit; the expected answers below are written by hand from the rules in the benchmark README."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from nemo_quagmire.eval.benchmarks import FIELDS, STANDARD_BENCHMARKS, load_benchmarks

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "prepare_benchmarks"

_spec = importlib.util.spec_from_file_location(
    "prepare_benchmarks", REPO_ROOT / "scripts" / "prepare_benchmarks.py"
)
prep = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = prep  # dataclasses look their module up there
_spec.loader.exec_module(prep)

EXPECTED_ANSWERS = {
    "math500": {"test/prealgebra/1.json": "2", "test/prealgebra/2.json": r"\frac{1}{2}"},
    # leading zeros dropped, "000" -> "0"
    "aime24": {"aime24-0060": "120", "aime24-0067": "25", "aime24-0070": "0"},
    "aime25": {"aime25-0000": "70", "aime25-0014": "7"},
    "amc23": {"amc23-0000": "27", "amc23-0007": "8"},  # floats 27.0, 8.0; id gap kept
    # text after the LAST ####; thousands separators removed
    "gsm8k": {"gsm8k-0000": "7", "gsm8k-0001": "2125", "gsm8k-0012": "1000000"},
    "minerva_math": {
        "minerva_math-0001": r"4.5 \times 10^{33}",  # e-notation
        "minerva_math-0005": r"\arcsin\left(\frac{10}{13}\right)",  # repair (python)
        "minerva_math-0006": r"1.5 \times 10^{-7}",  # last of two boxes; negative exponent
        "minerva_math-0007": r"\{1, \frac{2}{3}\}",  # nested and escaped braces
        "minerva_math-0008": r"(1 - 3e^{-2t}) u(t)",  # an "e" that is not e-notation stays
        "minerva_math-0009": r"I(0) e^{-\frac{t}{R C}}",  # newline inside the box stripped
        "minerva_math-0038": r"-\frac{1}{3}",  # repair (python "-1./3")
        "minerva_math-0049": r"-\frac{3}{2}",  # repair (python "-3./2")
        "minerva_math-0072": r"x_{0} \cos (\omega t)+\dot{x}_{0} \sin (\omega t) / \omega",  # repair "$ $"
        "minerva_math-0100": r"6 \times 10^{13}",  # integer mantissa
    },
    "olympiadbench": {
        "olympiadbench-1606": "2",
        "olympiadbench-1610": r"\frac{1}{2 n+2}",  # one $...$ unwrapped
        "olympiadbench-1664": "69, 84",  # $a$,$b$ -> "a, b"
        "olympiadbench-1687": "f(n)=n, g(n)=1",  # $a$, $b$ -> "a, b"
        "olympiadbench-1807": "-2,0,2",  # commas inside one segment kept as written
        "olympiadbench-1970": r"(-\infty, 0) \cup\{1\}",  # trailing period dropped, then unwrapped
        "olympiadbench-2255": r"62.5\%",  # bare % escaped
        "olympiadbench-2276": r"8 \%",  # escaped % kept
        "olympiadbench-2575": "1,3,5",  # plain string kept
        "olympiadbench-1782": "n^{2}-n-1",  # repairs from here on
        "olympiadbench-1965": r"f(x)=a x+b\text{, where }b\text{ is an arbitrary integer, and }a\text{ is an "
        r"arbitrary positive integer with }\mho(a)=0",
        "olympiadbench-2045": "(0,4]",
        "olympiadbench-2349": "221, 8",
        "olympiadbench-2891": r"(2+\sqrt{2}, 1+\sqrt{2})",
    },
}


def _run(source_dir: Path, out: Path, *extra: str) -> int:
    return prep.main(["--source-dir", str(source_dir), "--out", str(out), *extra])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    assert _run(FIXTURES, out, "--no-blob-check") == 0
    return out


def test_every_rule_gives_the_hand_derived_answer(prepared):
    for name in STANDARD_BENCHMARKS:
        answers = {row["id"]: row["answer"] for row in _rows(prepared / f"{name}.jsonl")}
        assert answers == EXPECTED_ANSWERS[name], name


def test_rows_keep_source_order_keys_and_provenance(prepared):
    for name in STANDARD_BENCHMARKS:
        rows = _rows(prepared / f"{name}.jsonl")
        assert [row["id"] for row in rows] == list(EXPECTED_ANSWERS[name]), name  # source order
        assert all(tuple(row) == FIELDS for row in rows), name
        source = prep.SOURCES[name]
        assert {row["source"] for row in rows} == {f"{source.repo}:{source.path}"}
    # the outputs are valid input for the loader
    assert {k: len(v) for k, v in load_benchmarks(data_dir=prepared).items()} == {
        k: len(v) for k, v in EXPECTED_ANSWERS.items()
    }


def test_problem_and_solution_fields(prepared):
    by_id = {row["id"]: row for name in STANDARD_BENCHMARKS for row in _rows(prepared / f"{name}.jsonl")}
    assert by_id["test/prealgebra/1.json"]["problem"] == "What is $1+1$?"  # outer whitespace stripped
    # GSM8K: question -> problem; solution = text before the last ####, calculator annotations removed
    assert by_id["gsm8k-0000"]["problem"] == "Ann has 3 apples and buys 4 more. How many now?"
    assert by_id["gsm8k-0000"]["solution"] == "She has 3 + 4 = 7 apples."
    assert (
        by_id["gsm8k-0001"]["solution"] == "Total is 1000 + 1125 = 2125 dollars.\nCheck #### is not the end."
    )
    assert by_id["amc23-0000"]["solution"] == ""  # the source has none
    assert by_id["aime25-0014"]["solution"] == ""
    assert by_id["aime25-0000"]["solution"] == r"Multiply: $\boxed{70}$"  # reference_solution
    # Minerva: solution unchanged (still has the original box)
    assert by_id["minerva_math-0001"]["solution"] == r"It is $L=\boxed{4.5e33}$ erg/s."
    # OlympiadBench: alternative solutions, each stripped, joined by a blank line; question -> problem
    assert by_id["olympiadbench-1606"]["solution"] == "First way.\n\nSecond way."
    assert by_id["olympiadbench-1606"]["problem"] == "Problem number 1606?"


def test_sha256sums_match_files(prepared):
    lines = (prepared / "SHA256SUMS").read_text().splitlines()
    names = [line.split("  ")[1] for line in lines]
    assert names == sorted(f"{n}.jsonl" for n in STANDARD_BENCHMARKS)
    for line in lines:
        digest, name = line.split("  ")
        assert hashlib.sha256((prepared / name).read_bytes()).hexdigest() == digest


def test_output_is_utf8_without_ascii_escapes(prepared):
    text = (prepared / "gsm8k.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n") and '"id": "gsm8k-0000", "problem": ' in text  # json.dumps default separators


def test_other_files_in_out_dir_are_kept(tmp_path):
    (tmp_path / "README.md").write_text("keep me")
    assert _run(FIXTURES, tmp_path, "--no-blob-check") == 0
    assert (tmp_path / "README.md").read_text() == "keep me"


def test_blob_mismatch_is_an_error_and_writes_nothing(tmp_path, caplog):
    out = tmp_path / "out"
    assert _run(FIXTURES, out) == 1  # fixtures are not the pinned files
    assert "git blob id" in caplog.text and "2376b9a194b46c0790e197c91b7249e5f88ac09b" in caplog.text
    assert not out.exists() or not any(out.iterdir())


def test_missing_source_file_names_the_path(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert _run(tmp_path / "empty", tmp_path / "out", "--no-blob-check") == 1
    assert "missing source file" in caplog.text and "simpleRL-reason" in caplog.text


def _copy_fixtures(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(FIXTURES, src)
    return src


def _rewrite(path: Path, edit) -> None:
    rows = [edit(row) for row in _rows(path)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r is not None), encoding="utf-8")


def test_repair_of_a_changed_source_row_is_an_error(tmp_path, caplog):
    src = _copy_fixtures(tmp_path)
    path = src / prep.SOURCES["olympiadbench"].repo / prep.SOURCES["olympiadbench"].path

    def edit(row):
        return {**row, "final_answer": ["$222,$8$"]} if row["id"] == 2349 else row

    _rewrite(path, edit)
    out = tmp_path / "out"
    assert _run(src, out, "--no-blob-check") == 1
    assert "olympiadbench-2349" in caplog.text and "'$221,$8$'" in caplog.text and "'$222,$8$'" in caplog.text
    assert not out.exists()  # nothing is written before every file is built


def test_unused_repair_is_an_error(tmp_path, caplog):
    src = _copy_fixtures(tmp_path)
    path = src / prep.SOURCES["minerva_math"].repo / prep.SOURCES["minerva_math"].path
    _rewrite(path, lambda row: None if row["idx"] == 38 else row)
    assert _run(src, tmp_path / "out", "--no-blob-check") == 1
    assert "minerva_math-0038" in caplog.text


def test_leftover_dollar_in_an_answer_is_an_error(tmp_path, caplog):
    src = _copy_fixtures(tmp_path)
    path = src / prep.SOURCES["olympiadbench"].repo / prep.SOURCES["olympiadbench"].path
    _rewrite(path, lambda row: {**row, "final_answer": ["$a$ or $b$"]} if row["id"] == 1606 else row)
    assert _run(src, tmp_path / "out", "--no-blob-check") == 1
    assert "olympiadbench-1606" in caplog.text and "add a repair" in caplog.text


def test_non_integral_amc_answer_is_an_error_naming_file_and_line(tmp_path, caplog):
    src = _copy_fixtures(tmp_path)
    path = src / prep.SOURCES["amc23"].repo / prep.SOURCES["amc23"].path
    _rewrite(path, lambda row: {**row, "answer": 2.5} if row["id"] == 7 else row)
    assert _run(src, tmp_path / "out", "--no-blob-check") == 1
    assert "evaluation/data/amc23/test.jsonl:2" in caplog.text and "2.5" in caplog.text


def test_download_fetches_the_pinned_commit_and_checks_the_blob(monkeypatch):
    source = prep.SOURCES["aime24"]
    data = b"pretend file\n"
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        return io.BytesIO(data)

    monkeypatch.setattr(prep.urllib.request, "urlopen", fake_urlopen)
    assert prep.read_source(source, None, check_blob=False) == data
    assert requested == [f"https://raw.githubusercontent.com/{source.repo}/{source.commit}/{source.path}"]
    with pytest.raises(prep.PrepareError, match=source.blob):
        prep.read_source(source, None)


def test_git_blob_id_matches_git():
    # `printf 'hello\n' | git hash-object --stdin`
    assert prep.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_recipes_and_sources_cover_the_standard_benchmarks():
    assert tuple(prep.RECIPES) == tuple(prep.SOURCES) == STANDARD_BENCHMARKS


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{a}{b}} end", r"\frac{a}{b}"),
        (r"\boxed{\{x\}}", r"\{x\}"),
        (r"\boxed{[0, 1\}}", r"[0, 1\}"),  # an escaped brace does not close the box
    ],
)
def test_last_boxed(text, boxed):
    assert prep.last_boxed(text) == boxed


@pytest.mark.parametrize("text", ["no box", r"\boxed{\frac{1}{2}"])
def test_last_boxed_errors(text):
    with pytest.raises(prep.PrepareError):
        prep.last_boxed(text)


@pytest.mark.parametrize(
    ("rule", "before", "after"),
    [
        (prep.e_notation_to_latex, "2.7778e-6", r"2.7778 \times 10^{-6}"),
        (prep.e_notation_to_latex, "1.70e4", r"1.70 \times 10^{4}"),  # mantissa as written
        (prep.e_notation_to_latex, "-3e+05", r"-3 \times 10^{5}"),
        (prep.e_notation_to_latex, "e^{2}", "e^{2}"),
        (prep.remove_thousands_separators, "-1,234.5", "-1234.5"),
        (prep.remove_thousands_separators, "1,23", "1,23"),  # not a thousands separator
        (prep.remove_thousands_separators, "(1,2)", "(1,2)"),
        (prep.unwrap_dollar_segments, "$a$ , $b$,$c$", "a, b, c"),
        (prep.unwrap_dollar_segments, "$a$ and $b$", "$a$ and $b$"),
        (prep.drop_trailing_period, "5.", "5"),
        (prep.escape_percent, "5% or 6\\%", "5\\% or 6\\%"),
    ],
)
def test_general_rules(rule, before, after):
    assert rule(before) == after


def test_aime_answer_must_be_an_integer():
    with pytest.raises(prep.PrepareError, match="12.5"):
        prep.strip_leading_zeros("12.5")
