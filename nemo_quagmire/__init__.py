"""nemo-quagmire: choose the SFT checkpoint that will be best after RL.

A high SFT score does not predict the post-RL result; held-out loss and pass@large-k do. This package holds
the pure cores (pass@k, GRPO math, grading, predictor math) and thin adapters to megatron-core, vLLM and NeMo.
"""

__version__ = "0.1.0"
