"""Rollout engines: generate completions (tokens and their log-probs) from the current policy.

The trainer sees one interface (`RolloutEngine`); the in-process Megatron engine (CPU default) and vLLM
(production) sit behind it. vLLM runs in server processes (`vllm_server`) on the trainer ranks that
`distributed` plans, which gathers weights and hands each rank its rollouts.
"""
