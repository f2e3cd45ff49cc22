"""Math benchmarks as validated `Problem` records, and the prompt that asks for a `\\boxed{}` answer.

Why a strict loader: pass@k over thousands of samples is only as good as the gold answers and ids behind it.
A silently skipped row, a duplicated id or a gold answer that is an empty string shifts every metric without
an error, so every row is checked and every error names `file:line`.

Data layout: one `<name>.jsonl` per benchmark in a data directory, one JSON object per line with exactly the
string keys `id, problem, answer, solution, source` (the format `scripts/prepare_benchmarks.py` writes). The
seven standard benchmarks are `STANDARD_BENCHMARKS`; any other `<name>.jsonl` with the same schema in the
directory (a synthetic task, a user's own set) loads the same way. The directory is the `data_dir` argument
or, if that is None, the environment variable `NEMO_QUAGMIRE_BENCHMARKS_DIR` (`BENCHMARKS_DIR_ENV`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nemo_quagmire.utils.errors import InputError
from nemo_quagmire.utils.json_lines import iter_lines, parse_json_line

BENCHMARKS_DIR_ENV = "NEMO_QUAGMIRE_BENCHMARKS_DIR"
STANDARD_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "gsm8k", "minerva_math", "olympiadbench")
FIELDS = ("id", "problem", "answer", "solution", "source")
PREPARE_HINT = "create it with `python scripts/prepare_benchmarks.py --out DIR`"

# Qwen2.5-Math's instruction: widely used for these benchmarks, and the grader reads the last \boxed{}.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PromptTemplate = Literal["plain", "chat"]


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")  # a file name in the directory, never a path


class BenchmarkError(InputError):
    """A benchmark file or name is invalid (the message names the file:line or the bad name)."""


class MissingBenchmarksError(BenchmarkError, FileNotFoundError):
    """The benchmark directory or a standard benchmark's file does not exist."""


@dataclass(frozen=True)
class Problem:
    """One benchmark row. `answer` is the gold final answer (LaTeX without `$`); `solution` may be empty."""

    benchmark: str
    id: str
    problem: str
    answer: str
    solution: str


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The benchmark directory: `data_dir` if given, else `$NEMO_QUAGMIRE_BENCHMARKS_DIR`.

    Raises:
        FileNotFoundError: neither is set, or the directory does not exist.
    """
    if data_dir is None:
        env = os.environ.get(BENCHMARKS_DIR_ENV)
        if not env:
            raise MissingBenchmarksError(
                f"no benchmark directory: pass data_dir or set {BENCHMARKS_DIR_ENV}; {PREPARE_HINT}"
            )
        data_dir = env
    path = Path(data_dir)
    if not path.is_dir():
        raise MissingBenchmarksError(f"benchmark directory {path} does not exist; {PREPARE_HINT}")
    return path


def available_benchmarks(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the `<name>.jsonl` files in the data directory: standard ones first (in standard order)."""
    names = {p.stem for p in resolve_data_dir(data_dir).glob("*.jsonl")}
    return [n for n in STANDARD_BENCHMARKS if n in names] + sorted(names - set(STANDARD_BENCHMARKS))


def check_benchmark_name(name: str) -> str:
    """`name` if it can only name a file inside the benchmark directory (no separator, no `..`, not absolute).

    Raises:
        BenchmarkError: it could reach a file elsewhere.
    """
    if not _NAME.match(name):
        raise BenchmarkError(
            f"benchmark name {name!r} is not a plain name (letters, digits, _ . + -, no path separators): "
            "benchmarks are <name>.jsonl files inside the benchmarks directory; put the file there and pass "
            "its name"
        )
    return name


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """Load and validate `<data_dir>/<name>.jsonl`, rows in file order.

    Raises:
        FileNotFoundError: the directory, or the file of a standard benchmark, is missing.
        BenchmarkError: `name` is not a plain name, is neither standard nor a file in the directory, or a row
            is invalid.
    """
    check_benchmark_name(name)
    root = resolve_data_dir(data_dir)
    path = root / f"{name}.jsonl"
    if not path.is_file():
        if name in STANDARD_BENCHMARKS:
            raise MissingBenchmarksError(f"benchmark file {path} does not exist; {PREPARE_HINT}")
        raise BenchmarkError(
            f"unknown benchmark {name!r}: no {path.name} in {root}; available: "
            f"{', '.join(available_benchmarks(root)) or 'none'}"
        )
    return parse_benchmark(path, name)


def load_benchmarks(
    names: Sequence[str] | None = None, data_dir: str | os.PathLike | None = None
) -> dict[str, list[Problem]]:
    """Load several benchmarks (default: the seven `STANDARD_BENCHMARKS`), keyed by name in given order."""
    names = STANDARD_BENCHMARKS if names is None else names
    root = resolve_data_dir(data_dir)
    return {name: load_benchmark(name, root) for name in names}


def parse_benchmark(path: str | os.PathLike, benchmark: str) -> list[Problem]:
    """Parse one benchmark JSONL file, checking every row; errors name `path:line`."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    problems: list[Problem] = []
    first_line_of: dict[str, int] = {}
    for lineno, (where, line) in enumerate(iter_lines(path, BenchmarkError), start=1):
        row = _parse_row(line, where)
        if row["id"] in first_line_of:
            raise BenchmarkError(
                f"{where}: duplicate id {row['id']!r} (first on line {first_line_of[row['id']]})"
            )
        first_line_of[row["id"]] = lineno
        problems.append(Problem(benchmark, row["id"], row["problem"], row["answer"], row["solution"]))
    if not problems:
        raise BenchmarkError(f"{path}: no problems in the file")
    return problems


def _parse_row(line: str, where: str) -> dict[str, str]:
    row: Any = parse_json_line(line, where, BenchmarkError)
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing, extra = set(FIELDS) - row.keys(), row.keys() - set(FIELDS)
    if missing or extra:
        raise BenchmarkError(
            f"{where}: keys must be exactly {list(FIELDS)}; "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for key in FIELDS:
        if not isinstance(row[key], str):
            raise BenchmarkError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    for key in ("id", "problem", "answer"):
        if not row[key].strip():
            raise BenchmarkError(f"{where}: {key!r} is empty")
    return row


def format_prompt(
    problem: Problem | str, template: PromptTemplate = "chat", tokenizer: Any | None = None
) -> str | list[dict[str, str]]:
    """The prompt asking for step-by-step reasoning and a final `\\boxed{}` answer.

    Args:
        problem: a `Problem` or the problem text.
        template: "chat" -> one user message `[{"role": "user", "content": problem + "\\n" + INSTRUCTION}]`
            for instruction-tuned models; "plain" -> `"Problem:\\n...\\n\\n<INSTRUCTION>\\n\\nSolution:"` for
            base models, ending in the cue the model continues from.
        tokenizer: with "chat", a Hugging Face tokenizer whose `apply_chat_template` renders the messages into
            one string with the assistant generation prompt appended.

    Returns:
        A string ("plain", or "chat" with a tokenizer) or the list of chat messages.
    """
    text = problem.problem if isinstance(problem, Problem) else problem
    if template == "plain":
        if tokenizer is not None:
            raise ValueError("format_prompt: a tokenizer applies to template='chat' only, not 'plain'")
        return f"Problem:\n{text}\n\n{INSTRUCTION}\n\nSolution:"
    if template == "chat":
        messages = [{"role": "user", "content": f"{text}\n{INSTRUCTION}"}]
        if tokenizer is None:
            return messages
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"format_prompt: unknown template {template!r}; use 'plain' or 'chat'")
