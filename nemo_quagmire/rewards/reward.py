"""The math correctness reward the GRPO trainer calls: 1.0 for a correct final answer, else 0.0.

Why a thin function over `MathGrader`: the trainer needs one float per completion, and the grader's
guarantees (last-`\\boxed{}` extraction, no reward without a final answer, no hang) carry over unchanged.
An optional format reward is added when a final answer is present at all, to teach a young policy to box its
answer; it is 0 by default because it also pays wrong answers.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from nemo_quagmire.rewards.math_grader import MathGrader


def math_reward(
    completions: Sequence[str],
    golds: Sequence[str],
    *,
    grader: MathGrader,
    format_reward: float = 0.0,
    problem_keys: Sequence[Hashable] | None = None,
) -> list[float]:
    """Correctness (1.0 / 0.0) plus `format_reward` if the completion has a final `\\boxed{}` answer.

    Args:
        completions: model outputs, one per sample  # [B*G]
        golds: gold answer per sample  # [B*G]
        grader: an open `MathGrader`.
        format_reward: added to every completion that has a final answer, right or wrong.
        problem_keys: problem id per sample (e.g. the GRPO group id), so each problem's gold is parsed once
            and each distinct answer checked once; default: the gold string.

    Returns:
        One reward per completion, in order.  # [B*G]
    """
    if not math.isfinite(format_reward):
        raise ValueError(f"format_reward must be a finite number, got {format_reward}")
    results = grader.grade(golds, completions, problem_keys=problem_keys)
    return [float(r.correct) + (format_reward if r.extracted is not None else 0.0) for r in results]
