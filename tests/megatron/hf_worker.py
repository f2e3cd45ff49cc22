"""Tiny HF checkpoints for the HF-interop tests, and the torchrun worker for their multi-process part.

As a module (imported by test_hf.py): :data:`VARIANTS` and :func:`make_hf_checkpoint` build small random
Llama / Mistral / Qwen3 checkpoints with transformers; :func:`load_hf_state` reads one back.

As a script (one torchrun launch, 2 ranks, gloo): for each layout in :data:`LAYOUTS` and each variant, build
the megatron model, load the HF checkpoint, compare per-token log-probs with the transformers reference that
test_hf.py computed, export, and compare the export (and the in-memory weight stream) with the original
tensors. Rank 0 writes one JSON record per scenario; the pytest side asserts on them.

    torchrun --nproc-per-node 2 tests/megatron/hf_worker.py --checkpoints DIR --inputs in.pt --out res.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

# Tiny shapes: 4 layers (2 per stage at PP=2), hidden 64, 4 query heads sharing 2 KV heads (GQA), vocab 128.
_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
# name -> (transformers config class name, extra config fields). Together they cover untied and tied
# embeddings, a head dim that is not hidden/heads (Qwen3: 32 != 16), QK-norm, and Llama-3.1 RoPE scaling.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(rope_theta=500000.0)),
    "llama_tied_rope_scaled": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            max_position_embeddings=16384,  # Llama-3.1 scaling assumes more than its 8192 original positions
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=None, rope_theta=1_000_000.0)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=32, rope_theta=1_000_000.0)),
}
LAYOUTS: dict[str, dict[str, int]] = {
    "tp2": dict(tensor_model_parallel_size=2),
    "pp2": dict(pipeline_model_parallel_size=2),
    "dp2": {},  # two replicas: export gathers on replica 0 only
}
SCENARIOS = [f"{layout}-{variant}" for layout in LAYOUTS for variant in VARIANTS]
# Export in several files at PP=2 (sharded writing through the distributed path), else in one file.
_SHARD_BYTES = {"tp2": 5 * 2**30, "pp2": 64 * 2**10, "dp2": 5 * 2**30}


def make_hf_checkpoint(variant: str, path: Path, *, max_shard_size: str | None = None) -> Path:
    """Save a random tiny model of ``variant`` with ``save_pretrained`` (safetensors, fp32) to ``path``.

    Every weight is random, norms included (transformers initialises norms to 1, which would hide a swapped
    norm): matrices ~ N(0, 1/fan_in), norm weights ~ 1 + 0.3 N(0, 1).
    """
    import transformers

    config_class, extra = VARIANTS[variant]
    config = getattr(transformers, config_class)(**{**_COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(sum(map(ord, variant)))
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.3 * noise if param.dim() == 1 else noise / math.sqrt(param.shape[1]))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def load_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory (single file or sharded)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def run_scenario(layout: str, variant: str, hf_dir: Path, inputs: dict[str, Any], out_dir: Path) -> dict:
    """Import, log-probs, export and weight stream for one variant under the current parallel layout."""
    import torch.distributed as dist

    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.hf import export_hf, iter_hf_weights, load_hf_weights, model_config_from_hf
    from nemo_quagmire.megatron.logprobs import compute_logprobs
    from nemo_quagmire.megatron.model import build_model

    cfg = model_config_from_hf(hf_dir)
    chunks = build_model(cfg, ParallelConfig(**LAYOUTS[layout]))
    load_hf_weights(chunks, hf_dir, cfg)
    ours = compute_logprobs(chunks, inputs["tokens"], inputs["lengths"], micro_batch_size=2).logprobs
    original = load_hf_state(hf_dir)
    streamed = dict(iter_hf_weights(chunks, cfg))
    iter_ok = streamed.keys() == original.keys() and all(
        torch.equal(streamed[k], original[k]) for k in original
    )
    export_dir = out_dir / f"{layout}-{variant}"
    export_hf(chunks, export_dir, cfg, hf_dir, max_shard_bytes=_SHARD_BYTES[layout])
    everyone_iter_ok = [None] * dist.get_world_size()
    dist.all_gather_object(everyone_iter_ok, iter_ok)
    if dist.get_rank() != 0:
        return {}
    exported = load_hf_state(export_dir)
    config_in = json.loads((hf_dir / "config.json").read_text())
    config_out = json.loads((export_dir / "config.json").read_text())
    return {
        "max_abs_logprob_diff": (ours - inputs["reference"][variant]).abs().max().item(),
        "export_bitwise": exported.keys() == original.keys()
        and all(torch.equal(exported[k], original[k]) for k in original),
        "export_files": len(list(export_dir.glob("*.safetensors"))),
        "config_equal": config_in == config_out,
        "iter_bitwise_every_rank": all(everyone_iter_ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoints", type=Path, required=True, help="directory with one subdir per variant"
    )
    parser.add_argument("--inputs", type=Path, required=True, help="torch file: tokens, lengths, reference")
    parser.add_argument("--out", type=Path, required=True, help="JSON results (written by rank 0)")
    args = parser.parse_args()

    import torch.distributed as dist

    from nemo_quagmire.config.model import get_model_preset
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.parallel import destroy_parallel, initialize_parallel

    inputs = torch.load(args.inputs)
    results: dict[str, dict] = {}
    for layout, sizes in LAYOUTS.items():
        # The layout check reads only head/layer counts; every variant shares them with this preset.
        initialize_parallel(get_model_preset("tiny"), ParallelConfig(**sizes))
        for variant in VARIANTS:
            scenario = f"{layout}-{variant}"
            try:
                results[scenario] = run_scenario(
                    layout, variant, args.checkpoints / variant, inputs, args.out.parent
                )
            except Exception as error:  # noqa: BLE001 - recorded for the test to report; ranks fail alike
                results[scenario] = {"error": f"{type(error).__name__}: {error}"}
        destroy_parallel(destroy_process_group=False)
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
