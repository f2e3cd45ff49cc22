"""The Megatron engine: the only package importing megatron.core (lazily: its modules import without it)."""
