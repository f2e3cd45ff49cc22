"""Grade sampled completions against benchmark gold answers; write per-sample results and pass@k / maj@k.

Usage:
    python scripts/grade.py --samples S.jsonl --benchmarks-dir DIR --out OUT \
        [--k 1,2,4] [--workers N] [--timeout S]
    python scripts/grade.py --samples scripts/examples/samples.jsonl \
        --benchmarks-dir scripts/examples/benchmarks --out runs/grade-example

Input: JSON lines `{"benchmark": "aime24", "id": "aime24-0060", "completion": "..."}`; `benchmark` names
DIR/<benchmark>.jsonl (see nemo_quagmire/eval/benchmarks.py), `id` a problem in it; other keys are kept.
Problems may have different numbers of samples. Without --k, k runs over the powers of two up to the smallest
per-problem n; an explicit k larger than some problem's n is an error.

Output (both written atomically, only after every line was validated and graded):
    OUT/graded.jsonl  the input records in input order plus "correct", "extracted" (the content of the
                      last \\boxed{}, or null) and "reason" (correct/wrong/no_answer/timeout/error); keys
                      of those names in the input are replaced
    OUT/metrics.json  per-benchmark and macro metrics (see nemo_quagmire/eval/grading.py)
A summary table goes to stdout. Exit code 2 on bad input (every problem named by file:line; nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from nemo_quagmire.eval.benchmarks import BenchmarkError, Problem, load_benchmark
from nemo_quagmire.eval.grading import GradedSample, compute_metrics, format_metrics_table, resolve_ks
from nemo_quagmire.rewards.math_grader import MathGrader
from nemo_quagmire.rewards.pool import check_num_workers, usable_cpus
from nemo_quagmire.utils import errors
from nemo_quagmire.utils.io import check_output_dir, write_outputs
from nemo_quagmire.utils.json_lines import iter_lines, parse_json_line
from nemo_quagmire.utils.logging import configure_logging, get_logger

logger = get_logger("grade")

REQUIRED_KEYS = ("benchmark", "id", "completion")
MAX_REPORTED_ERRORS = 20


class InputError(errors.InputError):
    """The samples file (or the benchmark data it refers to) is invalid; the message lists every problem."""


def read_samples(path: Path, benchmarks_dir: Path) -> tuple[list[dict], list[Problem]]:
    """Parse and validate every line of the samples file.

    Returns:
        The records in file order and, aligned with them, the benchmark problem each one answers.

    Raises:
        InputError: listing each bad line as `file:line: problem` (the first `MAX_REPORTED_ERRORS`).
    """
    if not path.is_file():
        raise InputError(f"samples file {path} does not exist or is not a file")
    benchmarks: dict[str, dict[str, Problem] | str] = {}  # name -> problems by id, or why it cannot load
    records: list[dict] = []
    problems: list[Problem] = []
    errors: list[str] = []
    num_lines = 0
    for where, line in iter_lines(path, InputError):
        num_lines += 1
        try:
            record = parse_json_line(line, where, InputError)
        except InputError as err:
            errors.append(str(err))
            continue
        if not isinstance(record, dict):
            errors.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        if missing := [key for key in REQUIRED_KEYS if key not in record]:
            errors.append(f"{where}: missing key(s) {missing}; each line needs {list(REQUIRED_KEYS)}")
            continue
        if wrong := [key for key in REQUIRED_KEYS if not isinstance(record[key], str)]:
            found = ", ".join(f"{key!r} is {type(record[key]).__name__}" for key in wrong)
            errors.append(f"{where}: {found}; {list(REQUIRED_KEYS)} must be strings")
            continue
        name = record["benchmark"]
        if name not in benchmarks:
            try:
                benchmarks[name] = {p.id: p for p in load_benchmark(name, benchmarks_dir)}
            except (BenchmarkError, FileNotFoundError) as err:
                benchmarks[name] = str(err)
        known = benchmarks[name]
        if isinstance(known, str):
            errors.append(f"{where}: {known}")
        elif record["id"] not in known:
            errors.append(f"{where}: no problem with id {record['id']!r} in benchmark {name!r}")
        else:
            records.append(record)
            problems.append(known[record["id"]])
    if not num_lines:
        errors.append(f"{path}: no samples in the file")
    for name, known in benchmarks.items():
        covered = len({p.id for p in problems if p.benchmark == name})
        if not isinstance(known, str) and covered < len(known):
            logger.info("%s: samples cover %d of its %d problems", name, covered, len(known))
    if errors:
        more = len(errors) - MAX_REPORTED_ERRORS
        raise InputError(
            f"{len(errors)} invalid line(s) in {path}:\n"
            + "\n".join(errors[:MAX_REPORTED_ERRORS])
            + (f"\n... and {more} more" if more > 0 else "")
        )
    return records, problems


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,2,4, got {text!r}"
        ) from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"ks must be positive integers, got {text!r}")
    return ks


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0 done, 2 bad input (message on stderr, nothing written), 130 Ctrl-C."""
    return errors.cli_main(lambda: _grade(argv))


def _grade(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=Path, required=True, help="JSONL of {benchmark, id, completion}")
    parser.add_argument("--benchmarks-dir", type=Path, required=True, help="directory of <benchmark>.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument(
        "--k", type=_parse_ks, help="ks for pass@k/maj@k, e.g. 1,2,4 (default: powers of two)"
    )
    parser.add_argument(
        "--workers", type=_positive(int), default=usable_cpus(), help="grading processes (<= the CPUs)"
    )
    parser.add_argument(
        "--timeout", type=_positive(float), default=5.0, help="seconds per sample before it counts as wrong"
    )
    args = parser.parse_args(argv)
    configure_logging()

    check_num_workers(args.workers, "--workers")
    check_output_dir(args.out, "--out")
    records, problems = read_samples(args.samples, args.benchmarks_dir)
    try:
        ks = resolve_ks(Counter((p.benchmark, p.id) for p in problems), args.k)
    except ValueError as err:
        raise InputError(str(err)) from None
    logger.info(
        "grading %d samples of %d problems", len(records), len({(p.benchmark, p.id) for p in problems})
    )

    with (
        MathGrader(num_workers=args.workers, timeout_s=args.timeout) as grader,
        tqdm(total=len(records), unit="sample", disable=not sys.stderr.isatty()) as bar,
    ):
        results = grader.grade(
            [p.answer for p in problems],
            [r["completion"] for r in records],
            problem_keys=[f"{p.benchmark}/{p.id}" for p in problems],
            progress=bar.update,
        )
    if failed := Counter(r.reason for r in results if r.reason in ("timeout", "error")):
        logger.warning("graded as wrong because grading failed: %s", dict(failed))

    samples = [
        GradedSample(p.benchmark, p.id, r.correct, r.extracted)
        for p, r in zip(problems, results, strict=True)
    ]
    metrics = compute_metrics(samples, ks)
    graded = [
        {**record, "correct": r.correct, "extracted": r.extracted, "reason": r.reason}
        for record, r in zip(records, results, strict=True)
    ]
    write_outputs(
        args.out,
        {
            "graded.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in graded),
            "metrics.json": json.dumps(metrics, indent=2) + "\n",
        },
    )
    logger.info("wrote %s and %s", args.out / "graded.jsonl", args.out / "metrics.json")
    print(format_metrics_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
