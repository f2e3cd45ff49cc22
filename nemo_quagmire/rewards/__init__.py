"""Verifiable rewards: final-answer extraction and a math-verify grader that cannot hang."""

from nemo_quagmire.rewards.extraction import extract_final_answer
from nemo_quagmire.rewards.math_grader import GradeResult, GradeStats, MathGrader, MathVerifyChecker
from nemo_quagmire.rewards.reward import math_reward

__all__ = [
    "GradeResult",
    "GradeStats",
    "MathGrader",
    "MathVerifyChecker",
    "extract_final_answer",
    "math_reward",
]
