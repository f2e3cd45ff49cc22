"""The independent check of a logged pass@k: grade the samples a validation saved, afresh, and apply the
unbiased estimator with `math.comb` (shared by the NeMo 2 and Megatron-Bridge adapter tests)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from nemo_quagmire.eval.samples import read_samples
from nemo_quagmire.rewards.math_grader import MathGrader


def regraded_pass_at_k(eval_dir: Path, num_samples: int, ks: Sequence[int]) -> tuple[dict[int, float], int]:
    """`({k: mean over problems of 1 - C(n-c, k) / C(n, k)}, samples read)` of the samples in `eval_dir`."""
    samples = read_samples(eval_dir)
    with MathGrader(num_workers=0) as grader:
        verdicts = grader.grade([s.gold for s in samples], [s.completion for s in samples])
    correct: dict[str, int] = defaultdict(int)
    for sample, verdict in zip(samples, verdicts, strict=True):
        correct[sample.problem_id] += verdict.correct
    expected = {
        k: sum(1 - math.comb(num_samples - c, k) / math.comb(num_samples, k) for c in correct.values())
        / len(correct)
        for k in ks
    }
    return expected, len(samples)
