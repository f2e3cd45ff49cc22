"""pass@k and maj@k against brute force over every k-subset (n <= 10), an exact enumeration of draw counts
with integer binomials (n up to 256), and math.comb; plus the estimators' properties and error messages."""

from __future__ import annotations

import doctest
import itertools
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_quagmire.eval import passk
from nemo_quagmire.eval.passk import PassKMetrics, default_ks, maj_at_k, pass_at_k, passk_metrics

# ------------------------------------------------------------------------------------------- references


def vote_score(votes: Counter, verdict: dict[str, bool]) -> Fraction:
    """The definition: the top answers tie-break uniformly, so the score is the fraction of them correct."""
    if not votes:
        return Fraction(0)  # every drawn sample had no answer
    top = max(votes.values())
    tied = [answer for answer, count in votes.items() if count == top]
    return Fraction(sum(verdict[answer] for answer in tied), len(tied))


def brute_pass(correct: list[bool], k: int) -> Fraction:
    subsets = list(itertools.combinations(correct, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def brute_maj(answers: list[str | None], correct: list[bool], k: int) -> Fraction:
    verdict = {a: c for a, c in zip(answers, correct, strict=True) if a is not None}
    subsets = list(itertools.combinations(range(len(answers)), k))
    return sum(
        (vote_score(Counter(answers[i] for i in s if answers[i] is not None), verdict) for s in subsets),
        Fraction(0),
    ) / len(subsets)


def enumerated_maj(sizes: list[int], verdicts: list[bool], no_answer: int, k: int) -> Fraction:
    """Sum over draw-count vectors (x_1..x_J, x_none) with sum k, each weighing prod C(m_j, x_j): the
    multivariate hypergeometric law written out with exact integers; no subsets, so n can be 256."""
    n = sum(sizes) + no_answer
    verdict = {str(j): v for j, v in enumerate(verdicts)}
    total = Fraction(0)

    def visit(j: int, left: int, weight: int, votes: Counter) -> None:
        nonlocal total
        if j == len(sizes):
            if left <= no_answer:
                total += math.comb(no_answer, left) * weight * vote_score(+votes, verdict)
            return
        for x in range(min(sizes[j], left) + 1):
            visit(j + 1, left - x, weight * math.comb(sizes[j], x), votes + Counter({str(j): x}))

    visit(0, k, 1, Counter())
    return total / math.comb(n, k)


def expand(sizes: list[int], verdicts: list[bool], no_answer: int) -> tuple[list[str | None], list[bool]]:
    answers = [str(j) for j, m in enumerate(sizes) for _ in range(m)] + [None] * no_answer
    correct = [v for v, m in zip(verdicts, sizes, strict=True) for _ in range(m)] + [False] * no_answer
    return answers, correct


# Problems of up to 10 samples: answers from a small alphabet (so clusters and ties are common), one verdict
# per answer string, and random verdicts for no-answer samples (maj@k must ignore them).
@st.composite
def voted_problems(draw, max_n: int = 10) -> tuple[list[str | None], list[bool]]:
    alphabet = draw(st.sampled_from([["a"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d", "e"]]))
    verdict = {a: draw(st.booleans()) for a in alphabet}
    answers = draw(st.lists(st.sampled_from([*alphabet, None]), min_size=1, max_size=max_n))
    correct = [verdict[a] if a is not None else draw(st.booleans()) for a in answers]
    return answers, correct


# -------------------------------------------------------------------------------------------------- pass@k


@settings(max_examples=150, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=10))
def test_pass_at_k_matches_all_subsets(correct):
    n = len(correct)
    got = [pass_at_k([n], [sum(correct)], k)[0] for k in range(1, n + 1)]
    expected = [float(brute_pass(correct, k)) for k in range(1, n + 1)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 100, 255, 256])
def test_pass_at_k_matches_math_comb_at_every_k_and_c(n):
    c = np.arange(n + 1)  # [n+1] every possible number of correct samples
    for k in range(1, n + 1):
        # Python's int / int is correctly rounded, so this reference is off by at most two roundings.
        expected = [1 - math.comb(n - ci, k) / math.comb(n, k) for ci in c.tolist()]
        np.testing.assert_allclose(pass_at_k(np.full(n + 1, n), c, k), expected, rtol=0, atol=1e-12)


def test_pass_at_k_stays_exact_beyond_float_binomials():
    # C(5000, 2500) ~ 1e1503 overflows float64; the product form never builds it.
    n, c = np.full(4, 5000), np.array([1, 10, 2500, 4999])
    for k in (1, 64, 2500, 4999):
        expected = [
            float(1 - Fraction(math.comb(n0 - c0, k), math.comb(n0, k))) for n0, c0 in zip(n, c, strict=True)
        ]
        np.testing.assert_allclose(pass_at_k(n, c, k), expected, rtol=0, atol=1e-11)


def test_pass_at_k_with_n_varying_across_problems():
    n, c = [5, 256, 37, 5, 9], [2, 3, 0, 5, 9]
    np.testing.assert_allclose(
        pass_at_k(n, c, 1), [ci / ni for ni, ci in zip(n, c, strict=True)], rtol=0, atol=1e-15
    )
    # Each entry is its own problem's 1 - C(n-c, k) / C(n, k): nothing leaks between problems of other n.
    expected = [1 - math.comb(ni - ci, 5) / math.comb(ni, 5) for ni, ci in zip(n, c, strict=True)]
    np.testing.assert_allclose(pass_at_k(n, c, 5), expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(
        pass_at_k(n, c, 5), [pass_at_k([ni], [ci], 5)[0] for ni, ci in zip(n, c, strict=True)]
    )


def test_pass_at_k_broadcasts_one_n():
    np.testing.assert_array_equal(pass_at_k(10, [0, 3, 10], 4), pass_at_k([10, 10, 10], [0, 3, 10], 4))
    assert pass_at_k([], [], 3).shape == (0,)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_k_properties(n_c):
    n, c = n_c
    curve = np.array([pass_at_k([n], [c], k)[0] for k in range(1, n + 1)])  # [n] over k
    assert ((curve >= 0) & (curve <= 1)).all()
    assert (np.diff(curve) >= -1e-13).all()  # more attempts never hurt (up to rounding)
    assert curve[0] == pytest.approx(c / n, abs=1e-13)
    assert curve[-1] == (1.0 if c > 0 else 0.0)  # all n samples drawn: solved iff any is correct
    over_c = pass_at_k(np.full(n + 1, n), np.arange(n + 1), max(1, n // 2))  # [n+1] over c
    assert (np.diff(over_c) >= -1e-13).all()


# --------------------------------------------------------------------------------------------------- maj@k


@settings(max_examples=200, deadline=None)
@given(voted_problems())
def test_maj_at_k_matches_all_subsets(problem):
    answers, correct = problem
    n = len(answers)
    got = [maj_at_k([answers], [correct], k)[0] for k in range(1, n + 1)]
    expected = [float(brute_maj(answers, correct, k)) for k in range(1, n + 1)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("answers", "correct", "k", "expected"),
    [
        # A 1-1 tie at k = 2 between a right and a wrong answer: half a point.
        (["a", "b"], [True, False], 2, 0.5),
        # 3 answers, 2 right, k = 3 draws all: a three-way tie scores 2/3.
        (["a", "b", "c"], [True, True, False], 3, 2 / 3),
        # Every sample unanswered: the vote is always wrong, whatever the verdicts say.
        ([None, None, None], [False, True, False], 2, 0.0),
        # "a" (right) x2, "b" (wrong) x1, None x1, k = 2 of C(4, 2) = 6 subsets: {a,a} 1, {a,b} x2 tie 1/2,
        # {a,None} x2 1, {b,None} 0 -> (1 + 1 + 2) / 6.
        (["a", "a", "b", None], [True, True, False, False], 2, 4 / 6),
        # Two distinct right answers (e.g. "1/2" and "0.5") and one wrong x2, k = 2 of 6 subsets:
        # {r1,r2} tie of two right 1, {r_i,w} x4 tie 1/2, {w,w} 0 -> (1 + 2) / 6.
        (["1/2", "0.5", "3", "3"], [True, True, False, False], 2, 3 / 6),
        # No right answer at all.
        (["x", "y", None], [False, False, False], 2, 0.0),
    ],
)
def test_maj_at_k_hand_worked(answers, correct, k, expected):
    assert maj_at_k([answers], [correct], k)[0] == pytest.approx(expected, abs=1e-14)
    assert expected == float(brute_maj(answers, correct, k))  # the comment's arithmetic is the definition's


@pytest.mark.parametrize(
    ("sizes", "verdicts", "no_answer", "ks"),
    [
        ([120, 100], [True, False], 36, [1, 7, 64, 128, 200, 256]),  # n = 256
        ([60, 60, 60, 40], [True, False, False, True], 36, [2, 9, 16]),  # same-size rivals (power path)
        ([90, 90, 50, 1, 1], [False, True, True, True, False], 24, [3, 12, 30]),
    ],
)
def test_maj_at_k_matches_exact_enumeration_at_large_n(sizes, verdicts, no_answer, ks):
    answers, correct = expand(sizes, verdicts, no_answer)
    got = [maj_at_k([answers], [correct], k)[0] for k in ks]
    expected = [float(enumerated_maj(sizes, verdicts, no_answer, k)) for k in ks]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_maj_at_k_beyond_float_binomials():
    # n = 2000, so C(n, k) overflows float64 for k near 1000. One right answer among no-answers: the vote
    # is right iff any answered sample is drawn, which is pass@k with c = that answer's samples.
    answers, correct = expand([300], [True], 1700)
    for k in (1, 999, 1000, 1701):
        assert maj_at_k([answers], [correct], k)[0] == pytest.approx(
            pass_at_k([2000], [300], k)[0], abs=1e-12
        )
    # Two equal clusters, one right: by symmetry the vote is right half the time, ties included.
    answers, correct = expand([1000, 1000], [True, False], 0)
    np.testing.assert_allclose(maj_at_k([answers], [correct], 1000), [0.5], rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(voted_problems(max_n=40), min_size=1, max_size=4), st.integers(1, 40))
def test_maj_at_k_properties(problems, k):
    answers = [a for a, _ in problems]
    # No-answer samples graded wrong, so that maj@1 == pass@1 holds.
    correct = [[c and a_i is not None for a_i, c in zip(a, cs, strict=True)] for a, cs in problems]
    n_min = min(len(a) for a in answers)
    maj = maj_at_k(answers, correct, min(k, n_min))
    assert ((maj >= -1e-12) & (maj <= 1 + 1e-12)).all()
    num_samples = [len(a) for a in answers]
    np.testing.assert_allclose(  # a vote of one sample is that sample's verdict
        maj_at_k(answers, correct, 1),
        pass_at_k(num_samples, [sum(c) for c in correct], 1),
        rtol=0,
        atol=1e-12,
    )


def test_maj_at_k_ignores_verdicts_of_unanswered_samples():
    answers, correct = ["a", None, None], [False, True, True]
    assert maj_at_k([answers], [correct], 1)[0] == 0.0
    assert pass_at_k([3], [2], 1)[0] == pytest.approx(2 / 3)


def test_maj_at_k_does_not_depend_on_sample_order():
    answers, correct = expand([5, 3, 3, 1], [False, True, False, True], 4)
    perm = np.random.default_rng(0).permutation(len(answers))
    shuffled_answers, shuffled_correct = [answers[i] for i in perm], [correct[i] for i in perm]
    for k in (1, 4, 9, 16):
        original = maj_at_k([answers], [correct], k)[0]
        assert maj_at_k([shuffled_answers], [shuffled_correct], k)[0] == pytest.approx(original, abs=1e-14)


# ----------------------------------------------------------------------------------------- passk_metrics


def test_passk_metrics_collects_every_metric():
    correct = [[True, False, False, True], [False] * 6, [True] * 5]
    answers = [["1", "2", None, "1"], ["7", None, None, "8", "8", "9"], ["5", "5", "5", "5.0", "5"]]
    metrics = passk_metrics(correct, answers)
    assert isinstance(metrics, PassKMetrics)
    assert metrics.ks == (1, 2, 4)  # default_ks(smallest n = 4)
    expected_keys = [f"{m}@{k}" for m in ("pass", "maj") for k in (1, 2, 4)] + ["mean@n", "no_answer"]
    assert list(metrics.per_problem) == expected_keys
    for k in metrics.ks:
        np.testing.assert_array_equal(metrics.per_problem[f"pass@{k}"], pass_at_k([4, 6, 5], [2, 0, 5], k))
        np.testing.assert_array_equal(metrics.per_problem[f"maj@{k}"], maj_at_k(answers, correct, k))
    np.testing.assert_allclose(metrics.per_problem["mean@n"], [2 / 4, 0 / 6, 5 / 5])
    np.testing.assert_allclose(metrics.per_problem["no_answer"], [1 / 4, 2 / 6, 0 / 5])
    assert metrics.mean["mean@n"] == pytest.approx(metrics.mean["pass@1"])
    assert metrics.mean["no_answer"] == pytest.approx((1 / 4 + 2 / 6) / 3)  # every problem weighs the same
    for key, values in metrics.per_problem.items():
        assert metrics.mean[key] == pytest.approx(values.mean())


def test_passk_metrics_without_answers_and_explicit_ks():
    metrics = passk_metrics([[True, False, True], [False, False, False, True]], ks=[3, 1, 3])
    assert metrics.ks == (1, 3)
    assert list(metrics.per_problem) == ["pass@1", "pass@3", "mean@n"]
    # pass@3: problem 0 has n = k = 3 with a correct sample -> 1; problem 1: 1 - C(3, 3) / C(4, 3) = 3/4.
    np.testing.assert_allclose(metrics.per_problem["pass@3"], [1.0, 0.75])
    with pytest.raises(ValueError, match=r"1 of 2 problems have fewer \(smallest n = 3"):
        passk_metrics([[True, False, True], [False, False, False, True]], ks=[4])


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(255) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert default_ks(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    with pytest.raises(ValueError, match="n = 0"):
        default_ks(0)


def test_docstring_examples_run():
    result = doctest.testmod(passk)
    assert result.attempted >= 3 and result.failed == 0


# -------------------------------------------------------------------------------------------------- errors


def test_k_above_n_counts_the_short_problems():
    with pytest.raises(
        ValueError, match=r"pass@8 .* 2 of 4 problems have fewer \(smallest n = 3, problem 2\)"
    ):
        pass_at_k([16, 7, 3, 8], [1, 1, 1, 1], 8)
    with pytest.raises(ValueError, match=r"maj@3 .* 1 of 2 problems have fewer \(smallest n = 2"):
        maj_at_k([["a", "b", "a"], ["a", None]], [[True, False, True], [True, False]], 3)


@pytest.mark.parametrize(
    ("num_samples", "num_correct", "k", "error", "message"),
    [
        ([4, 4], [1, 1], 0, ValueError, "k = 0"),
        ([4, 4], [1, 1], True, TypeError, "must be an int"),
        ([4, 4], [1, 1], 2.0, TypeError, "got 2.0"),
        ([4, 0], [1, 0], 1, ValueError, r"num_samples\[1\] = 0"),
        ([4, 4, 4], [1, -1, 0], 1, ValueError, r"num_correct\[1\] = -1 is negative"),
        ([4, 4], [1, 5], 1, ValueError, r"num_correct\[1\] = 5 exceeds num_samples\[1\] = 4"),
        ([4, 4, 4], [1, 1], 1, ValueError, "same length"),
        ([4.0, 4.0], [1, 1], 1, TypeError, "must hold integers"),
    ],
)
def test_pass_at_k_rejects_bad_input(num_samples, num_correct, k, error, message):
    with pytest.raises(error, match=message):
        pass_at_k(num_samples, num_correct, k)


def test_maj_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="answers has 1 problems but correct has 2"):
        maj_at_k([["a"]], [[True], [False]], 1)
    with pytest.raises(ValueError, match="problem 0: 2 answers but 3 verdicts"):
        maj_at_k([["a", "b"]], [[True, False, True]], 1)
    with pytest.raises(
        ValueError, match=r"problem 1: answer '7' is graded correct in 2 samples and incorrect in 1"
    ):
        maj_at_k([["1"], ["7", "7", "8", "7"]], [[True], [True, False, False, True]], 1)
    with pytest.raises(
        TypeError, match=r"correct\[0\] must be a 1-D sequence of booleans, got dtype float64"
    ):
        maj_at_k([["a", "b"]], [[1.0, 0.0]], 1)
    with pytest.raises(ValueError, match=r"correct\[0\] is empty"):
        maj_at_k([[]], [[]], 1)
    with pytest.raises(ValueError, match="no problems"):
        passk_metrics([])
