"""The Megatron engine: the only package that imports megatron.core."""
