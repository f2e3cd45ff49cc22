"""Verifiable rewards: final-answer extraction and a math-verify grader that cannot hang."""
