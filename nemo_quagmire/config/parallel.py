"""How the model and the batch are split over ranks, and the split rules that need no machine.

Pure pydantic and arithmetic (no process group, no megatron import), so a config validates on a laptop and a
dry run plans a 64-GPU job; ``nemo_quagmire.megatron.parallel`` checks the same split against the launched
world size before it starts megatron's parallel state.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from nemo_quagmire.config.model import ModelConfig

__all__ = ["ParallelConfig", "model_split_problems"]


class ParallelConfig(BaseModel):
    """How the model and the batch are split over ranks. world = TP x PP x CP x DP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_model_parallel_size: PositiveInt = Field(default=1, description="Ranks splitting each layer.")
    pipeline_model_parallel_size: PositiveInt = Field(default=1, description="Ranks splitting the layers.")
    context_parallel_size: PositiveInt = Field(
        default=1, description="Ranks splitting each sequence (needs Transformer Engine attention)."
    )
    data_parallel_size: PositiveInt | None = Field(
        default=None, description="Model replicas; None = whatever the world size leaves (checked if set)."
    )
    sequence_parallel: bool = Field(
        default=False, description="Shard activations along the sequence inside TP regions (TE only)."
    )


def model_split_problems(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> list[str]:
    """What keeps ``model_cfg`` from splitting under ``parallel_cfg`` whatever the world size, one line per
    rule naming the valid sizes: TP must divide the attention heads, the KV heads (query groups), the MLP
    width and the vocabulary (valid values: the common divisors of all four); PP must divide the layers.
    Pure (no process group), so config validation runs it before anything starts.
    """
    tp = parallel_cfg.tensor_model_parallel_size
    pp = parallel_cfg.pipeline_model_parallel_size
    problems: list[str] = []
    split_by_tp = {
        "num_attention_heads": model_cfg.num_attention_heads,
        "num_query_groups (KV heads)": model_cfg.query_groups,
        "ffn_hidden_size": model_cfg.ffn_hidden_size,
        "vocab_size": model_cfg.vocab_size,
    }
    if undivided := [f"{what}={value}" for what, value in split_by_tp.items() if value % tp]:
        valid = _divisors(math.gcd(*split_by_tp.values()))
        hint = ""
        if model_cfg.vocab_size % tp:
            padded = -(-model_cfg.vocab_size // tp) * tp
            hint = f" (or pad the embedding table to {padded} rows: extra ids never appear in data)"
        problems.append(
            f"parallel.tensor_model_parallel_size={tp} does not divide {', '.join(undivided)}; valid: "
            f"{', '.join(map(str, valid))}{hint}"
        )
    if model_cfg.num_layers % pp:
        problems.append(
            f"parallel.pipeline_model_parallel_size={pp} does not divide num_layers={model_cfg.num_layers}; "
            f"valid: {', '.join(map(str, _divisors(model_cfg.num_layers)))}"
        )
    return problems


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
