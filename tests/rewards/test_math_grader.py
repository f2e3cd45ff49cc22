"""MathGrader verdicts against math-verify itself: the parent's plain-number fast path on thousands of number
pairs, a table of answer kinds through the whole grader, answer dedupe, grouping and the reward function.
Grading here runs in-process (num_workers=0); the worker pool is tested in test_pool.py."""

from __future__ import annotations

import logging
import random
from fractions import Fraction

import pytest
from math_verify import parse, verify

from nemo_quagmire.rewards import GradeResult, MathGrader, MathVerifyChecker, math_reward
from nemo_quagmire.rewards.math_grader import plain_number_verdict
from tests.rewards.faults import CountingChecker


def boxed(answer: str) -> str:
    return f"Reasoning... so the answer is $\\boxed{{{answer}}}$."


def reference_verdict(gold: str, answer: str, _cache: dict[str, list] = {}) -> bool:  # noqa: B006 - memo
    """math-verify called as the grader specifies: both sides parsed as \\boxed{...}, default options."""
    for text in (gold, answer):
        if text not in _cache:
            _cache[text] = parse("\\boxed{" + text + "}")
    return verify(_cache[gold], _cache[answer])


@pytest.fixture(scope="module")
def grader():
    with MathGrader(num_workers=0) as grader:
        yield grader


# ---------------------------------------------------------------------------------------------------------
# The plain-number fast path gives math-verify's verdict.

EDGE_PAIRS = [
    ("25", "25.0"),  # Integer vs Float, exactly equal: correct (through simplify(a - b) == 0)
    ("25", "25.000"),
    ("1", "1.0000001"),  # Integer vs Float never rounds: wrong, however close
    ("1", "0.9999999"),
    ("0.1", "0.10000001"),  # two Floats equal to 6 decimals: correct (decided by math-verify)
    ("0.1", "0.1000006"),
    ("0.5", "0.5000004"),  # "0.5" becomes Rational(1, 2) in math-verify, and rounds like a Float
    ("0.5", ".5"),
    ("0.5", "0.50"),
    ("0", "-0"),  # negative zero is zero
    ("0", "-0.0"),
    ("-0.0", "0.0"),
    ("7", "007"),  # leading zeros are dropped
    ("7", "+7"),
    ("-7", "-007"),
    ("0.25", "00.25"),
    ("2125", "2,125"),  # a thousands separator makes one number
    ("-1234", "-1,234"),
    ("1234.5", "1,234.5"),
    ("1234", "1,234.0"),
    ("1234", "+1,234"),  # ... but with a "+" it is the set {1, 234}: left to math-verify
    ("0.111", "0,111"),  # ... and "0,111" is the float 0.111: left to math-verify
    ("12.5", "12,5"),  # a set {5, 12}
    ("5", "5."),  # "5." does not parse as a number: math-verify compares strings
    ("123456789012345678901234567890", "123456789012345678901234567890"),  # big ints are exact
    ("123456789012345678901234567890", "123456789012345678901234567891"),
    ("123456789012345678", "123456789012345678.0"),  # 21 digits: beyond 53-bit Floats, left to math-verify
    ("3.14159265358979", "3.141592653589793"),  # 16 digits: left to math-verify
    ("0.000000000000001", "0"),  # a tiny Float is not 0
    ("1000000000000.5", "1000000000000.4"),
]


def _random_number_pairs(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Pairs of plain numbers that probe each rule: integers of all sizes with signs and leading zeros,
    decimals equal under other spellings, decimals 1e-8..1e-5 apart (around the 6-decimal rounding),
    thousands separators, and integer-decimal mixes."""

    def integer() -> str:
        digits = str(rng.randrange(10 ** rng.choice([1, 2, 3, 6, 9, 15, 16, 17, 25])))
        return rng.choice(["", "", "-", "+"]) + "0" * (rng.random() < 0.1) + digits

    def decimal() -> str:
        whole = str(rng.randrange(10 ** rng.choice([1, 1, 2, 3, 6, 9, 12])))
        fraction = "".join(rng.choices("0123456789", k=rng.randint(1, 10)))
        return rng.choice(["", "", "-", "+"]) + whole + "." + fraction

    def respell(number: str) -> str:  # the same value, written differently
        sign = "-" if number.startswith("-") else ""
        digits = number.lstrip("+-")
        return sign + rng.choice(["0", ""]) + digits + ("0" if "." in digits else rng.choice([".0", ".000"]))

    def nudge(number: str) -> str:  # a decimal close to `number`
        step = Fraction(rng.choice([1, 4, 5, 6, 9, 10, 11, 20]), 10 ** rng.choice([6, 7, 8]))
        return f"{float(Fraction(number.lstrip('+')) + rng.choice([-1, 1]) * step):.9f}"

    def with_commas(number: str) -> str:
        sign = "-" if number.startswith("-") else ""
        whole, dot, fraction = number.lstrip("+-").partition(".")
        whole = f"{int(whole):,}"
        return sign + whole + dot + fraction

    makers = [
        lambda: (integer(), integer()),
        lambda: (lambda a: (a, str(int(a) + rng.choice([-1, 0, 1]))))(integer()),
        lambda: (lambda a: (a, respell(a)))(integer()),
        lambda: (lambda a: (a, a + "." + "0" * rng.randint(0, 6) + str(rng.randint(1, 9))))(integer()),
        lambda: (decimal(), decimal()),
        lambda: (lambda a: (a, respell(a)))(decimal()),
        lambda: (lambda a: (a, nudge(a)))(decimal()),
        lambda: (lambda a: (a, with_commas(a)))(rng.choice([integer, decimal])()),
        lambda: (decimal(), integer()),
    ]
    pairs = []
    for _ in range(count):
        gold, answer = rng.choice(makers)()
        pairs.append((gold, answer) if rng.random() < 0.5 else (answer, gold))
    return pairs


def test_fast_path_agrees_with_math_verify_on_number_pairs():
    pairs = EDGE_PAIRS + _random_number_pairs(random.Random(0), 2000)
    decided = [(g, a, v) for g, a in pairs if (v := plain_number_verdict(g, a)) is not None]
    mismatches = [(g, a, v) for g, a, v in decided if reference_verdict(g, a) != v]
    assert not mismatches, f"fast path differs from math-verify on {len(mismatches)} pairs: {mismatches[:10]}"
    # The path must also be useful: it decides most pairs, both ways.
    assert len(decided) > 0.7 * len(pairs)
    assert {v for _, _, v in decided} == {True, False}


@pytest.mark.parametrize(
    ("gold", "answer", "expected"),
    [
        ("25", "25.0", True),
        ("1", "1.0000001", False),
        ("2125", "2,125", True),
        ("-7", "-007", True),
        ("0.1", "0.10000001", None),  # within the rounding band: math-verify decides
        ("1234", "+1,234", None),  # not a plain number
        ("5", "5.", None),
        ("3.14159265358979", "3.141592653589793", None),
        ("\\frac{1}{2}", "0.5", None),
    ],
)
def test_fast_path_decides_plain_numbers_only(gold, answer, expected):
    assert plain_number_verdict(gold, answer) is expected


# ---------------------------------------------------------------------------------------------------------
# Whole-grader verdicts on answer kinds (expected values are math-verify's, explained per row).

VERDICTS = [
    # Fractions and decimals: a Float matches a Rational when both round to the same 6 decimals.
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\frac{1}{2}", "\\dfrac12", True),
    ("\\frac{1}{3}", "0.333333", True),
    ("\\frac{1}{3}", "0.33", False),
    ("\\sqrt{2}", "1.41421356", True),
    ("\\sqrt{2}", "1.414", False),
    # Sets are unordered, tuples ordered; "(1, 2)" is an open interval and equals itself however spaced.
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("\\{1, 2\\}", "\\{1, 3\\}", False),
    ("(1,2)", "(1, 2)", True),
    ("(1, 2)", "(2, 1)", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    # Intervals: endpoints and open/closed ends must match.
    ("[0, 1)", "[0,1)", True),
    ("[0, 1)", "(0, 1]", False),
    ("(-\\infty, 0) \\cup \\{1\\}", "(-\\infty,0)\\cup\\{1\\}", True),
    # LaTeX vs plain: the same expression written two ways.
    ("\\sqrt{2}", "2^{1/2}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+2x+1", "(x-1)^2", False),
    ("2 \\times 10^{3}", "2000", True),
    ("4.5 \\times 10^{33}", "4.5\\cdot10^{33}", True),
    ("90^\\circ", "90", True),
    ("18", "18 \\text{ dollars}", True),  # units are dropped
    ("y = 2x + 1", "2x+1", True),  # an assignment's right-hand side
    # Text answers.
    ("\\text{Monday}", "Monday", True),
    ("\\text{Monday}", "\\text{Tuesday}", False),
    ("\\text{(B)}", "B", True),
    # Plain numbers (decided in the parent): the same verdicts as math-verify.
    ("18", "18.0", True),
    ("18", "17", False),
]


@pytest.mark.parametrize(("gold", "answer", "expected"), VERDICTS)
def test_verdicts(grader, gold, answer, expected):
    assert reference_verdict(gold, answer) is expected  # the table is math-verify's own behaviour
    [result] = grader.grade([gold], [boxed(answer)])
    assert result == GradeResult(expected, answer, "correct" if expected else "wrong")


def test_no_final_answer_is_wrong_even_if_the_text_contains_the_gold(grader):
    # math_verify.parse on the whole text would extract 42 and call it correct.
    assert verify(parse("\\boxed{42}"), parse("I think it is 42"))
    results = grader.grade(["42", "42"], ["I think it is 42", "the answer is \\boxed{42"])
    assert results == [GradeResult(False, None, "no_answer")] * 2


# ---------------------------------------------------------------------------------------------------------
# Grouping and dedupe.


def test_gold_parsed_once_and_each_distinct_answer_checked_once():
    checker = CountingChecker(warm_up=False)
    golds = ["\\frac{1}{2}"] * 6 + ["x+1"] * 4 + ["7"] * 3
    answers = ["0.5", "1/2", "0.5", "0.5", "1/2", "\\frac{1}{2}"] + ["1+x", "x+1", "1+x", "x+2"] + ["7"] * 3
    with MathGrader(num_workers=0, checker=checker) as counting_grader:
        results = counting_grader.grade(golds, [boxed(a) for a in answers])
    assert [r.correct for r in results] == [True] * 6 + [True, True, True, False] + [True] * 3
    assert sorted(checker.gold_parses) == ["\\frac{1}{2}", "x+1"]  # "7" vs "7" is a plain-number pair
    assert sorted(checker.checks) == sorted(["0.5", "1/2", "\\frac{1}{2}", "1+x", "x+1", "x+2"])
    stats = counting_grader.last_stats
    assert (stats.num_samples, stats.num_distinct, stats.num_fast_path, stats.num_checked) == (13, 7, 1, 6)


def test_problem_keys_separate_problems_with_the_same_gold():
    checker = CountingChecker(warm_up=False)
    with MathGrader(num_workers=0, checker=checker) as counting_grader:
        counting_grader.grade(["x"] * 4, [boxed("x")] * 4, problem_keys=["p1", "p1", "p2", "p2"])
    assert checker.gold_parses == ["x", "x"]  # one parse per problem
    assert checker.checks == ["x", "x"]  # one check per (problem, answer)


def test_one_problem_key_with_two_golds_is_an_error(grader):
    with pytest.raises(ValueError, match=r"problem key 'p1' has two golds, '1' and '2' \(completion 1\)"):
        grader.grade(["1", "2"], [boxed("1"), boxed("2")], problem_keys=["p1", "p1"])


def test_length_mismatch_is_an_error(grader):
    with pytest.raises(ValueError, match="got lengths 2, 1 and 2"):
        grader.grade(["1", "2"], [boxed("1")])


def test_progress_counts_every_completion_once(grader):
    golds = ["x+1"] * 3 + ["5"] * 3
    completions = [boxed("x+1"), boxed("1+x"), "no answer", boxed("5"), boxed("5"), boxed("6")]
    increments: list[int] = []
    grader.grade(golds, completions, progress=increments.append)
    assert sum(increments) == len(completions)


def test_results_keep_the_input_order(grader):
    golds = ["1", "x", "2", "x", "1"]
    answers = ["1", "y", "3", "x", "2"]
    results = grader.grade(golds, [boxed(a) for a in answers])
    assert [r.extracted for r in results] == answers
    assert [r.correct for r in results] == [True, False, False, True, False]


def test_math_verify_warnings_are_kept_out_of_the_logs(grader):
    # The checker's setup (here in-process) silences them; on a parse timeout math-verify would log the
    # whole prediction as a WARNING.
    for name in ("math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        assert not logging.getLogger(name).isEnabledFor(logging.WARNING)


def test_default_checker_alarm_is_half_the_deadline_in_whole_seconds():
    with MathGrader(num_workers=0, timeout_s=5.0) as g5, MathGrader(num_workers=0, timeout_s=1.5) as g1:
        assert g5._checker == MathVerifyChecker(timeout_s=2)
        assert g1._checker == MathVerifyChecker(timeout_s=1)  # signal.alarm cannot go below 1 s


@pytest.mark.parametrize(("num_workers", "timeout_s"), [(-1, 5.0), (0, 0.0), (0, float("inf"))])
def test_bad_arguments(num_workers, timeout_s):
    with pytest.raises(ValueError, match="num_workers|timeout_s"):
        MathGrader(num_workers=num_workers, timeout_s=timeout_s)


def test_closed_grader_refuses_to_grade():
    grader = MathGrader(num_workers=0)
    grader.close()
    with pytest.raises(RuntimeError, match="closed"):
        grader.grade(["1"], [boxed("1")])


# ---------------------------------------------------------------------------------------------------------
# The reward function.


def test_math_reward(grader):
    golds = ["\\frac{1}{2}", "\\frac{1}{2}", "\\frac{1}{2}"]
    completions = [boxed("0.5"), boxed("0.6"), "0.5 but no box"]
    assert math_reward(completions, golds, grader=grader) == [1.0, 0.0, 0.0]
    # The format reward goes to every completion with a final answer, right or wrong.
    assert math_reward(completions, golds, grader=grader, format_reward=0.1) == [1.1, 0.1, 0.0]


def test_math_reward_rejects_a_non_finite_format_reward(grader):
    with pytest.raises(ValueError, match="format_reward"):
        math_reward([boxed("1")], ["1"], grader=grader, format_reward=float("nan"))
