"""Math answer grading on math-verify, fast enough for pass@256 over thousands of problems and unable to hang.

Why this shape: math-verify verifies about 92 answers per CPU-second and can hang on a pathological answer,
while pass@256 on the 2,866 problems of the seven benchmarks is 734k samples (two CPU-hours if done one by
one). Most of that work repeats itself, so `MathGrader.grade`

1. extracts each completion's final answer (the last `\\boxed{}`); none means wrong, reason "no_answer";
2. groups samples by problem and keeps each distinct answer once (a problem's 256 samples hold few);
3. decides plain numbers (`25`, `-0.5`, `1,600`) in the parent, with the verdict math-verify would give;
4. sends the rest to worker processes, one chunk per problem so its gold is parsed once, under a hard
   per-item deadline (`pool.WorkerPool`).

Verdicts are those of `math_verify.verify(parse("\\boxed{" + gold + "}"), parse("\\boxed{" + answer + "}"))`
with math-verify's defaults, `answer` being the content of the last box. (Parsing the whole completion, as
naive code does, gives the same verdict on a completion that ends in one box; but it also finds an answer in
a completion without a box, and it joins nearby boxes, reading `\\boxed{1} and \\boxed{2}` as {1, 2}.)
An answer math-verify could not decide in time is graded wrong with reason "timeout", and one that crashed
a worker with reason "error".
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from nemo_quagmire.rewards.extraction import extract_final_answer
from nemo_quagmire.rewards.pool import AnswerChecker, InlineRunner, WorkerPool

Reason = Literal["correct", "wrong", "no_answer", "timeout", "error"]


@dataclass(frozen=True, slots=True)
class GradeResult:
    """The grade of one completion.

    Attributes:
        correct: the final answer is equivalent to the gold.
        extracted: the final answer (content of the last `\\boxed{}`), None if there is none.
        reason: "correct", "wrong", "no_answer" (no final answer), "timeout" (could not be checked in time)
            or "error" (checking it failed or crashed a worker); all but "correct" have `correct=False`.
    """

    correct: bool
    extracted: str | None
    reason: Reason


@dataclass(frozen=True)
class GradeStats:
    """Counts from one `MathGrader.grade` call (for logs and benchmarks).

    Attributes:
        num_samples: completions graded.
        num_no_answer: completions without a final answer.
        num_distinct: distinct (problem, answer) pairs among the others.
        num_fast_path: distinct pairs decided in the parent (both plain numbers).
        num_checked: distinct pairs sent to math-verify.
        num_timeout: distinct pairs graded "timeout".
        num_error: distinct pairs graded "error".
    """

    num_samples: int
    num_no_answer: int
    num_distinct: int
    num_fast_path: int
    num_checked: int
    num_timeout: int
    num_error: int


# Plain numbers math-verify reads as a sympy Integer / Float: optional sign, digits, optional decimal part;
# or (no "+", which makes it a set) thousands groups, which latex2sympy2_extended reads as one number.
_PLAIN_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
_THOUSANDS_NUMBER = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_MAX_INTEGER_DIGITS = 1000  # longer integers are left to math-verify (and Python's int() caps at 4300)
_MAX_FLOAT_DIGITS = 15  # up to 15 significant digits sympy makes a Float of 53 bits, distinct per decimal
# math-verify rounds two Floats to 6 decimals before comparing: values further apart than this never match.
_FLOAT_ROUNDING_BAND = Fraction(101, 100_000_000)


@dataclass(frozen=True)
class _PlainNumber:
    value: Fraction
    is_float: bool  # written with a decimal point: a sympy Float (else an Integer)


def _plain_number(text: str) -> _PlainNumber | None:
    """The number `text` spells if the fast path can decide it, else None."""
    if _THOUSANDS_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    elif not _PLAIN_NUMBER.fullmatch(text):
        return None
    integer_part, _, decimals = text.lstrip("+-").partition(".")
    if not decimals:
        return _PlainNumber(Fraction(int(text)), False) if len(integer_part) <= _MAX_INTEGER_DIGITS else None
    if len((integer_part + decimals).lstrip("0")) > _MAX_FLOAT_DIGITS:
        return None
    return _PlainNumber(Fraction(text), True)


def plain_number_verdict(gold: str, answer: str) -> bool | None:
    """math-verify's verdict on two plain numbers, decided without it; None if either is not a plain number
    or the case is too close to call.

    What math-verify 0.9 (on sympy >= 1.13) does with `\\boxed{}` numbers, read from its source and checked
    by tests/rewards/test_math_grader.py on thousands of pairs: an integer becomes a sympy Integer and a
    decimal a Float ("0.5" and ".5" become Rational(1, 2), which compares like the Float). Integers match
    only an equal value. An Integer never equals a Float in sympy and rounding keeps that so, so an Integer
    matches a Float only through `simplify(a - b) == 0`, that is, exactly (25 vs 25.0 is correct, 1 vs
    1.0000001 wrong). Two Floats match if exactly equal or if both round to the same 6 decimals; those
    within 1.01e-6 of each other but unequal are left to math-verify (binary rounding decides them).
    Thousands separators are read as math-verify reads them: "1,600" is 1600 (but "+1,600" is a set and
    "0,111" the float 0.111, so neither is a plain number here).
    """
    gold_number = _plain_number(gold)
    if gold_number is None:
        return None
    answer_number = _plain_number(answer)
    if answer_number is None:
        return None
    if gold_number.value == answer_number.value:
        return True
    if not (gold_number.is_float and answer_number.is_float):
        return False
    if abs(gold_number.value - answer_number.value) > _FLOAT_ROUNDING_BAND:
        return False
    return None


# One pair per kind of comparison sympy has to load code for: numbers, polynomials, equations (solve),
# intervals, sets, relations, matrices, text.
_WARM_UP_PAIRS = (
    ("\\frac{1}{3}", "0.333333"),
    ("x^2+2x+1", "(x+1)^2"),
    ("x + y = 1", "x + y = 2"),
    ("[0, 1)", "(0, 1]"),
    ("\\{1, 2\\}", "\\{2, 3\\}"),
    ("(2, \\infty)", "x > 2"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}"),
    ("\\text{Monday}", "Tuesday"),
)


@dataclass(frozen=True)
class MathVerifyChecker:
    """math-verify as an `AnswerChecker`: gold and answer are parsed as `\\boxed{...}` with math-verify's
    default extraction and compared with its default `verify` options.

    The comparison loop is `verify`'s own (any gold parse against any answer parse, first match wins), run
    pair by pair with `raise_on_error=True` so that a timeout is told apart from a mismatch; a pair that
    fails in any other way counts as unequal, as in `verify`.

    Args:
        timeout_s: math-verify's own `signal.alarm` limit for each parse and each comparison, in whole
            seconds (>= 1). It works in a worker (a main thread) and costs no worker restart.
        warm_up: run a few comparisons in `setup` (~1 s) so that sympy's first-use imports do not fall on
            real answers; False starts faster (tests).
    """

    timeout_s: int = 2
    warm_up: bool = True

    def setup(self) -> None:
        """Import math-verify, keep its warnings (whole 100 KB predictions on a timeout) out of the logs, and
        warm it up: sympy imports its solvers, simplification and set code on first use (~1 s in all),
        which would otherwise fall on the first answers a fresh worker checks and could time them out."""
        import math_verify  # noqa: F401 - the slow import happens here, before the worker reports ready

        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.ERROR)
        for gold, answer in _WARM_UP_PAIRS if self.warm_up else ():
            try:
                self._verify(self._parse(gold), answer)
            except TimeoutError:
                pass

    def parse_gold(self, gold: str) -> list[Any]:
        return self._parse(gold)

    def check(self, parsed_gold: list[Any], answer: str) -> bool:
        return self._verify(parsed_gold, answer)

    def quick_check(self, gold: str, answer: str) -> bool | None:
        """The verdict `check` would give, if it can be decided in the parent without math-verify."""
        return plain_number_verdict(gold, answer)

    def _verify(self, parsed_gold: list[Any], answer: str) -> bool:
        from math_verify import verify
        from math_verify.errors import TimeoutException

        timed_out = False
        for gold, prediction in itertools.product(parsed_gold, self._parse(answer)):
            try:
                if verify(gold, prediction, timeout_seconds=self.timeout_s, raise_on_error=True):
                    return True
            except TimeoutException:
                timed_out = True
            except Exception:
                pass  # as in verify(raise_on_error=False): this pair is unequal, try the next
        if timed_out:
            raise TimeoutError(f"math-verify could not compare {answer!r:.200} within {self.timeout_s} s")
        return False

    def _parse(self, text: str) -> list[Any]:
        from math_verify import parse
        from math_verify.errors import TimeoutException

        try:
            return parse("\\boxed{" + text + "}", parsing_timeout=self.timeout_s, raise_on_error=True)
        except TimeoutException as err:
            raise TimeoutError(f"math-verify did not parse {text!r:.200} within {self.timeout_s} s") from err
        except Exception:
            return []  # as in parse(raise_on_error=False)


@dataclass
class _Problem:
    gold: str
    samples_by_answer: dict[str, list[int]] = field(default_factory=dict)  # answer -> completion indices


@dataclass
class _Chunk:
    """A problem's answers for the workers, with the completions that gave each."""

    gold: str
    answers: list[str] = field(default_factory=list)
    samples: list[list[int]] = field(default_factory=list)


def _group_by_problem(
    golds: Sequence[str], completions: Sequence[str], keys: Sequence[Hashable]
) -> tuple[dict[Hashable, _Problem], list[int]]:
    """(problem key -> its gold and distinct final answers, indices of completions without one)."""
    problems: dict[Hashable, _Problem] = {}
    no_answer: list[int] = []
    for index, (gold, completion, key) in enumerate(zip(golds, completions, keys, strict=True)):
        answer = extract_final_answer(completion)
        if answer is None:
            no_answer.append(index)
            continue
        problem = problems.get(key)
        if problem is None:
            problem = problems[key] = _Problem(gold)
        elif problem.gold != gold:
            raise ValueError(
                f"problem key {key!r} has two golds, {problem.gold!r} and {gold!r} (completion {index}): "
                "pass problem_keys that identify problems, or None to group by gold"
            )
        problem.samples_by_answer.setdefault(answer, []).append(index)
    return problems, no_answer


class MathGrader:
    """Grades completions against gold answers; see the module docstring for how.

    Use as a context manager (`with MathGrader() as grader:`), or call `close()`; the worker processes are
    also stopped at garbage collection and at interpreter exit. Not thread-safe.

    Args:
        num_workers: worker processes. 0 grades in this process, for debugging: nothing can stop an answer
            that hangs there, and it must be called from the main thread (math-verify's alarms).
        timeout_s: hard deadline per check, in seconds, enforced by killing the worker: the gold parse and
            each distinct answer get this long. math-verify's own alarms inside the worker are set to
            `max(1, int(timeout_s) // 2)` whole seconds, so most slow answers stop without a restart.
        checker: what the workers run (default: `MathVerifyChecker`). Its `quick_check(gold, answer)`, if
            it has one, decides answers in the parent when it returns a bool.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, *, checker: AnswerChecker | None = None):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 grades in-process), got {num_workers}")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
        if checker is None:
            checker = MathVerifyChecker(timeout_s=max(1, int(timeout_s) // 2))
        self._checker = checker
        self._quick_check: Callable[[str, str], bool | None] | None = getattr(checker, "quick_check", None)
        self._runner: WorkerPool | InlineRunner = (
            WorkerPool(self._checker, num_workers, timeout_s) if num_workers else InlineRunner(self._checker)
        )
        self._closed = False
        self.last_stats: GradeStats | None = None

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes. Idempotent."""
        self._closed = True
        self._runner.close()

    def grade(
        self,
        golds: Sequence[str],
        completions: Sequence[str],
        problem_keys: Sequence[Hashable] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[GradeResult]:
        """Grade each completion against its gold answer.

        Args:
            golds: gold answer per completion (LaTeX without `$`, as in the benchmark files).
            completions: model outputs; the final answer is the last `\\boxed{}`.
            problem_keys: identifies each completion's problem, to parse a gold once and check an answer
                once per problem; samples with the same key must have the same gold. Default: the gold
                string itself.
            progress: called with the number of completions just finished (e.g. `tqdm.update`).

        Returns:
            One `GradeResult` per completion, in order.

        Raises:
            ValueError: the sequences differ in length, or one problem key has two different golds.
        """
        if self._closed:
            raise RuntimeError("this MathGrader is closed")
        keys = golds if problem_keys is None else problem_keys
        if not len(golds) == len(completions) == len(keys):
            raise ValueError(
                f"golds, completions and problem_keys must have one entry per completion, got lengths "
                f"{len(golds)}, {len(completions)} and {len(keys)}"
            )
        results: list[GradeResult | None] = [None] * len(completions)
        problems, no_answer = _group_by_problem(golds, completions, keys)
        no_answer_result = GradeResult(False, None, "no_answer")
        for index in no_answer:
            results[index] = no_answer_result

        # Decide what the parent can; the rest becomes one chunk per problem, longest first so that no
        # worker is left with a long one at the end.
        num_done = len(no_answer)
        chunks: list[_Chunk] = []
        for problem in problems.values():
            chunk = _Chunk(problem.gold)
            for answer, indices in problem.samples_by_answer.items():
                verdict = self._quick_check(problem.gold, answer) if self._quick_check else None
                if verdict is None:
                    chunk.answers.append(answer)
                    chunk.samples.append(indices)
                    continue
                result = GradeResult(verdict, answer, "correct" if verdict else "wrong")
                for i in indices:
                    results[i] = result
                num_done += len(indices)
            if chunk.answers:
                chunks.append(chunk)
        if progress is not None and num_done:
            progress(num_done)
        chunks.sort(key=lambda chunk: -len(chunk.answers))

        failures = {"timeout": 0, "error": 0}

        def on_result(chunk_index: int, item: int, reason: str) -> None:
            chunk = chunks[chunk_index]
            result = GradeResult(reason == "correct", chunk.answers[item], reason)  # type: ignore[arg-type]
            for i in chunk.samples[item]:
                results[i] = result
            if reason in failures:
                failures[reason] += 1
            if progress is not None:
                progress(len(chunk.samples[item]))

        self._runner.run([(chunk.gold, chunk.answers) for chunk in chunks], on_result)
        num_distinct = sum(len(problem.samples_by_answer) for problem in problems.values())
        num_checked = sum(len(chunk.answers) for chunk in chunks)
        self.last_stats = GradeStats(
            num_samples=len(completions),
            num_no_answer=len(no_answer),
            num_distinct=num_distinct,
            num_fast_path=num_distinct - num_checked,
            num_checked=num_checked,
            num_timeout=failures["timeout"],
            num_error=failures["error"],
        )
        return results  # type: ignore[return-value]  # every slot is filled above
