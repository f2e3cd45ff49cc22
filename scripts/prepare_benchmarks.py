"""Rebuild the seven math benchmark files (math500, aime24, aime25, amc23, gsm8k, minerva_math, olympiadbench)
from their pinned public sources.

Why a script: the gold answers decide every pass@k we report, and the public copies need cleaning before a
symbolic grader can use them (AIME "025", AMC "27.0", GSM8K "2,125", Minerva "4.5e33" read by math-verify as
4.5*e*33, OlympiadBench "$a$,$b$"). This script is the one written-down derivation: pinned source files
(checked by git blob id), general cleaning rules as functions, and the few individual repairs as a table keyed
by row id that also records the source text each repair expects, so a changed source fails loudly instead of
being "repaired" wrongly. The output is byte-identical to the project's shared benchmark directory.

Usage:
    python scripts/prepare_benchmarks.py --out DATA_DIR                      # download at the pinned commits
    python scripts/prepare_benchmarks.py --out DATA_DIR --source-dir SRC     # SRC/<owner>/<repo>/<path>

Output: `<name>.jsonl` per benchmark (keys id, problem, answer, solution, source; see
nemo_quagmire/eval/benchmarks.py) and `SHA256SUMS`. Everything is built and validated in memory first; each
file is then replaced atomically, and other files in DATA_DIR are left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_quagmire.eval.benchmarks import FIELDS, STANDARD_BENCHMARKS
from nemo_quagmire.utils.errors import InputError, cli_main
from nemo_quagmire.utils.io import check_output_dir, write_outputs
from nemo_quagmire.utils.logging import configure_logging, get_logger

logger = get_logger("prepare_benchmarks")

DOWNLOAD_TIMEOUT_S = 60.0


class PrepareError(RuntimeError):
    """A source file is missing, altered or does not parse the way the rules below expect."""


@dataclass(frozen=True)
class SourceFile:
    """One pinned public file; `blob` is its git blob id (`git rev-parse COMMIT:PATH`)."""

    repo: str
    commit: str
    path: str
    blob: str

    @property
    def label(self) -> str:
        return f"{self.repo}:{self.path}"

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.path}"


_QWEN = ("QwenLM/Qwen2.5-Math", "a45202bd16f1ec06f433442dc1152d0074773465")
SOURCES: dict[str, SourceFile] = {
    "math500": SourceFile(
        "hkust-nlp/simpleRL-reason",
        "cf1c7858bfc145a27aa733e75d930d34f0d318a6",
        "examples/simplelr_math_eval/data/math500/test.jsonl",
        "2376b9a194b46c0790e197c91b7249e5f88ac09b",
    ),
    "aime24": SourceFile(
        *_QWEN, "evaluation/data/aime24/test.jsonl", "bb72e176e8d30c09cd67037e17cfc41e6ff48f70"
    ),
    "aime25": SourceFile(
        "NVIDIA-NeMo/Skills",
        "8b18f3992854bcb668095228a146e214c567b370",
        "nemo_skills/dataset/aime25/test.txt",  # JSON lines despite the name
        "c4b66af564ca4bcd419870dbef964d0ac98cdde9",
    ),
    "amc23": SourceFile(
        *_QWEN, "evaluation/data/amc23/test.jsonl", "6894ad7c49a0b3a64210af32954f4d049d934ea0"
    ),
    "gsm8k": SourceFile(
        *_QWEN, "evaluation/data/gsm8k/test.jsonl", "3e6e62b831b5fcbf0585d0dce75ccc5e4ccb691c"
    ),
    "minerva_math": SourceFile(
        *_QWEN, "evaluation/data/minerva_math/test.jsonl", "123c5cd351cac2b8ead5413bc084629d7ff651de"
    ),
    "olympiadbench": SourceFile(
        *_QWEN, "evaluation/data/olympiadbench/test.jsonl", "ec36280b1de8f5bbee92da696c2ae84f5f6e6beb"
    ),
}

# Individual repairs: row id -> (answer as extracted from the source, replacement). Applied instead of the
# general rules; a mismatch with the expected source text is an error.
REPAIRS: dict[str, tuple[str, str]] = {
    # Python syntax inside the box.
    "minerva_math-0005": ("np.arcsin(10/13)", r"\arcsin\left(\frac{10}{13}\right)"),
    "minerva_math-0038": ("-1./3", r"-\frac{1}{3}"),
    "minerva_math-0049": ("-3./2", r"-\frac{3}{2}"),
    # A stray "$ $" inside the box: the only row math-verify could not self-verify.
    "minerva_math-0072": (
        r"x_{0} \cos (\omega t)+$ $\dot{x}_{0} \sin (\omega t) / \omega",
        r"x_{0} \cos (\omega t)+\dot{x}_{0} \sin (\omega t) / \omega",
    ),
    # "m_max =" names the quantity; the answer is its value.
    "olympiadbench-1782": (r"$m_{\max }=n^{2}-n-1$", r"n^{2}-n-1"),
    # A sentence with inline math: the prose goes into \text{} so the whole answer is one LaTeX expression.
    "olympiadbench-1965": (
        r"$f(x)=a x+b$, where $b$ is an arbitrary integer, and $a$ is an arbitrary positive integer with "
        r"$\mho(a)=0$",
        r"f(x)=a x+b\text{, where }b\text{ is an arbitrary integer, and }a\text{ is an arbitrary positive "
        r"integer with }\mho(a)=0",
    ),
    "olympiadbench-2045": (r"$t(0,4]$", r"(0,4]"),  # stray "t" before the interval
    "olympiadbench-2349": (r"$221,$8$", r"221, 8"),  # unbalanced "$"
    "olympiadbench-2891": (r"$\quad(2+\sqrt{2}, 1+\sqrt{2})$", r"(2+\sqrt{2}, 1+\sqrt{2})"),  # leading \quad
}


@dataclass(frozen=True)
class Extracted:
    """A source row mapped to the output fields, `answer` still as the source writes it."""

    id: str
    problem: str
    answer: str
    solution: str


# ---------------------------------------------------------------------------------------------------------
# General answer rules


def strip_leading_zeros(answer: str) -> str:
    """AIME answers are integers 0-999 written with leading zeros in some sources: "025" -> "25"."""
    if not answer.isdigit():
        raise PrepareError(f"AIME answer {answer!r} is not a non-negative integer")
    return str(int(answer))


def remove_thousands_separators(answer: str) -> str:
    """Drop thousands separators, "2,125" -> "2125": math-verify reads "2,125" as the set {2, 125}."""
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer):
        return answer.replace(",", "")
    return answer


def e_notation_to_latex(answer: str) -> str:
    """Write e-notation as a LaTeX power of ten, mantissa as written: "4.5e33" -> "4.5 \\times 10^{33}".

    math-verify reads "4.5e33" as 4.5*e*33 (Euler's e), which only a prediction written the same way matches.
    """
    match = re.fullmatch(r"(-?\d+(?:\.\d+)?)e([+-]?\d+)", answer)
    if match is None:
        return answer
    mantissa, exponent = match.groups()
    return f"{mantissa} \\times 10^{{{int(exponent)}}}"


def unwrap_dollar_segments(answer: str) -> str:
    """Unwrap `$...$` segments: "$a$,$b$" -> "a, b", "$x$" -> "x"; anything else is left alone."""
    if re.fullmatch(r"\$[^$]+\$(\s*,\s*\$[^$]+\$)*", answer):
        return ", ".join(segment.strip() for segment in re.findall(r"\$([^$]+)\$", answer))
    return answer


def drop_trailing_period(answer: str) -> str:
    """Drop a sentence's full stop: "(-\\infty, 0) \\cup\\{1\\}." -> "(-\\infty, 0) \\cup\\{1\\}"."""
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def escape_percent(answer: str) -> str:
    """Escape a bare percent sign, "62.5%" -> "62.5\\%": in LaTeX a bare % starts a comment."""
    return re.sub(r"(?<!\\)%", r"\\%", answer)


def clean_olympiadbench(answer: str) -> str:
    return escape_percent(unwrap_dollar_segments(drop_trailing_period(answer)))


# ---------------------------------------------------------------------------------------------------------
# Per-source extraction (fields, ids, answer as written)


def last_boxed(text: str) -> str:
    """Content of the last `\\boxed{...}`, matching braces (escaped `\\{`, `\\}` do not count)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        raise PrepareError("no \\boxed{} in the solution")
    depth, i = 1, start + len("\\boxed{")
    begin = i
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    raise PrepareError("unbalanced braces in the last \\boxed{}")


def _numbered_id(benchmark: str, number: Any) -> str:
    if isinstance(number, str):  # NeMo-Skills writes "aime25-7"
        number = number.rsplit("-", 1)[-1]
    return f"{benchmark}-{int(number):04d}"


def extract_math500(row: dict) -> Extracted:
    return Extracted(row["unique_id"], row["problem"], row["answer"], row["solution"])


def extract_aime24(row: dict) -> Extracted:
    return Extracted(_numbered_id("aime24", row["id"]), row["problem"], row["answer"], row["solution"])


def extract_aime25(row: dict) -> Extracted:
    answer = row["expected_answer"]
    return Extracted(_numbered_id("aime25", row["id"]), row["problem"], answer, row["reference_solution"])


def extract_amc23(row: dict) -> Extracted:
    answer = row["answer"]
    if not isinstance(answer, (int, float)) or not float(answer).is_integer():
        raise PrepareError(f"AMC answer {answer!r} is not an integral number")
    return Extracted(_numbered_id("amc23", row["id"]), row["problem"], str(int(answer)), "")


def extract_gsm8k(row: dict) -> Extracted:
    if "####" not in row["answer"]:
        raise PrepareError("no '####' before the final answer")
    solution, answer = row["answer"].rsplit("####", 1)
    solution = re.sub(r"<<.*?>>", "", solution)  # calculator annotations: "= <<9*2=18>>18" -> "= 18"
    return Extracted(_numbered_id("gsm8k", row["idx"]), row["question"], answer, solution)


def extract_minerva_math(row: dict) -> Extracted:
    answer = last_boxed(row["solution"])
    return Extracted(_numbered_id("minerva_math", row["idx"]), row["problem"], answer, row["solution"])


def extract_olympiadbench(row: dict) -> Extracted:
    if not (isinstance(row["final_answer"], list) and len(row["final_answer"]) == 1):
        raise PrepareError(f"final_answer must be a one-element list, got {row['final_answer']!r}")
    solution = "\n\n".join(part.strip() for part in row["solution"])  # alternative solutions
    return Extracted(
        _numbered_id("olympiadbench", row["id"]), row["question"], row["final_answer"][0], solution
    )


@dataclass(frozen=True)
class Recipe:
    extract: Callable[[dict], Extracted]
    clean: Callable[[str], str]


def _unchanged(answer: str) -> str:
    return answer


RECIPES: dict[str, Recipe] = {
    "math500": Recipe(extract_math500, _unchanged),
    "aime24": Recipe(extract_aime24, strip_leading_zeros),
    "aime25": Recipe(extract_aime25, _unchanged),
    "amc23": Recipe(extract_amc23, _unchanged),
    "gsm8k": Recipe(extract_gsm8k, remove_thousands_separators),
    "minerva_math": Recipe(extract_minerva_math, e_notation_to_latex),
    "olympiadbench": Recipe(extract_olympiadbench, clean_olympiadbench),
}


# ---------------------------------------------------------------------------------------------------------
# Build, validate, write


def git_blob_id(data: bytes) -> str:
    """The id git gives a file with this content (sha1 of "blob <size>\\0" + content)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read_source(source: SourceFile, source_dir: Path | None, check_blob: bool = True) -> bytes:
    """The source file's bytes, from `source_dir/<owner>/<repo>/<path>` or downloaded at the pinned commit."""
    if source_dir is not None:
        path = source_dir / source.repo / source.path
        if not path.is_file():
            raise PrepareError(f"missing source file {path} ({source.label} at commit {source.commit})")
        data, origin = path.read_bytes(), str(path)
    else:
        logger.info("downloading %s", source.url)
        with urllib.request.urlopen(source.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data, origin = response.read(), source.url
    if check_blob and git_blob_id(data) != source.blob:
        raise PrepareError(
            f"{origin}: git blob id {git_blob_id(data)} differs from the pinned {source.blob} "
            f"({source.label} at commit {source.commit}); the rules here were checked on the pinned file only"
        )
    return data


def build_benchmark(name: str, data: bytes, used_repairs: set[str]) -> list[dict[str, str]]:
    """Source file bytes -> output rows (keys in `FIELDS` order), in source order."""
    recipe, source = RECIPES[name], SOURCES[name]
    rows: list[dict[str, str]] = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        where = f"{source.label}:{lineno}"
        try:
            ex = recipe.extract(json.loads(line))
        except (PrepareError, KeyError, TypeError, ValueError) as err:
            raise PrepareError(f"{where}: {type(err).__name__}: {err}") from err
        raw = ex.answer.strip()
        if ex.id in REPAIRS:
            expected, answer = REPAIRS[ex.id]
            if raw != expected:
                raise PrepareError(
                    f"{where}: repair for {ex.id} expects answer {expected!r}, source has {raw!r}"
                )
            used_repairs.add(ex.id)
        else:
            try:
                answer = recipe.clean(raw)
            except PrepareError as err:
                raise PrepareError(f"{where}: {ex.id}: {err}") from err
        if answer != raw:
            logger.debug("%s: answer %r -> %r", ex.id, raw, answer)
        row = {"id": ex.id, "problem": ex.problem.strip(), "answer": answer, "solution": ex.solution.strip()}
        rows.append({**row, "source": source.label})
    validate_rows(name, rows)
    return rows


def validate_rows(name: str, rows: list[dict[str, str]]) -> None:
    """The checks the benchmark README promises: keys, non-empty text, no `$` in answers, no duplicates."""
    if not rows:
        raise PrepareError(f"{name}: no rows")
    seen_ids: set[str] = set()
    seen_problems: dict[str, str] = {}
    for row in rows:
        assert tuple(row) == FIELDS
        if not row["problem"] or not row["answer"]:
            raise PrepareError(f"{name}: {row['id']}: empty problem or answer")
        if re.search(r"(?<!\\)\$", row["answer"]):
            raise PrepareError(f"{name}: {row['id']}: answer {row['answer']!r} still has a '$'; add a repair")
        if row["id"] in seen_ids:
            raise PrepareError(f"{name}: duplicate id {row['id']}")
        if row["problem"] in seen_problems:
            raise PrepareError(f"{name}: {row['id']} repeats the problem of {seen_problems[row['problem']]}")
        seen_ids.add(row["id"])
        seen_problems[row["problem"]] = row["id"]


def to_jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def prepare(out: Path, source_dir: Path | None, check_blobs: bool = True) -> dict[str, int]:
    """Build all seven files in memory, then write them and `SHA256SUMS` to `out`; returns row counts."""
    files: dict[str, bytes] = {}
    used_repairs: set[str] = set()
    for name in STANDARD_BENCHMARKS:
        rows = build_benchmark(name, read_source(SOURCES[name], source_dir, check_blobs), used_repairs)
        files[f"{name}.jsonl"] = to_jsonl(rows)
        logger.info("%s: %d rows", name, len(rows))
    if unused := sorted(set(REPAIRS) - used_repairs):
        raise PrepareError(f"repairs for ids not found in the sources: {unused}")
    sums = "".join(f"{hashlib.sha256(files[n]).hexdigest()}  {n}\n" for n in sorted(files))
    write_outputs(out, {**files, "SHA256SUMS": sums.encode()})
    logger.info("wrote %d benchmark files and SHA256SUMS to %s", len(files), out)
    return {name.removesuffix(".jsonl"): content.count(b"\n") for name, content in files.items()}


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0 done, 1 a source file is missing or altered, 2 bad arguments, 130 Ctrl-C."""
    return cli_main(lambda: _prepare_main(argv))


def _prepare_main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument(
        "--source-dir",
        type=Path,
        help="local copies laid out as <owner>/<repo>/<path>; default: download at the pinned commits",
    )
    parser.add_argument(
        "--no-blob-check",
        action="store_true",
        help="accept source files whose git blob id differs from the pinned one (tests on small fixtures)",
    )
    args = parser.parse_args(argv)
    configure_logging()
    check_output_dir(args.out, "--out")
    if args.source_dir is not None and not args.source_dir.is_dir():
        raise InputError(f"--source-dir {args.source_dir} is not a directory")
    try:
        prepare(args.out, args.source_dir, check_blobs=not args.no_blob_check)
    except (PrepareError, OSError) as err:
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
