"""Training callbacks: the Pass@k evaluator and the held-out-loss callback."""
