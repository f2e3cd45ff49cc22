"""Unbiased pass@k and maj@k from n graded samples per problem.

Why this module: the paper's predictor reads pass@large-k (k = 64 of n = 256 samples), and the signal it
ranks checkpoints by is a few points, so the estimator must be unbiased and low-variance. Scoring only the
first k samples is unbiased but throws away the other n - k; the estimator of Chen et al. 2021
(https://arxiv.org/abs/2107.03374) averages over every k-subset of the n samples instead:

    pass@k = 1 - C(n - c, k) / C(n, k)        (c = correct samples)

maj@k (majority vote over k samples) is defined the same way, as the expectation over all k-subsets, so the
two curves are comparable and neither depends on sample order. Both are computed exactly in float64: pass@k
in human-eval's product form (no big binomials), vectorized over problems; maj@k by generating functions
(see `maj_at_k`). Sampling n < k completions is an error here, never a silently skipped k.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike


def default_ks(n: int) -> list[int]:
    """The powers of two up to n: 1, 2, 4, ..., the largest power of two <= n.

    Raises:
        ValueError: n < 1.
    """
    if n < 1:
        raise ValueError(f"default_ks needs n >= 1 samples per problem, got n = {n}")
    return [2**i for i in range(n.bit_length())]


def pass_at_k(num_samples: ArrayLike, num_correct: ArrayLike, k: int) -> np.ndarray:
    """Per-problem unbiased pass@k, 1 - C(n-c, k) / C(n, k), exact to ~1e-13 in float64.

    Uses human-eval's product form C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i) (1.0 when n - c < k),
    evaluated as a difference of two prefix sums of log(1 - k/i) shared by all problems: O(max n + problems)
    per k, no big binomials and no loop over problems.

    Args:
        num_samples: n per problem, ints >= 1 (may differ between problems), or one int for all.  # [P]
        num_correct: c per problem, ints in [0, n].  # [P]
        k: samples per attempt, 1 <= k <= every n.

    Returns:
        pass@k per problem, float64 in [0, 1].  # [P]

    Raises:
        ValueError: k > n for some problem (the message counts them and names the smallest n), k < 1,
            n < 1, c < 0, c > n, or the two arrays differ in length.
        TypeError: non-integer counts or k.

    Example:
        >>> pass_at_k(num_samples=[4, 4, 4], num_correct=[0, 1, 2], k=2).round(4)  # 1 - C(4-c, 2) / 6
        array([0.    , 0.5   , 0.8333])
    """
    n, c = _validated_counts(num_samples, num_correct)
    k = _validated_k(k, n, "pass")
    if n.size == 0:
        return np.zeros(0)
    failures = n - c  # [P]
    # neg_log_comb[m - k] = sum_{i=k+1}^{m} log(1 - k/i) = -log C(m, k), for k <= m <= max n.
    neg_log_comb = np.concatenate(([0.0], np.cumsum(np.log1p(-k / np.arange(k + 1, n.max() + 1)))))
    can_all_fail = failures >= k  # [P]
    log_all_fail = neg_log_comb[n - k] - neg_log_comb[np.where(can_all_fail, failures, k) - k]  # [P]
    return np.where(can_all_fail, 0.0 - np.expm1(log_all_fail), 1.0)  # 0.0 - x: no -0.0 when c = 0


def maj_at_k(
    answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]], k: int
) -> np.ndarray:
    """Per-problem maj@k: the expected correctness of a majority vote over a uniformly random k-subset.

    Definition, per problem with n samples: samples are clustered by their extracted answer string; a sample
    whose answer is None never votes. Draw k of the n samples without replacement, every k-subset equally
    likely. The answer with the most votes among the k wins; a tie between top answers is broken uniformly
    at random, so a tie scores the fraction of the tied answers that are correct; if all k samples have no
    answer the vote is wrong. maj@k is the expected score over all C(n, k) subsets (unbiased, like pass@k).
    An answer cluster is correct if its samples are graded correct; all samples with the same answer string
    must carry the same verdict. Verdicts of no-answer samples are ignored (they count for pass@k only), so
    maj@1 == pass@1 exactly when no-answer samples are graded wrong.

    Method (exact, float64): with each sample kept independently with probability p = k/n, the counts
    drawn from the clusters are independent binomials, and conditioning on "k samples kept" gives the
    uniform k-subset. For a correct cluster c, summing over x = its votes,

        P(c wins) = sum_x P(X_c = x) * E[1/(1+R); every other cluster draws <= x; total = k] / P(total = k)

    where R counts the rivals that also draw exactly x. 1 / (1 + R) = integral_0^1 s^R ds turns the tie
    weight into one factor per rival, sum_{y<x} P(X_j = y) t^y + s P(X_j = x) t^x; the t^k coefficient of
    the product is a polynomial in s of degree <= R_max(x) = min(rivals with >= x samples, (k - x) // x), so
    Gauss-Legendre with R_max // 2 + 1 nodes integrates it exactly. The coefficient is read off a length-N
    DFT (N = max(k, n - k) + 1, enough to avoid aliasing); all factors are probabilities, so there is no
    overflow for any n; the absolute error is ~1e-15 at n = 256 (against exact enumeration).

    Cost: O(n * k) per distinct (n, k) for the binomial tables, then per problem
    O(D_correct * D * rows * N) with D distinct cluster sizes (D_correct of them holding a correct cluster)
    and rows = sum_{x <= min(k, m_c)} (R_max(x) // 2 + 1) <= m_c + k * ln(k) / 2. For n = k = 256 and a
    handful of answers that is ~1 ms per problem; all-distinct answers stay cheap too (singleton clusters
    only vote at x = 1).

    Args:
        answers: per problem, the n extracted answers (None: no answer). n may differ between problems.
        correct: per problem, the n verdicts of the grader, booleans aligned with `answers`.
        k: samples per vote, 1 <= k <= every n.

    Returns:
        maj@k per problem, float64 in [0, 1].  # [P]

    Raises:
        ValueError: k > n for some problem, k < 1, mismatched lengths, empty problems, or an answer string
            graded both correct and incorrect.
        TypeError: verdicts that are not booleans.

    Example:
        >>> answers = [["4", "4", "5", None]]
        >>> correct = [[True, True, False, False]]
        >>> maj_at_k(answers, correct, k=1).round(4), maj_at_k(answers, correct, k=2).round(4)
        (array([0.5]), array([0.6667]))
    """
    votes = _tally_problems(answers, _validated_verdicts(correct))
    k = _validated_k(k, np.array([v.n for v in votes], dtype=np.int64), "maj")
    return _maj_at_k_from_votes(votes, k)


@dataclass(frozen=True)
class PassKMetrics:
    """pass@k / maj@k of one evaluation.

    Attributes:
        ks: the k values, ascending.
        per_problem: "pass@k", then "maj@k" (with answers), "mean@n", "no_answer" (with answers) -> one value
            per problem.  # each [P]
        mean: the same keys -> the mean over problems (every problem weighs the same, whatever its n).
    """

    ks: tuple[int, ...]
    per_problem: dict[str, np.ndarray]
    mean: dict[str, float]


def passk_metrics(
    correct: Sequence[Sequence[bool]],
    answers: Sequence[Sequence[str | None]] | None = None,
    ks: Sequence[int] | None = None,
) -> PassKMetrics:
    """pass@k for every k (and maj@k, when answers are given) over a set of problems.

    Args:
        correct: per problem, the n verdicts (booleans; n may differ between problems).
        answers: per problem, the n extracted answers aligned with `correct` (None: no answer). Enables
            "maj@k" (see `maj_at_k`) and "no_answer", the fraction of samples with no answer.
        ks: the k values; default `default_ks(smallest n)`. A k above some problem's n raises.

    Returns:
        PassKMetrics with keys "pass@k" (and "maj@k") for each k, "mean@n" (fraction of correct samples,
        the same as pass@1) and, with answers, "no_answer".

    Raises:
        ValueError: no problems, or any error of `pass_at_k` / `maj_at_k`.
    """
    verdicts = _validated_verdicts(correct)
    if not verdicts:
        raise ValueError("passk_metrics got no problems: `correct` is empty")
    num_samples = np.array([v.size for v in verdicts], dtype=np.int64)  # [P]
    num_correct = np.array([np.count_nonzero(v) for v in verdicts], dtype=np.int64)  # [P]
    ks = default_ks(int(num_samples.min())) if ks is None else sorted(set(ks))
    per_problem = {f"pass@{k}": pass_at_k(num_samples, num_correct, k) for k in ks}
    if answers is not None:
        votes = _tally_problems(answers, verdicts)
        for k in ks:
            per_problem[f"maj@{k}"] = _maj_at_k_from_votes(votes, k)
    per_problem["mean@n"] = num_correct / num_samples
    if answers is not None:
        per_problem["no_answer"] = np.array([v.no_answer / v.n for v in votes])
    return PassKMetrics(
        ks=tuple(ks),
        per_problem=per_problem,
        mean={key: float(values.mean()) for key, values in per_problem.items()},
    )


# ---------------------------------------------------------------------------------------------- validation


def _validated_counts(num_samples: ArrayLike, num_correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    c = _int_array("num_correct", num_correct)
    n = _int_array("num_samples", num_samples)
    if n.ndim == 0:
        n = np.full_like(c, n)
    if n.ndim != 1 or c.ndim != 1 or n.shape != c.shape:
        raise ValueError(
            f"num_samples (shape {n.shape}) and num_correct (shape {c.shape}) must be 1-D with one entry per "
            "problem, of the same length"
        )
    if (n < 1).any():
        i = int(np.argmax(n < 1))
        raise ValueError(f"num_samples[{i}] = {n[i]}: every problem needs at least one sample")
    if (c < 0).any():
        i = int(np.argmax(c < 0))
        raise ValueError(f"num_correct[{i}] = {c[i]} is negative")
    if (c > n).any():
        i = int(np.argmax(c > n))
        raise ValueError(f"num_correct[{i}] = {c[i]} exceeds num_samples[{i}] = {n[i]}")
    return n, c


def _int_array(name: str, values: ArrayLike) -> np.ndarray:
    array = np.asarray(values)
    if array.size == 0:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integers (sample counts), got dtype {array.dtype}")
    return array.astype(np.int64)


def _validated_k(k: int, num_samples: np.ndarray, metric: str) -> int:
    """k as an int, after checking 1 <= k <= n for every problem (num_samples: [P])."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{metric}@k: k must be an int, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"{metric}@k: k = {k}; k must be a positive integer")
    too_few = num_samples < k
    if too_few.any():
        smallest = int(np.argmin(num_samples))
        raise ValueError(
            f"{metric}@{k} needs at least {k} samples per problem, but {int(too_few.sum())} of "
            f"{num_samples.size} problems have fewer (smallest n = {num_samples[smallest]}, problem "
            f"{smallest}); drop k > {num_samples[smallest]} or sample more completions"
        )
    return k


def _validated_verdicts(correct: Sequence[Sequence[bool]]) -> list[np.ndarray]:
    verdicts = []
    for problem, values in enumerate(correct):
        array = np.asarray(values)
        if array.size == 0:
            raise ValueError(f"correct[{problem}] is empty: every problem needs at least one graded sample")
        if array.dtype != np.bool_ or array.ndim != 1:
            raise TypeError(
                f"correct[{problem}] must be a 1-D sequence of booleans, got dtype {array.dtype} and shape "
                f"{array.shape}; threshold rewards into verdicts first (e.g. reward >= 1.0)"
            )
        verdicts.append(array)
    return verdicts


# ----------------------------------------------------------------------------------------------- maj@k core


class _Votes(NamedTuple):
    """One problem's answer clusters, grouped by cluster size (clusters of equal size are interchangeable)."""

    n: int
    no_answer: int
    sizes: np.ndarray  # [D] distinct cluster sizes, ascending
    counts: np.ndarray  # [D] clusters of each size
    correct_counts: np.ndarray  # [D] correct clusters of each size


def _tally_problems(answers: Sequence[Sequence[str | None]], verdicts: list[np.ndarray]) -> list[_Votes]:
    if len(answers) != len(verdicts):
        raise ValueError(f"answers has {len(answers)} problems but correct has {len(verdicts)}")
    return [
        _tally(list(a), v.tolist(), problem)
        for problem, (a, v) in enumerate(zip(answers, verdicts, strict=True))
    ]


def _tally(answers: list[str | None], verdicts: list[bool], problem: int) -> _Votes:
    if len(answers) != len(verdicts):
        raise ValueError(
            f"problem {problem}: {len(answers)} answers but {len(verdicts)} verdicts; they must be aligned"
        )
    samples = Counter(zip(answers, verdicts, strict=True))  # (answer, verdict) -> samples
    no_answer = samples.pop((None, True), 0) + samples.pop((None, False), 0)
    clusters: dict[str, tuple[int, bool]] = {}
    for (answer, verdict), size in samples.items():
        if answer in clusters:
            right, wrong = samples[(answer, True)], samples[(answer, False)]
            raise ValueError(
                f"problem {problem}: answer {answer!r} is graded correct in {right} samples and incorrect in "
                f"{wrong}; the grader and the answer extraction disagree, so majority voting is undefined "
                "(grade the extracted answer itself)"
            )
        clusters[answer] = (size, verdict)
    size_of = np.array([size for size, _ in clusters.values()], dtype=np.int64)  # [J]
    is_correct = np.array([verdict for _, verdict in clusters.values()], dtype=bool)  # [J]
    sizes, group = np.unique(size_of, return_inverse=True)
    return _Votes(
        n=len(answers),
        no_answer=no_answer,
        sizes=sizes,
        counts=np.bincount(group, minlength=sizes.size),
        correct_counts=np.bincount(group, weights=is_correct, minlength=sizes.size).astype(np.int64),
    )


class _VoteTables(NamedTuple):
    """Everything that depends on (n, k) only.

    The DFT has N = max(k, n - k) + 1 points omega_f = exp(2 pi i f / N): every generating polynomial here
    has degrees in [0, n], and no degree but k is congruent to k mod N, so reading the t^k coefficient from
    N values is exact. The coefficients are real, so the values at f and N - f are complex conjugates and
    only f = 0..N // 2 are kept (F = N // 2 + 1 points), with the pairs counted twice in `extract`.
    """

    pmf: np.ndarray  # [n+1, k+1] P(Binomial(m, p) = y), p = k/n
    powers: np.ndarray  # [k+1, F] omega_f ** y
    sample: np.ndarray  # [F] 1 - p + p * omega_f: generating function of one sample
    extract: np.ndarray  # [F] Re(values @ extract) is the t^k coefficient
    p_total: float  # P(Binomial(n, p) = k): the probability of keeping exactly k samples


def _vote_tables(n: int, k: int) -> _VoteTables:
    p = k / n
    pmf = np.zeros((n + 1, k + 1))
    pmf[0, 0] = 1.0
    for m in range(1, n + 1):  # Pascal's rule in probability form: convex sums, no overflow
        pmf[m] = (1 - p) * pmf[m - 1]
        pmf[m, 1:] += p * pmf[m - 1, :-1]
    size = max(k, n - k) + 1
    f = np.arange(size // 2 + 1)
    powers = np.exp(2j * np.pi * (np.outer(np.arange(k + 1), f) % size) / size)  # angles reduced mod 2 pi
    pairs = np.where((f == 0) | (2 * f == size), 1.0, 2.0)
    return _VoteTables(
        pmf, powers, 1 - p + p * powers[1], pairs * np.conj(powers[k]) / size, float(pmf[n, k])
    )


@functools.cache
def _gauss_legendre_01(max_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1]; row q holds the q-node rule.  # [max_nodes+1, max_nodes]"""
    nodes = np.zeros((max_nodes + 1, max_nodes))
    weights = np.zeros((max_nodes + 1, max_nodes))
    for q in range(1, max_nodes + 1):
        x, w = np.polynomial.legendre.leggauss(q)
        nodes[q, :q], weights[q, :q] = (x + 1) / 2, w / 2
    nodes.setflags(write=False)
    weights.setflags(write=False)
    return nodes, weights


def _quadrature_rows(x: np.ndarray, nodes_per_x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (vote count, Gauss node): x, node and weight per row (x, nodes_per_x: [X]).  # [R] each"""
    x_row = np.repeat(x, nodes_per_x)
    q_row = np.repeat(nodes_per_x, nodes_per_x)
    node_row = np.arange(x_row.size) - np.repeat(np.cumsum(nodes_per_x) - nodes_per_x, nodes_per_x)
    nodes, weights = _gauss_legendre_01(int(nodes_per_x.max(initial=1)))
    return x_row, nodes[q_row, node_row], weights[q_row, node_row]


def _maj_at_k_from_votes(votes: list[_Votes], k: int) -> np.ndarray:
    tables = {n: _vote_tables(n, k) for n in {v.n for v in votes}}
    return np.array([_win_probability(v, k, tables[v.n]) for v in votes])


def _win_probability(votes: _Votes, k: int, tables: _VoteTables) -> float:
    """maj@k of one problem (the method is in `maj_at_k`'s docstring)."""
    pmf, powers, sizes = tables.pmf, tables.powers, votes.sizes
    x_max = int(min(k, sizes[votes.correct_counts > 0].max(initial=0)))  # 0: no answer is correct
    if x_max == 0:
        return 0.0
    # prefix[g][x] = sum_{y<x} P(X = y) omega^y for a cluster of size sizes[g]; x = size + 1: the full sum.
    prefix = []
    for size in sizes:
        terms = pmf[size, : min(size, x_max) + 1, None] * powers[: min(size, x_max) + 1]  # [Y, F]
        prefix.append(np.concatenate((np.zeros((1, powers.shape[1])), np.cumsum(terms, axis=0))))
    no_answer = tables.sample**votes.no_answer  # [F]
    total = 0.0
    for g in np.flatnonzero(votes.correct_counts):
        rivals = votes.counts - (np.arange(sizes.size) == g)  # [D] clusters other than this one
        x_top = min(k, int(sizes[g]))
        x_tie = min(x_top, int(sizes[rivals > 0].max(initial=0)))  # above it no rival can draw as many
        x = np.arange(1, x_tie + 1)  # [X]
        can_tie = (rivals * (sizes >= x[:, None])).sum(axis=1)  # [X] rivals able to draw x
        x_row, s_row, w_row = _quadrature_rows(x, np.minimum(can_tie, (k - x) // x) // 2 + 1)
        outright = x_top > x_tie  # it can draw more than any rival: one more row, for all x_tie < x <= x_top
        if outright:
            x_row, s_row, w_row = np.append(x_row, x_tie + 1), np.append(s_row, 0.0), np.append(w_row, 1.0)
        omega_x = powers[x_row]  # [R, F]
        gen = pmf[sizes[g], x_row, None] * omega_x * no_answer  # [R, F] this cluster draws x
        if outright:
            gen[-1] = (prefix[g][x_top + 1] - prefix[g][x_tie + 1]) * no_answer
        for h in np.flatnonzero(rivals):
            below = prefix[h][np.minimum(x_row, sizes[h] + 1)]  # [R, F] rival draws < x
            factor = below + (s_row * pmf[sizes[h], x_row])[:, None] * omega_x  # + rival draws == x (a tie)
            gen *= factor if rivals[h] == 1 else factor ** int(rivals[h])  # complex ** is ~10x a product
        total += votes.correct_counts[g] * float(w_row @ (gen @ tables.extract).real)
    return total / tables.p_total
