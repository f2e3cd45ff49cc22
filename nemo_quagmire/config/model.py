"""Typed description of the decoder-only models this project trains, and their parameter counts.

One frozen schema covers the Llama / Mistral / Qwen3 family (RoPE, RMSNorm, SwiGLU, grouped-query attention,
optional QK-norm): field names follow megatron-core's ``TransformerConfig`` so the Megatron builder
(``nemo_quagmire.megatron.model``) maps them one to one, and the HF converter maps ``config.json`` keys onto
them. The module is pure pydantic (no megatron import), so configs validate, compare and count parameters on
any machine, e.g. in a dry-run memory estimate before a job is launched.

Presets hold the architectures of the paper's models, copied from the public ``config.json`` of each model
card (sources cited next to each preset), plus ``tiny``: the same shape as the TRL CPU anchor
(../shared/reference/trl-grpo-cpu-anchor), so CPU benchmarks compare like with like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

__all__ = [
    "FLOAT_REL_TOL",
    "MODEL_PRESETS",
    "NON_ARCHITECTURE_FIELDS",
    "Fp8Recipe",
    "ModelConfig",
    "ParameterCount",
    "count_parameters",
    "get_model_preset",
    "same_value",
]

Fp8Recipe = Literal["delayed", "tensorwise", "blockwise", "mxfp8"]
Recompute = Literal["none", "selective", "full"]

# Fields that do not decide the weights' shapes or meaning: the same weights load under any value of them.
NON_ARCHITECTURE_FIELDS = frozenset(
    {"params_dtype", "attention_dropout", "hidden_dropout", "init_method_std", "recompute"}
    | {"fp8", "fp8_format", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo"}
)
# Relative tolerance of float fields: a value stored as float32 and read back as a double (rms_norm_eps
# 1e-5 -> 9.999999747378752e-06) is off by at most 2**-24 ~ 6e-8; an intended change is far larger.
FLOAT_REL_TOL = 1e-6


def same_value(a: object, b: object) -> bool:
    """Equality of config values, with :data:`FLOAT_REL_TOL` where either side is a float."""
    if isinstance(a, float) or isinstance(b, float):
        numbers = (int, float)
        return isinstance(a, numbers) and isinstance(b, numbers) and math.isclose(a, b, rel_tol=FLOAT_REL_TOL)
    return a == b


class ModelConfig(BaseModel):
    """A GPT-style decoder: pre-norm RMSNorm blocks, RoPE, SwiGLU MLP, grouped-query attention, no biases.

    Equality of two configs means "the same weights fit both": checkpoints store this config and refuse to
    load into a model whose architecture fields differ (precision fields may differ).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_layers: PositiveInt = Field(description="Transformer blocks (HF num_hidden_layers).")
    hidden_size: PositiveInt = Field(description="Residual stream width (HF hidden_size).")
    ffn_hidden_size: PositiveInt = Field(description="SwiGLU inner width (HF intermediate_size).")
    num_attention_heads: PositiveInt = Field(description="Query heads.")
    num_query_groups: PositiveInt | None = Field(
        default=None,
        description="Key/value heads for grouped-query attention (HF num_key_value_heads); None = one per "
        "query head (multi-head attention).",
    )
    kv_channels: PositiveInt | None = Field(
        default=None,
        description="Per-head dimension (HF head_dim); None = hidden_size // num_attention_heads. Qwen3 and "
        "Mistral-NeMo set it explicitly (their heads x head_dim != hidden_size).",
    )
    vocab_size: PositiveInt = Field(
        description="Rows of the embedding table as stored in the checkpoint; must be divisible by the "
        "tensor-parallel size (pad the table, not the tokenizer, if it is not)."
    )
    max_position_embeddings: PositiveInt = Field(
        description="Longest context the model supports; sequences are checked against it."
    )
    rotary_base: PositiveFloat = Field(default=10000.0, description="RoPE theta (HF rope_theta).")
    rotary_percent: float = Field(default=1.0, gt=0.0, le=1.0, description="Fraction of head dim rotated.")
    rope_scaling_factor: PositiveFloat | None = Field(
        default=None,
        description="Llama-3.1-style RoPE frequency scaling factor (HF rope_scaling.factor with rope_type "
        "'llama3', low/high-frequency factors 1/4 and 8192 original positions, as megatron-core hard-codes "
        "them); None = no scaling.",
    )
    norm_epsilon: PositiveFloat = Field(default=1e-5, description="RMSNorm epsilon (HF rms_norm_eps).")
    qk_layernorm: bool = Field(default=False, description="RMSNorm on per-head queries and keys (Qwen3).")
    tie_word_embeddings: bool = Field(default=False, description="Output layer shares the embedding matrix.")
    activation: Literal["swiglu"] = Field(default="swiglu", description="MLP activation: SiLU-gated GLU.")
    init_method_std: PositiveFloat = Field(default=0.02, description="Std of the random initialisation.")
    attention_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="0 keeps log-probs exact.")
    hidden_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="0 keeps log-probs exact.")

    params_dtype: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="Dtype of the model weights; the megatron optimizer keeps fp32 master weights for bf16. "
        "Use fp32 on CPU (bf16 optimizer checkpoints do not round-trip there).",
    )
    fp8: Fp8Recipe | None = Field(
        default=None,
        description="FP8 training recipe (needs Transformer Engine and an FP8-capable GPU): 'delayed' "
        "(amax history), 'tensorwise' (current scaling, TE>=2.2), 'blockwise' (TE>=2.3), 'mxfp8' "
        "(Blackwell); None = no FP8.",
    )
    fp8_format: Literal["e4m3", "hybrid"] = Field(
        default="hybrid", description="'hybrid' = e4m3 forward, e5m2 gradients (the usual choice)."
    )
    fp8_margin: int = Field(default=0, ge=0, description="Delayed scaling: scale margin (power of 2).")
    fp8_amax_history_len: PositiveInt = Field(
        default=1024, description="Delayed scaling: amax history window (steps)."
    )
    fp8_amax_compute_algo: Literal["most_recent", "max"] = Field(
        default="max", description="Delayed scaling: how the scale is derived from the amax history."
    )
    recompute: Recompute = Field(
        default="none",
        description="Activation recomputation in the backward pass: 'selective' recomputes core attention "
        "(megatron's default module), 'full' recomputes every layer from its input (one layer at a time); "
        "less memory for more compute (see the dry-run plan).",
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        heads, groups = self.num_attention_heads, self.query_groups
        if heads % groups:
            raise ValueError(
                f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}: each key/value "
                "head must serve the same number of query heads"
            )
        if self.kv_channels is None and self.hidden_size % heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={heads}; set "
                "kv_channels (the per-head dimension) explicitly"
            )
        if self.fp8 is not None and self.params_dtype != "bf16":
            raise ValueError(
                f"fp8={self.fp8!r} needs params_dtype='bf16' (FP8 GEMMs run inside a bf16 model with fp32 "
                f"master weights), got params_dtype={self.params_dtype!r}"
            )
        return self

    def replace(self, **changes: object) -> ModelConfig:
        """A copy with ``changes`` applied and validated (pydantic's ``model_copy`` skips validation)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @property
    def query_groups(self) -> int:
        """Number of key/value heads (num_query_groups, or num_attention_heads for multi-head attention)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head dimension (kv_channels, or hidden_size // num_attention_heads)."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def architecture_mismatches(self, other: ModelConfig) -> dict[str, tuple[object, object]]:
        """Fields that decide the weights' shapes or meaning and differ: ``{field: (self, other)}``.

        :data:`NON_ARCHITECTURE_FIELDS` (precision, dropouts, recomputation) are left out: the same weights
        load under any. Float fields compare within :data:`FLOAT_REL_TOL` (see :func:`same_value`).
        """
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in type(self).model_fields
            if name not in NON_ARCHITECTURE_FIELDS
            and not same_value(getattr(self, name), getattr(other, name))
        }


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model by part (unsharded). ``output`` is 0 when the embeddings are tied."""

    embedding: int
    per_layer: int
    num_layers: int
    final_norm: int
    output: int

    @property
    def total(self) -> int:
        return self.embedding + self.per_layer * self.num_layers + self.final_norm + self.output

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.output


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Exact parameter count of the model ``cfg`` describes (no biases, as in the Llama family).

    Per layer: Q and output projections ``2 * h * heads * d``, K and V ``2 * h * groups * d``, SwiGLU
    ``3 * h * ffn`` (gate, up, down), two RMSNorm weights ``2 * h`` and, with QK-norm, ``2 * d``.
    """
    h, d = cfg.hidden_size, cfg.head_dim
    attention = 2 * h * cfg.num_attention_heads * d + 2 * h * cfg.query_groups * d
    mlp = 3 * h * cfg.ffn_hidden_size
    norms = 2 * h + (2 * d if cfg.qk_layernorm else 0)
    embedding = cfg.vocab_size * h
    return ParameterCount(
        embedding=embedding,
        per_layer=attention + mlp + norms,
        num_layers=cfg.num_layers,
        final_norm=h,
        output=0 if cfg.tie_word_embeddings else embedding,
    )


MODEL_PRESETS: dict[str, ModelConfig] = {
    # The TRL CPU anchor's Llama (trl-grpo-cpu-anchor/README.md): 4 layers, hidden 128, 4 heads, 2 KV heads,
    # intermediate 344, character-level vocab 100, untied, fp32 = 751,744 parameters. Norm eps and RoPE theta
    # are transformers' LlamaConfig defaults, which that script keeps.
    "tiny": ModelConfig(
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=344,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=100,
        max_position_embeddings=128,
        rotary_base=10000.0,
        norm_epsilon=1e-6,
    ),
    # Qwen/Qwen3-4B-Base config.json (model card: 36 layers, 32 Q / 8 KV heads, 32,768 context, 4.0B params):
    # hidden 2560, intermediate 9728, head_dim 128, vocab 151936, rope_theta 1e6, rms_norm_eps 1e-6,
    # tie_word_embeddings true, qk-norm. 4,022,468,096 parameters.
    "qwen3_4b": ModelConfig(
        num_layers=36,
        hidden_size=2560,
        ffn_hidden_size=9728,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        vocab_size=151936,
        max_position_embeddings=32768,
        rotary_base=1_000_000.0,
        norm_epsilon=1e-6,
        qk_layernorm=True,
        tie_word_embeddings=True,
        params_dtype="bf16",
    ),
    # meta-llama/Meta-Llama-3-8B(-Instruct) config.json: hidden 4096, intermediate 14336, 32 layers, 32 heads,
    # 8 KV heads, vocab 128256, max_position_embeddings 8192, rope_theta 500000, rms_norm_eps 1e-5,
    # rope_scaling null, untied. 8,030,261,248 parameters.
    "llama3_8b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rotary_base=500_000.0,
        norm_epsilon=1e-5,
        params_dtype="bf16",
    ),
    # mistralai/Mistral-Nemo-Instruct-2407 config.json: hidden 5120, head_dim 128 (32 heads x 128 = 4096 !=
    # hidden), intermediate 14336, 40 layers, 8 KV heads, vocab 131072 (2**17), max_position_embeddings
    # 1024000, rope_theta 1e6, rms_norm_eps 1e-5, untied. 12,247,782,400 parameters ("12.2B").
    "mistral_nemo_12b": ModelConfig(
        num_layers=40,
        hidden_size=5120,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        vocab_size=131072,
        max_position_embeddings=1_024_000,
        rotary_base=1_000_000.0,
        norm_epsilon=1e-5,
        params_dtype="bf16",
    ),
}


def get_model_preset(name: str) -> ModelConfig:
    """The preset called ``name``; override fields with ``get_model_preset(name).replace(...)``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(MODEL_PRESETS)}") from None
