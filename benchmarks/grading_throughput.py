"""Grading throughput: `MathGrader` against a naive math-verify loop on the same samples, and pass@k's cost.

Why: pass@256 on the seven benchmarks is 734k samples; at math-verify's ~92 verifications per second the
naive loop `verify(parse(gold_boxed), parse(completion))` takes two CPU-hours. This script measures, in one
run on this machine, what `MathGrader` (answer extraction, per-problem dedupe, parent-side plain numbers,
worker processes) makes of it, and checks that both give the same verdicts:

  (a) pass@256-style samples: per problem, completions whose `\\boxed{}` answers repeat, drawn from a small
      pool (the gold, a rewrite of it, a few wrong variants), plus 3% cut-off completions with no box;
  (b) every answer distinct and none a plain number (`18 \\text{ units}` instead of `18`), so every sample
      goes through math-verify in a worker: the case where only the process pool helps;
  (c) `pass_at_k` for every k <= 256 over all problems, from the verdicts of (a).

The naive loop is far too slow for all samples, so it is timed on a subsample: for each benchmark a few
random problems, each with a run of consecutive samples (as a naive loop meets them, so math-verify's own
small caches help it as they would), and its time for all samples is extrapolated per benchmark from that
benchmark's rate. A subsample tends to miss the rare answers that take seconds (the grader's timeouts are
listed), so the naive time is if anything underestimated. Verdict mismatches are counted on the subsample;
cut-off completions are counted apart, since the naive loop grades whatever number it finds in them and the
grader, by design, does not. Wall-clock speedups suffer when other processes share the CPUs (the two workers
lose more to them than the one naive process, and deadlines can fire), so the load average and the speedup
in CPU seconds (this process, the workers and the forkserver) are printed too.

Run:  python benchmarks/grading_throughput.py [--quick] [--benchmarks-dir DIR]  (defaults take ~2-3 min)
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from math_verify import parse, verify

from nemo_quagmire.eval.benchmarks import STANDARD_BENCHMARKS, load_benchmark
from nemo_quagmire.eval.passk import pass_at_k
from nemo_quagmire.rewards import MathGrader

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = Path(os.environ.get("NEMO_QUAGMIRE_BENCHMARKS_DIR", REPO.parent / "shared" / "benchmarks"))
PLAIN_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
DIGIT = re.compile(r"\d")
NO_ANSWER_RATE = 0.03

REASONING = [
    "Let's think step by step. First, {a} + {b} = {c}, and subtracting {d} leaves {e}.",
    "We set up the equation {a}x + {b} = {c} and solve it for x, which gives x = {e}/{d}.",
    "Expanding the product gives terms of degree {a} and {b}; collecting like terms, the coefficient is {c}.",
    "By symmetry the two cases contribute {a} and {b}, a total of {c} before the correction of {d}.",
    "Checking small cases: n = {a} gives {b}, n = {d} gives {c}, which suggests the pattern continues.",
]
FINISH = [
    "Therefore, the final answer is $\\boxed{{{answer}}}$.",
    "So the answer is \\boxed{{{answer}}}.",
    "\n\n**Final Answer**\n\\[\n\\boxed{{{answer}}}\n\\]",
    "At first I got \\boxed{{{draft}}}, but rechecking the arithmetic above shows a slip in the last step. "
    "Hence the answer is $\\boxed{{{answer}}}$.",
]


@dataclass
class SampleSet:
    """Samples in problem order: a problem's samples are consecutive."""

    benchmark: list[str] = field(default_factory=list)
    key: list[tuple[str, str]] = field(default_factory=list)
    gold: list[str] = field(default_factory=list)
    completion: list[str] = field(default_factory=list)
    boxed: list[bool] = field(default_factory=list)

    def add(self, benchmark: str, problem_id: str, gold: str, completion: str, boxed: bool) -> None:
        self.benchmark.append(benchmark)
        self.key.append((benchmark, problem_id))
        self.gold.append(gold)
        self.completion.append(completion)
        self.boxed.append(boxed)


def wrong_variants(gold: str, count: int) -> list[str]:
    """`count` distinct answers that differ from the gold in one digit (last digits first), or by a "+k"."""
    variants: list[str] = []
    for position in reversed([m.start() for m in DIGIT.finditer(gold)]):
        for delta in range(1, 10):
            variant = gold[:position] + str((int(gold[position]) + delta) % 10) + gold[position + 1 :]
            if variant not in variants:
                variants.append(variant)
            if len(variants) == count:
                return variants
    variants += [f"{gold}+{k}" for k in range(1, count - len(variants) + 1)]
    return variants


def rewrite(gold: str) -> str | None:
    """The gold written another way a model might write it, if there is an obvious one."""
    if PLAIN_NUMBER.fullmatch(gold):
        return f"{int(gold):,}" if "." not in gold and abs(int(gold)) >= 1000 else f"{gold}.0"
    for old, new in (("\\frac", "\\dfrac"), (" ", ""), ("\\left", "")):
        if old in gold:
            return (
                gold.replace(old, new).replace("\\right", "") if old == "\\left" else gold.replace(old, new)
            )
    return None


def completion(rng: random.Random, answer: str | None, draft: str) -> str:
    """A short worked solution ending in `\\boxed{answer}`, or cut off before any box if `answer` is None."""
    numbers = {name: rng.randint(2, 999) for name in "abcde"}
    text = " ".join(rng.choice(REASONING).format(**numbers) for _ in range(rng.randint(2, 4)))
    if answer is None:
        return text[: rng.randint(len(text) // 2, len(text))]
    return text + " " + rng.choice(FINISH).format(answer=answer, draft=draft)


def repeated_answer_samples(problems: dict, samples_per_problem: int, rng: random.Random) -> SampleSet:
    """(a): per problem, answers drawn from [gold, rewrite, 3 wrong variants] with a per-problem skew."""
    samples = SampleSet()
    for bench, rows in problems.items():
        for row in rows:
            wrong = wrong_variants(row.answer, 3)
            pool = [row.answer] + ([r] if (r := rewrite(row.answer)) else []) + wrong
            solve_rate = rng.random()  # this problem's difficulty for this imaginary model
            right_weights = [0.8, 0.2] if len(pool) == 5 else [1.0]
            weights = [solve_rate * w for w in right_weights] + [
                (1 - solve_rate) * w for w in (0.6, 0.3, 0.1)
            ]
            for answer in rng.choices(pool, weights, k=samples_per_problem):
                boxed = rng.random() >= NO_ANSWER_RATE
                text = completion(rng, answer if boxed else None, draft=wrong[-1])
                samples.add(bench, row.id, row.answer, text, boxed)
    return samples


def distinct_answer_samples(problems: dict, answers_per_problem: int, rng: random.Random) -> SampleSet:
    """(b): per problem, `answers_per_problem` distinct answers, none a plain number (units appended)."""
    samples = SampleSet()
    for bench, rows in problems.items():
        for row in rows:
            answers = [row.answer] + wrong_variants(row.answer, answers_per_problem - 1)
            for answer in answers:
                if PLAIN_NUMBER.fullmatch(answer):
                    answer += " \\text{ units}"
                samples.add(bench, row.id, row.answer, completion(rng, answer, draft="0"), True)
    return samples


def naive_subsample(
    samples: SampleSet, problems_per_benchmark: int, run: int, rng: random.Random
) -> list[int]:
    """Indices of `run` consecutive samples from each of a few random problems of every benchmark."""
    starts: dict[tuple[str, str], int] = {}
    for index, key in enumerate(samples.key):
        starts.setdefault(key, index)
    indices = []
    for bench in dict.fromkeys(samples.benchmark):
        keys = [key for key in starts if key[0] == bench]
        for key in rng.sample(keys, min(problems_per_benchmark, len(keys))):
            start = starts[key]
            indices += [
                i for i in range(start, start + run) if i < len(samples.key) and samples.key[i] == key
            ]
    return indices


@dataclass
class Row:
    part: str
    samples: int
    distinct: str
    naive_measured: str
    naive_total_s: float  # extrapolated to all samples
    naive_total_cpu_s: float
    grader_s: float
    grader_cpu_s: float  # this process and the workers
    mismatches: str

    def cells(self) -> list[str]:
        return [
            self.part,
            f"{self.samples:,}",
            self.distinct,
            self.naive_measured,
            f"{self.naive_total_s:,.0f} s ({self.samples / self.naive_total_s:,.0f}/s)",
            f"{self.grader_s:,.1f} s ({self.samples / self.grader_s:,.0f}/s)",
            f"**{self.naive_total_s / self.grader_s:,.1f}x**",
            f"{self.naive_total_cpu_s / self.grader_cpu_s:,.1f}x",
            self.mismatches,
        ]


def cpu_seconds() -> float:
    """CPU time used so far by this process and its descendants, including workers killed and reaped by
    the forkserver (counted in its children's times)."""
    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def measure(
    part: str, samples: SampleSet, grader: MathGrader, naive_indices: Sequence[int]
) -> tuple[Row, list]:
    """Grade all samples with `grader`, then the subsample with the naive loop; compare and extrapolate."""
    cpu_start, start = cpu_seconds(), time.perf_counter()
    results = grader.grade(samples.gold, samples.completion, problem_keys=samples.key)
    grader_s, grader_cpu_s = time.perf_counter() - start, cpu_seconds() - cpu_start
    stats = grader.last_stats

    naive_time: Counter[str] = Counter()
    naive_cpu: Counter[str] = Counter()
    naive_count: Counter[str] = Counter()
    mismatches = no_box_credited = no_box = timed_out = 0
    for i in naive_indices:
        bench = samples.benchmark[i]
        cpu_start, start = time.process_time(), time.perf_counter()
        verdict = verify(parse("\\boxed{" + samples.gold[i] + "}"), parse(samples.completion[i]))
        naive_time[bench] += time.perf_counter() - start
        naive_cpu[bench] += time.process_time() - cpu_start
        naive_count[bench] += 1
        if not samples.boxed[i]:
            no_box += 1
            no_box_credited += verdict
        elif results[i].reason == "timeout":
            timed_out += 1
        elif verdict != results[i].correct:
            mismatches += 1
            print(f"MISMATCH {samples.key[i]}: naive {verdict}, grader {results[i]}", file=sys.stderr)
    totals = Counter(samples.benchmark)
    measured = len(naive_indices)
    row = Row(
        part=part,
        samples=len(samples.gold),
        distinct=f"{stats.num_distinct:,} ({stats.num_fast_path:,} / {stats.num_checked:,}); "
        f"{stats.num_timeout} timed out",
        naive_measured=f"{measured} in {sum(naive_time.values()):.1f} s",
        naive_total_s=sum(totals[b] * naive_time[b] / naive_count[b] for b in naive_count),
        naive_total_cpu_s=sum(totals[b] * naive_cpu[b] / naive_count[b] for b in naive_count),
        grader_s=grader_s,
        grader_cpu_s=grader_cpu_s,
        mismatches=f"**{mismatches}** of {measured - no_box - timed_out}"
        + (f" (no box: naive credits {no_box_credited} of {no_box})" if no_box else "")
        + (f" ({timed_out} timed out)" if timed_out else ""),
    )
    return row, results


def time_pass_at_k(results: list, samples: SampleSet, max_k: int, repeats: int = 3) -> tuple[int, int, float]:
    """(problems, ks, best seconds) for pass_at_k at every k <= max_k over the problems of `samples`."""
    index = {key: i for i, key in enumerate(dict.fromkeys(samples.key))}
    num_samples = np.zeros(len(index), dtype=np.int64)
    num_correct = np.zeros(len(index), dtype=np.int64)
    for key, result in zip(samples.key, results, strict=True):
        num_samples[index[key]] += 1
        num_correct[index[key]] += result.correct
    ks = range(1, min(max_k, int(num_samples.min())) + 1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for k in ks:
            pass_at_k(num_samples, num_correct, k)
        best = min(best, time.perf_counter() - start)
    return len(index), len(ks), best


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmarks-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--samples-per-problem", type=int, default=256, help="(a) samples per problem")
    parser.add_argument("--distinct-per-problem", type=int, default=4, help="(b) answers per problem")
    parser.add_argument(
        "--problems-per-benchmark", type=int, default=None, help="first N of each (default all)"
    )
    parser.add_argument("--naive-problems", type=int, default=3, help="naive loop: problems per benchmark")
    parser.add_argument(
        "--naive-run", type=int, default=48, help="naive loop: consecutive samples per problem"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 20 problems per benchmark, fewer samples"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.problems_per_benchmark, args.samples_per_problem, args.distinct_per_problem = 20, 32, 2
        args.naive_problems, args.naive_run = 1, 16
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for name in ("math_verify", "latex2sympy2_extended"):  # the naive loop gets the same quiet logs
        logging.getLogger(name).setLevel(logging.ERROR)
    problems = {
        name: load_benchmark(name, args.benchmarks_dir)[: args.problems_per_benchmark]
        for name in STANDARD_BENCHMARKS
    }
    rng = random.Random(args.seed)
    repeated = repeated_answer_samples(problems, args.samples_per_problem, rng)
    distinct = distinct_answer_samples(problems, args.distinct_per_problem, rng)

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with MathGrader(num_workers=args.workers, timeout_s=args.timeout_s) as grader:
        grader.grade(["1"], ["\\boxed{x}"])  # wait until the workers are up
        startup_s = time.perf_counter() - start
        row_a, results_a = measure(
            f"(a) {args.samples_per_problem} samples/problem, repeated answers",
            repeated,
            grader,
            naive_subsample(repeated, args.naive_problems, args.naive_run, rng),
        )
        row_b, _ = measure(
            f"(b) {args.distinct_per_problem} distinct answers/problem, no plain numbers",
            distinct,
            grader,
            naive_subsample(distinct, 10 * args.naive_problems, args.distinct_per_problem, rng),
        )
    load_after = os.getloadavg()[0]
    num_problems, num_ks, passk_s = time_pass_at_k(results_a, repeated, max_k=256)

    header = [
        "part",
        "samples",
        "distinct answers (parent / workers)",
        "naive loop measured on",
        "naive loop, all samples (extrapolated)",
        f"MathGrader({args.workers} workers)",
        "speedup (wall)",
        "speedup (CPU-s)",
        "verdict mismatches",
    ]
    print(
        f"\nGrading throughput on {os.cpu_count()} CPUs, {sum(map(len, problems.values())):,} problems "
        f"({', '.join(problems)}); worker start-up {startup_s:.2f} s, not included below.\n"
        f"1-min load average {load_before:.2f} before grading, {load_after:.2f} after: this script alone "
        "accounts for up to ~2 (its workers); more means other processes shared the CPUs, which costs the "
        "pool more than the naive loop.\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in (row_a, row_b):
        print("| " + " | ".join(row.cells()) + " |")
    print(
        f"\n(c) pass_at_k for k = 1..{num_ks} over {num_problems:,} problems: {passk_s * 1e3:.1f} ms "
        f"({passk_s / num_ks * 1e3:.2f} ms per k; best of 3)"
    )


if __name__ == "__main__":
    main()
