"""Fault-injecting answer checkers for the grader tests. They live in the tests, never in the package: a
grader gets one only when a test passes it in (`MathGrader(checker=...)`), so no completion can trigger a
fault in production. They are picklable module-level classes, so worker processes can import them."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from nemo_quagmire.rewards import MathVerifyChecker

HANG = "HANG"  # as an answer: the worker hangs where no alarm reaches (killed by the parent's deadline)
CRASH = "CRASH"  # as an answer: the worker process dies at once
SLOW = "SLOW"  # inside an answer: math-verify's parse sleeps, so math-verify's own alarm fires
HANG_GOLD = "HANG_GOLD"  # as a gold: parsing the gold hangs


def _hang() -> None:
    print("hanging", flush=True)  # a test in a subprocess waits for this before killing the main process
    while True:
        time.sleep(60)


@dataclass(frozen=True)
class FaultyChecker(MathVerifyChecker):
    """math-verify, except for the marker strings above."""

    def setup(self) -> None:
        super().setup()
        import math_verify.parser

        extract = math_verify.parser.extract_target_from_pred

        def slow_extract(pred: str, *args: Any, **kwargs: Any) -> Any:
            if SLOW in pred:
                time.sleep(60)  # interrupted by math-verify's signal.alarm
            return extract(pred, *args, **kwargs)

        math_verify.parser.extract_target_from_pred = slow_extract

    def parse_gold(self, gold: str) -> list[Any]:
        if gold == HANG_GOLD:
            _hang()
        return super().parse_gold(gold)

    def check(self, parsed_gold: list[Any], answer: str) -> bool:
        if answer == HANG:
            _hang()
        if answer == CRASH:
            os._exit(13)
        return super().check(parsed_gold, answer)


@dataclass(frozen=True)
class BrokenSetupChecker(MathVerifyChecker):
    """A checker whose worker cannot start."""

    def setup(self) -> None:
        raise ImportError("math-verify is missing (simulated)")


@dataclass(frozen=True)
class CountingChecker(MathVerifyChecker):
    """math-verify that records its calls (in-process grading only: records stay in the checking process)."""

    gold_parses: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def parse_gold(self, gold: str) -> list[Any]:
        self.gold_parses.append(gold)
        return super().parse_gold(gold)

    def check(self, parsed_gold: list[Any], answer: str) -> bool:
        self.checks.append(answer)
        return super().check(parsed_gold, answer)
