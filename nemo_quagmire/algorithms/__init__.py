"""GRPO math: advantage estimators and policy losses (pure torch, no framework imports)."""
