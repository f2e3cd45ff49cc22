"""Evaluation cores: unbiased pass@k / maj@k, benchmark loading and prompt templates."""
