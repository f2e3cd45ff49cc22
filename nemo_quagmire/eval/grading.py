"""From graded samples to the pass@k report: grouping by problem, choosing k, per-benchmark and macro metrics.

Why a library module: `scripts/grade.py` (offline, from a samples file) and the Pass@k evaluator callback
(during training) must turn graded samples into the same numbers with the same rules:

- Samples are grouped by (benchmark, problem id), never by prompt text.
- Problems may have different sample counts n. pass@k uses each problem's own n (unbiased estimator), so a k
  larger than some problem's n is an error naming that problem; the default ks are the powers of two up to
  the smallest n over all problems, so every benchmark reports the same keys.
- A benchmark's "n" is its smallest per-problem sample count ("n_max" the largest).
- "macro" is the unweighted mean over the benchmarks present: AIME's 30 problems weigh as much as GSM8K's
  1319.
- Majority votes count equivalent answers together: every answer the grader judged correct equals the gold
  and so each other (`0.875`, `7/8` and `\frac{7}{8}` are one vote), and wrong answers vote by their text
  with white space removed. Without this, a model that writes the right answer in several forms would lose
  votes to one consistently-written wrong answer.

The report is plain JSON-ready data: `{"per_benchmark": {name: {...}}, "macro": {...}}`, fractions in [0, 1].
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nemo_quagmire.eval.passk import default_ks, passk_metrics

COUNT_KEYS = ("num_problems", "num_samples", "n", "n_max")
# The estimators are exact to ~1e-13; rounding keeps float noise (0.9999999999999998) out of reports.
ROUND_DIGITS = 12
# The vote of every correct answer; no extracted answer (whitespace-free text) can equal it.
_CORRECT_VOTE = "\x00correct"


@dataclass(frozen=True)
class GradedSample:
    """One graded completion: which problem it answers, whether it is right, and the answer it gave.

    `extracted` is None when the completion has no final answer; such samples never win a majority vote.
    A sample the grader could not check (timeout, error) is wrong and votes like any wrong answer.
    """

    benchmark: str
    problem_id: str
    correct: bool
    extracted: str | None


def vote_key(sample: GradedSample) -> str | None:
    """The answer a sample votes for in maj@k: one shared key for all correct answers, the white-space-free
    text for a wrong one, None (no vote) without an answer."""
    if sample.extracted is None:
        return None
    return _CORRECT_VOTE if sample.correct else "".join(sample.extracted.split())


def group_by_problem(samples: Iterable[GradedSample]) -> dict[str, dict[str, list[GradedSample]]]:
    """benchmark -> problem id -> its samples; benchmarks, problems and samples in first-appearance order."""
    groups: dict[str, dict[str, list[GradedSample]]] = {}
    for sample in samples:
        groups.setdefault(sample.benchmark, {}).setdefault(sample.problem_id, []).append(sample)
    return groups


def resolve_ks(
    samples_per_problem: Mapping[tuple[str, str], int], ks: Sequence[int] | None = None
) -> list[int]:
    """The ks to report: `ks` checked against every problem's n, or powers of two up to the smallest n.

    Args:
        samples_per_problem: (benchmark, problem id) -> number of samples of that problem.
        ks: requested ks, or None for `default_ks(smallest n)`.

    Returns:
        Sorted distinct ks.

    Raises:
        ValueError: no samples, a k < 1, or a k larger than some problem's n (the message names the problem
            with the fewest samples).
    """
    if not samples_per_problem:
        raise ValueError("no samples to compute pass@k from")
    (bench, problem_id), n_min = min(samples_per_problem.items(), key=lambda item: item[1])
    if ks is None:
        return list(default_ks(n_min))
    ks = sorted(set(ks))
    if ks[0] < 1:
        raise ValueError(f"k must be >= 1, got {ks[0]}")
    if ks[-1] > n_min:
        raise ValueError(
            f"pass@{ks[-1]} needs at least {ks[-1]} samples per problem, but {bench} problem "
            f"{problem_id!r} has n={n_min}; drop the larger ks or sample more"
        )
    return ks


def compute_metrics(samples: Sequence[GradedSample], ks: Sequence[int] | None = None) -> dict:
    """The pass@k report of graded samples.

    Args:
        samples: graded samples of any number of benchmarks and problems, in any order.
        ks: the ks for pass@k and maj@k; None -> powers of two up to the smallest n (see `resolve_ks`).

    Returns:
        `{"per_benchmark": {name: {"num_problems", "num_samples", "n", "n_max", "pass@K"..., "maj@K"...,
        "mean@n", "no_answer"}}, "macro": {metric: unweighted mean over benchmarks}}`; metric values are
        fractions in [0, 1] rounded to `ROUND_DIGITS` decimals, the counts are ints.
    """
    groups = group_by_problem(samples)
    counts = Counter((s.benchmark, s.problem_id) for s in samples)
    ks = resolve_ks(counts, ks)
    per_benchmark: dict[str, dict[str, float | int]] = {}
    for bench, problems in groups.items():
        correct = [[s.correct for s in group] for group in problems.values()]  # [P][n_p]
        answers = [[vote_key(s) for s in group] for group in problems.values()]  # [P][n_p]
        ns = [len(group) for group in correct]
        means = passk_metrics(correct, answers=answers, ks=ks).mean
        per_benchmark[bench] = {
            "num_problems": len(ns),
            "num_samples": sum(ns),
            "n": min(ns),
            "n_max": max(ns),
            **{key: round(float(value), ROUND_DIGITS) for key, value in means.items()},
        }
    metric_keys = [key for key in next(iter(per_benchmark.values())) if key not in COUNT_KEYS]
    macro = {
        key: round(statistics.fmean(m[key] for m in per_benchmark.values()), ROUND_DIGITS)
        for key in metric_keys
    }
    return {"per_benchmark": per_benchmark, "macro": macro}


def format_metrics_table(metrics: Mapping) -> str:
    """A fixed-width text table of a `compute_metrics` report: a row per benchmark plus macro, in percent."""
    per_benchmark = metrics["per_benchmark"]
    keys = list(metrics["macro"])
    header = ["benchmark", "problems", "n", *keys]
    rows = [
        [name, str(m["num_problems"]), str(m["n"]), *(f"{100 * m[k]:.1f}" for k in keys)]
        for name, m in per_benchmark.items()
    ]
    rows.append(["macro", "", "", *(f"{100 * metrics['macro'][k]:.1f}" for k in keys)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    return "\n".join(lines)
