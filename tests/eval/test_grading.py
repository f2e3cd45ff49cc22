"""Grouping graded samples and the metrics report, against brute force over every k-subset."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from nemo_quagmire.eval.grading import (
    GradedSample,
    compute_metrics,
    format_metrics_table,
    group_by_problem,
    resolve_ks,
)


def _brute_force(samples: list[GradedSample], k: int) -> tuple[float, float]:
    """(pass@k, maj@k) of one problem: average over all k-subsets; a vote tie scores its correct fraction.

    Votes: all correct answers form one party (they all equal the gold); wrong answers vote by their text
    without white space."""
    passes, majs = [], []
    for subset in itertools.combinations(samples, k):
        passes.append(any(s.correct for s in subset))
        parties = [
            "RIGHT" if s.correct else s.extracted.replace(" ", "") for s in subset if s.extracted is not None
        ]
        votes = Counter(parties)
        if not votes:
            majs.append(0.0)
            continue
        top = max(votes.values())
        winners = [a for a, v in votes.items() if v == top]
        majs.append(winners.count("RIGHT") / len(winners))
    return sum(passes) / len(passes), sum(majs) / len(majs)


def _random_problem(rng: random.Random, bench: str, pid: str, n: int) -> list[GradedSample]:
    # "0", "0.0" and "0/1" are right (equivalent forms of one answer); "1", " 1" (same vote), "2", None wrong
    answers = [rng.choice(["0", "0.0", "0/1", "1", " 1", "2", None]) for _ in range(n)]
    return [GradedSample(bench, pid, a in ("0", "0.0", "0/1"), a) for a in answers]


def test_metrics_match_brute_force_and_macro_is_unweighted():
    rng = random.Random(0)
    problems = {
        ("a", "a1"): _random_problem(rng, "a", "a1", 6),
        ("a", "a2"): _random_problem(rng, "a", "a2", 5),
        ("a", "a3"): _random_problem(rng, "a", "a3", 7),
        ("b", "b1"): _random_problem(rng, "b", "b1", 4),
    }
    samples = [s for group in problems.values() for s in group]
    rng.shuffle(samples)  # grouping must not depend on order
    report = compute_metrics(samples, ks=[1, 2, 4])
    for bench in ("a", "b"):
        groups = [g for (b, _), g in problems.items() if b == bench]
        got = report["per_benchmark"][bench]
        assert got["num_problems"] == len(groups)
        assert got["num_samples"] == sum(map(len, groups))
        assert got["n"] == min(map(len, groups)) and got["n_max"] == max(map(len, groups))
        for k in (1, 2, 4):
            brute = [_brute_force(g, k) for g in groups]
            assert got[f"pass@{k}"] == pytest.approx(sum(p for p, _ in brute) / len(groups), abs=1e-12)
            assert got[f"maj@{k}"] == pytest.approx(sum(m for _, m in brute) / len(groups), abs=1e-12)
        assert got["mean@n"] == pytest.approx(
            sum(sum(s.correct for s in g) / len(g) for g in groups) / len(groups)
        )
        no_answer = sum(sum(s.extracted is None for s in g) / len(g) for g in groups) / len(groups)
        assert got["no_answer"] == pytest.approx(no_answer)
    for key, value in report["macro"].items():  # unweighted: b's single problem counts as much as a's three
        assert value == pytest.approx(
            (report["per_benchmark"]["a"][key] + report["per_benchmark"]["b"][key]) / 2
        )
    assert set(report["macro"]) == {
        "pass@1",
        "pass@2",
        "pass@4",
        "maj@1",
        "maj@2",
        "maj@4",
        "mean@n",
        "no_answer",
    }


def test_group_by_problem_keeps_first_appearance_order():
    s = [
        GradedSample("b", "x", True, "1"),
        GradedSample("a", "y", False, None),
        GradedSample("b", "z", True, "2"),
    ]
    s.append(GradedSample("b", "x", False, "3"))
    groups = group_by_problem(s)
    assert list(groups) == ["b", "a"] and list(groups["b"]) == ["x", "z"]
    assert groups["b"]["x"] == [s[0], s[3]]


def test_default_ks_run_up_to_the_smallest_n():
    assert resolve_ks({("a", "1"): 9, ("a", "2"): 17}) == [1, 2, 4, 8]
    assert resolve_ks({("a", "1"): 9}, [4, 1, 4]) == [1, 4]


def test_k_above_some_n_names_the_problem():
    with pytest.raises(ValueError, match=r"pass@8 .* b problem '2' has n=5"):
        resolve_ks({("a", "1"): 9, ("b", "2"): 5, ("b", "3"): 6}, [1, 8])
    with pytest.raises(ValueError, match="k must be >= 1"):
        resolve_ks({("a", "1"): 9}, [0, 1])
    with pytest.raises(ValueError, match="no samples"):
        compute_metrics([])


def test_table_lists_benchmarks_and_macro_in_percent():
    samples = [GradedSample("aime24", "1", True, "1"), GradedSample("aime24", "1", False, "2")]
    table = format_metrics_table(compute_metrics(samples, ks=[1]))
    header, row, macro = table.splitlines()
    assert header.split() == ["benchmark", "problems", "n", "pass@1", "maj@1", "mean@n", "no_answer"]
    assert row.split() == ["aime24", "1", "2", "50.0", "50.0", "50.0", "0.0"]
    assert macro.split() == ["macro", "50.0", "50.0", "50.0", "0.0"]


def test_equivalent_correct_answers_vote_together():
    # 3 correct answers in 3 forms against 2 copies of one wrong answer: with all 5 samples the correct party
    # has 3 votes and wins (maj@5 = 1); voting by raw text would make "1" (2 votes) win.
    forms = ["\\frac{1}{2}", "1/2", "0.5"]
    samples = [GradedSample("b", "p", True, a) for a in forms] + [GradedSample("b", "p", False, "1")] * 2
    assert compute_metrics(samples, ks=[5])["per_benchmark"]["b"]["maj@5"] == 1.0
