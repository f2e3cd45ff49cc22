"""Training loops (GRPO; SFT) and what they share: callbacks, metric logging, stage timing."""
