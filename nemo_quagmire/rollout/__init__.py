"""Rollout engines: generate completions (tokens and their log-probs) from the current policy.

The trainer sees one interface (`RolloutEngine`); the in-process Megatron engine (CPU default) and vLLM
(production) sit behind it.
"""
