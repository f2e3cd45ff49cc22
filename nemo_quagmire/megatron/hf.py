"""Hugging Face <-> Megatron weights for the Llama / Mistral / Qwen3 family, at any TP/PP.

Why this exists: the SFT checkpoints the project ranks arrive as Hugging Face directories (config.json plus
safetensors), training runs on megatron-core, and generation runs in vLLM, which loads Hugging Face names. So
weights cross the boundary three times: HF -> Megatron at start-up (:func:`load_hf_weights`), Megatron ->
vLLM after every GRPO update (:func:`iter_hf_weights`, in memory), and Megatron -> HF for a checkpoint that
vLLM or transformers can open (:func:`export_hf`).

The layout mapping is kept pure (torch only, no megatron, no process group) so it can be tested on its own:
:func:`plan_shard` says, for every tensor of one rank's model chunk, which rows or columns of which HF tensors
it is made of; :func:`hf_to_megatron_tensors` cuts shards along that plan and :func:`megatron_to_hf_tensors`
writes shards back through the same plan, so import and export are exact inverses by construction.

The mapping, per layer ``i`` (megatron names of the local layer spec; Transformer Engine's fused spec stores
the two pre-norms as ``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight``,
which are accepted too):

=====================================================  ===================================================
HF (``model.`` prefix)                                 megatron, and how tensor parallelism (TP) splits it
=====================================================  ===================================================
``embed_tokens.weight`` [V, H]                         ``embedding.word_embeddings.weight``: rows (vocab)
``layers.i.input_layernorm.weight``                    ``decoder.layers.i.input_layernorm.weight``: copy
``layers.i.self_attn.{q,k,v}_proj.weight``             ``...self_attention.linear_qkv.weight``: per query
                                                       group g the rows [q heads of g; k_g; v_g], then rows
``layers.i.self_attn.{q,k}_norm.weight`` (Qwen3)       ``...self_attention.{q,k}_layernorm.weight``: copy
``layers.i.self_attn.o_proj.weight``                   ``...self_attention.linear_proj.weight``: columns
``layers.i.post_attention_layernorm.weight``           ``decoder.layers.i.pre_mlp_layernorm.weight``: copy
``layers.i.mlp.{gate,up}_proj.weight`` [F, H]          ``...mlp.linear_fc1.weight``: rank r holds
                                                       [gate rows of r; up rows of r]
``layers.i.mlp.down_proj.weight``                      ``...mlp.linear_fc2.weight``: columns
``norm.weight``                                        ``decoder.final_layernorm.weight``: copy
``lm_head.weight`` (absent when tied)                  ``output_layer.weight``: rows (vocab)
=====================================================  ===================================================

Pipeline parallelism (PP) renumbers layers: a chunk's ``decoder.layers.j`` is global layer
``layer.layer_number - 1``. With tied embeddings and PP > 1 the last stage holds a copy of the embedding as
``output_layer.weight``; it is loaded from ``embed_tokens`` and not exported. The vocabulary is not padded:
``ModelConfig.vocab_size`` is the number of embedding rows and must divide by TP. HF's q/k projections are
already in the rotate-half RoPE layout megatron uses (``rotary_interleaved=False``), so no permutation.

Only local directories are read: there is no hub access on the machines this project runs on, so a repo id
such as ``"Qwen/Qwen3-4B"`` is not resolved; download the snapshot first and pass its directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nemo_quagmire.config.model import ModelConfig
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import get_logger

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ShardSpec",
    "TensorPlan",
    "check_hf_checkpoint",
    "export_hf",
    "hf_config_from_model_config",
    "hf_tensor_shapes",
    "hf_to_megatron_tensors",
    "iter_hf_weights",
    "load_hf_weights",
    "megatron_to_hf_tensors",
    "model_config_from_hf",
    "plan_shard",
    "read_hf_config",
    "save_hf_checkpoint",
    "shard_spec",
]

logger = get_logger(__name__)

# config.json "architectures" entry -> model_type.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
}
# Megatron-core hard-codes these Llama-3.1 RoPE scaling constants (RotaryEmbedding._apply_scaling).
_LLAMA3_ROPE_CONSTANTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_REQUIRED_HF_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoint entries that carry no weights (old Llama checkpoints saved RoPE buffers).
_IGNORED_HF_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
# Transformer Engine's fused layer-norm linears hold the pre-norm weights under these names.
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth)$|.*\.index\.json$")


# ----------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def read_hf_config(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict of a local HF model directory (or of the file itself, or a dict as is)."""
    if isinstance(src, Mapping):
        return dict(src)
    path = Path(src)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no HF config at {path}: pass a local model directory holding config.json (repo ids are not "
            "resolved: there is no hub access; download the snapshot and pass its directory)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON file ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object (an HF config.json)")
    return config


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from either config format: transformers 5 ``rope_parameters``, or 4.x top-level
    ``rope_theta`` plus ``rope_scaling`` (whose type key was once ``type``)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.pop("type", "default"))
    return params


def model_config_from_hf(src: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Map a Llama / Mistral / Qwen3 ``config.json`` onto :class:`ModelConfig`.

    ``params_dtype`` follows the checkpoint's dtype (float32 -> "fp32", bfloat16/float16 -> "bf16": the
    project trains in fp32 or bf16 only); pass ``params_dtype="fp32"`` to train a bf16 checkpoint in fp32.
    ``kv_channels`` is set only where the head dimension is not ``hidden_size // num_attention_heads``, as
    in the presets.

    Args:
        src: a local model directory, its ``config.json``, or the parsed dict.
        **overrides: ModelConfig fields to set instead of the mapped values (e.g. ``params_dtype``).

    Raises:
        ValueError: an unsupported architecture or feature (sliding-window attention, RoPE scaling other than
            Llama-3.1 style, attention/MLP biases, non-SiLU activation, partial rotary, quantized weights),
            naming the config key and value.
    """
    hf = read_hf_config(src)
    where = f"{src}" if not isinstance(src, Mapping) else "the given HF config"
    architecture = _architecture(hf, where)
    missing = [key for key in _REQUIRED_HF_KEYS if key not in hf]
    if missing:
        raise ValueError(f"{where}: config.json lacks {missing}; it is not a complete {architecture} config")
    problems: list[str] = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}: only SiLU-gated MLPs (SwiGLU) are implemented")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true: the model has no biases (megatron add_bias_linear=False)")
    if hf.get("quantization_config"):
        problems.append("quantization_config is set: load the unquantized (bf16/fp32) checkpoint")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", architecture == "MistralForCausalLM")
    if uses_window and window is not None and window < hf["max_position_embeddings"]:
        problems.append(
            f"sliding_window={window} < max_position_embeddings={hf['max_position_embeddings']}: sliding-"
            "window attention is not implemented (the local attention is full causal)"
        )
    windowed = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
    if windowed:
        problems.append(f"layer_types contains {windowed}: only full_attention layers are implemented")
    rope = _rope_parameters(hf)
    scaling_factor = None
    if rope["rope_type"] == "llama3":
        constants = {k: rope.get(k) for k in _LLAMA3_ROPE_CONSTANTS}
        if any(float(v or 0) != float(_LLAMA3_ROPE_CONSTANTS[k]) for k, v in constants.items()):
            problems.append(
                f"rope llama3 scaling with {constants}: megatron-core hard-codes {_LLAMA3_ROPE_CONSTANTS}"
            )
        scaling_factor = float(rope["factor"])
    elif rope["rope_type"] != "default":
        problems.append(
            f"rope_type={rope['rope_type']!r}: only 'default' and Llama-3.1 'llama3' RoPE are implemented"
        )
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        problems.append("partial_rotary_factor != 1: Llama-family HF models rotate the whole head")
    if problems:
        raise ValueError(f"unsupported {architecture} checkpoint ({where}):\n  " + "\n  ".join(problems))

    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    fields: dict[str, Any] = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=None if head_dim == hf["hidden_size"] // heads else head_dim,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        rotary_base=float(rope["rope_theta"]),
        rope_scaling_factor=scaling_factor,
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        qk_layernorm=architecture == "Qwen3ForCausalLM",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        params_dtype="fp32" if dtype == "float32" else "bf16",
    )
    return ModelConfig(**{**fields, **overrides})


def _architecture(hf: Mapping[str, Any], where: str) -> str:
    names = hf.get("architectures") or []
    by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
    architecture = names[0] if names else by_type.get(hf.get("model_type", ""), "")
    if architecture not in SUPPORTED_ARCHITECTURES or len(names) > 1:
        raise ValueError(
            f"{where}: architectures={names} (model_type={hf.get('model_type')!r}) is not supported; this "
            f"converter handles {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture


def hf_config_from_model_config(
    cfg: ModelConfig,
    template: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """The ``config.json`` dict describing ``cfg``, for transformers and vLLM.

    With a template (the config of the checkpoint the model came from), every key is kept (token ids,
    generation settings, the RoPE key format) and the architecture keys are overwritten from ``cfg``, so
    ``hf_config_from_model_config(model_config_from_hf(x), x) == x`` for a supported ``x``. Without one, a
    Qwen3 config is written if ``cfg.qk_layernorm`` else a Llama config (Mistral without sliding window is the
    Llama architecture), with RoPE under both the transformers-5 and the 4.x keys so either version reads it.

    Args:
        cfg: the model.
        template: HF model directory, ``config.json`` path or dict, or None.
        dtype: weight dtype to record; None = ``cfg.params_dtype``.

    Raises:
        ValueError: the template's architecture cannot describe ``cfg`` (QK-norm only exists in Qwen3), the
            template keeps a feature this converter rejects (see :func:`model_config_from_hf`), or ``cfg``
            uses a feature HF Llama models lack (partial rotary).
    """
    if cfg.rotary_percent != 1.0:
        raise ValueError(f"rotary_percent={cfg.rotary_percent}: HF Llama/Qwen3 models rotate the whole head")
    default_arch = "Qwen3ForCausalLM" if cfg.qk_layernorm else "LlamaForCausalLM"
    out = read_hf_config(template) if template is not None else {"architectures": [default_arch]}
    architecture = _architecture(out, f"template {template}")
    if (architecture == "Qwen3ForCausalLM") != cfg.qk_layernorm:
        raise ValueError(
            f"template architecture {architecture} cannot hold a model with qk_layernorm={cfg.qk_layernorm} "
            f"(only Qwen3 has QK-norm); pass a {default_arch} template or none"
        )
    dtype = dtype or _params_dtype(cfg)
    dtype_name = next(name for name, d in _DTYPE_NAMES.items() if d == dtype)
    out.update(
        architectures=[architecture],
        model_type=SUPPORTED_ARCHITECTURES[architecture],
        hidden_act="silu",
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    bias_keys = {"LlamaForCausalLM": ("attention_bias", "mlp_bias"), "Qwen3ForCausalLM": ("attention_bias",)}
    for key in bias_keys.get(architecture, ()):
        if template is None or key in out:
            out[key] = False
    rope: dict[str, Any] = {"rope_theta": cfg.rotary_base, "rope_type": "default"}
    if cfg.rope_scaling_factor is not None:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, **_LLAMA3_ROPE_CONSTANTS)
    if template is None or "rope_parameters" in out:
        out["rope_parameters"] = rope
    if template is None or "rope_theta" in out or "rope_scaling" in out:
        out["rope_theta"] = cfg.rotary_base
        scaled = cfg.rope_scaling_factor is not None
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} if scaled else None
    for key in ("dtype", "torch_dtype"):
        if template is None or key in out:
            out[key] = dtype_name
    # The template's other keys must not describe another model (e.g. a sliding window): read it back.
    described = model_config_from_hf(out, params_dtype=cfg.params_dtype)
    if mismatches := _canonical(described).architecture_mismatches(_canonical(cfg)):
        raise ValueError(f"the config written from template {template} describes another model: {mismatches}")
    return out


def _params_dtype(cfg: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.params_dtype == "bf16" else torch.float32


# ----------------------------------------------------------------------------------------------------
# Pure layout mapping


@dataclass(frozen=True)
class ShardSpec:
    """What one model chunk holds: its tensor-parallel slot and its part of the pipeline.

    Attributes:
        tp_rank: this rank's index in its tensor-parallel group.
        tp_size: tensor-parallel world size.
        layers: global (0-based) ids of the chunk's transformer layers, in local order.
        has_embedding: first pipeline stage (``pre_process``).
        has_final_norm: last pipeline stage (``post_process``).
        has_output_layer: the chunk owns an ``output_layer.weight``: last stage, unless the embeddings are
            tied and the same chunk holds the embedding (then megatron reuses it).
    """

    tp_rank: int
    tp_size: int
    layers: tuple[int, ...]
    has_embedding: bool
    has_final_norm: bool
    has_output_layer: bool


def shard_spec(cfg: ModelConfig, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int) -> ShardSpec:
    """The :class:`ShardSpec` of pipeline stage ``pp_rank`` when layers split evenly (megatron's default)."""
    if cfg.num_layers % pp_size:
        raise ValueError(f"num_layers={cfg.num_layers} does not split evenly over pp_size={pp_size}")
    per_stage = cfg.num_layers // pp_size
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    return ShardSpec(
        tp_rank=tp_rank,
        tp_size=tp_size,
        layers=tuple(range(pp_rank * per_stage, (pp_rank + 1) * per_stage)),
        has_embedding=first,
        has_final_norm=last,
        has_output_layer=last and not (cfg.tie_word_embeddings and first),
    )


@dataclass(frozen=True)
class TensorPlan:
    """One megatron tensor shard as the concatenation, along ``dim``, of slices of HF tensors.

    Attributes:
        dim: the dimension that is sliced in the HF tensors and concatenated in the shard (0 = rows/output
            features, 1 = columns/input features).
        slices: ``(hf_name, start, stop)`` ranges along ``dim``, in shard order.
        tp_sharded: False when every TP rank holds the same full tensor (norm weights).
    """

    dim: int
    slices: tuple[tuple[str, int, int], ...]
    tp_sharded: bool

    @property
    def hf_names(self) -> tuple[str, ...]:
        """The HF tensors this shard is cut from, in first-use order."""
        return tuple(dict.fromkeys(name for name, _, _ in self.slices))


def _split(size: int, spec: ShardSpec, what: str) -> tuple[int, int]:
    """This TP rank's ``[start, stop)`` of ``size`` contiguous rows."""
    if size % spec.tp_size:
        raise ValueError(f"{what} has {size} rows, not divisible by tensor-parallel size {spec.tp_size}")
    part = size // spec.tp_size
    return spec.tp_rank * part, (spec.tp_rank + 1) * part


def _qkv_slices(cfg: ModelConfig, layer: int, spec: ShardSpec) -> tuple[tuple[str, int, int], ...]:
    """Rows of ``linear_qkv`` on this rank: the full weight stacks, per query group g, the q rows of g's
    heads, then k_g, then v_g (the ``[ng, (np/ng + 2) * hn]`` view megatron splits); TP takes contiguous rows,
    i.e. whole groups when TP divides the number of groups."""
    prefix = f"model.layers.{layer}.self_attn."
    d, groups = cfg.head_dim, cfg.query_groups
    q_per_group = cfg.num_attention_heads // groups * d
    segments: list[tuple[str, int, int]] = []
    for g in range(groups):
        segments += [
            (prefix + "q_proj.weight", g * q_per_group, (g + 1) * q_per_group),
            (prefix + "k_proj.weight", g * d, (g + 1) * d),
            (prefix + "v_proj.weight", g * d, (g + 1) * d),
        ]
    start, stop = _split(groups * (q_per_group + 2 * d), spec, f"layer {layer} linear_qkv")
    picked, offset = [], 0
    for name, lo, hi in segments:  # keep the part of each segment inside [start, stop) of the stacked rows
        cut_lo, cut_hi = max(start - offset, 0), min(stop - offset, hi - lo)
        if cut_lo < cut_hi:
            picked.append((name, lo + cut_lo, lo + cut_hi))
        offset += hi - lo
    return tuple(picked)


def plan_shard(cfg: ModelConfig, spec: ShardSpec) -> dict[str, TensorPlan]:
    """For each parameter of the chunk described by ``spec`` (megatron local-spec names, local layer
    numbers), where its values live in the HF checkpoint. Pure; see the module docstring for the mapping."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size

    def rows(name: str, size: int) -> TensorPlan:
        return TensorPlan(0, ((name, *_split(size, spec, name)),), tp_sharded=True)

    def columns(name: str, size: int) -> TensorPlan:
        return TensorPlan(1, ((name, *_split(size, spec, name)),), tp_sharded=True)

    def copy(name: str, size: int) -> TensorPlan:
        return TensorPlan(0, ((name, 0, size),), tp_sharded=False)

    plans: dict[str, TensorPlan] = {}
    if spec.has_embedding:
        plans["embedding.word_embeddings.weight"] = rows("model.embed_tokens.weight", cfg.vocab_size)
    for local, layer in enumerate(spec.layers):
        hf, mg = f"model.layers.{layer}.", f"decoder.layers.{local}."
        plans[mg + "input_layernorm.weight"] = copy(hf + "input_layernorm.weight", h)
        plans[mg + "self_attention.linear_qkv.weight"] = TensorPlan(
            0, _qkv_slices(cfg, layer, spec), tp_sharded=True
        )
        if cfg.qk_layernorm:
            plans[mg + "self_attention.q_layernorm.weight"] = copy(
                hf + "self_attn.q_norm.weight", cfg.head_dim
            )
            plans[mg + "self_attention.k_layernorm.weight"] = copy(
                hf + "self_attn.k_norm.weight", cfg.head_dim
            )
        plans[mg + "self_attention.linear_proj.weight"] = columns(
            hf + "self_attn.o_proj.weight", cfg.num_attention_heads * cfg.head_dim
        )
        plans[mg + "pre_mlp_layernorm.weight"] = copy(hf + "post_attention_layernorm.weight", h)
        gate, up = rows(hf + "mlp.gate_proj.weight", f), rows(hf + "mlp.up_proj.weight", f)
        plans[mg + "mlp.linear_fc1.weight"] = TensorPlan(0, gate.slices + up.slices, tp_sharded=True)
        plans[mg + "mlp.linear_fc2.weight"] = columns(hf + "mlp.down_proj.weight", f)
    if spec.has_final_norm:
        plans["decoder.final_layernorm.weight"] = copy("model.norm.weight", h)
    if spec.has_output_layer:
        source = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        plans["output_layer.weight"] = rows(source, cfg.vocab_size)
    return plans


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint of ``cfg`` with its shape, in layer order (no lm_head if tied)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.num_attention_heads * d, h)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.query_groups * d, h)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.query_groups * d, h)
        if cfg.qk_layernorm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.num_attention_heads * d)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (f, h)
        shapes[p + "mlp.up_proj.weight"] = (f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


# read(hf_name, dim, start, stop) -> the HF tensor narrowed to [start, stop) along dim.
SliceReader = Callable[[str, int, int, int], torch.Tensor]


def _cut(plan: TensorPlan, read: SliceReader) -> torch.Tensor:
    return torch.cat([read(name, plan.dim, start, stop) for name, start, stop in plan.slices], dim=plan.dim)


def _paste(plan: TensorPlan, shard: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
    """Inverse of :func:`_cut`: copy the shard's pieces into their places in the HF tensors ``out``."""
    offset = 0
    for name, start, stop in plan.slices:
        out[name].narrow(plan.dim, start, stop - start).copy_(shard.narrow(plan.dim, offset, stop - start))
        offset += stop - start


def _mapping_reader(hf_state: Mapping[str, torch.Tensor]) -> SliceReader:
    return lambda name, dim, start, stop: hf_state[name].narrow(dim, start, stop - start)


def hf_to_megatron_tensors(
    hf_state: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
) -> dict[str, torch.Tensor]:
    """The state dict (megatron local-spec names) of the chunk at ``(tp_rank, pp_rank)``, from HF tensors.

    Args:
        hf_state: HF name -> tensor (see :func:`hf_tensor_shapes`); only the needed ones are read.
        cfg: the model.
        tp_rank, tp_size, pp_rank, pp_size: the chunk's place; layers split evenly over stages.

    Returns:
        Fresh contiguous tensors, keyed as in the chunk's ``state_dict()`` (without ``_extra_state``).
    """
    plans = plan_shard(cfg, shard_spec(cfg, tp_rank, tp_size, pp_rank, pp_size))
    read = _mapping_reader(hf_state)
    return {name: _cut(plan, read) for name, plan in plans.items()}


def megatron_to_hf_tensors(
    tp_states: Sequence[Mapping[str, torch.Tensor]], cfg: ModelConfig, pp_rank: int, pp_size: int
) -> dict[str, torch.Tensor]:
    """HF tensors held by pipeline stage ``pp_rank``, from the state dicts of all its TP ranks in rank order.

    The exact inverse of :func:`hf_to_megatron_tensors`: the union over stages is the full HF state dict
    (without ``lm_head.weight`` when the embeddings are tied). Megatron's TE norm names are accepted.
    """
    tp_size = len(tp_states)
    shapes = hf_tensor_shapes(cfg)
    specs = [shard_spec(cfg, r, tp_size, pp_rank, pp_size) for r in range(tp_size)]
    plans = [plan_shard(cfg, spec) for spec in specs]
    states = [_local_spec_names(state) for state in tp_states]
    out: dict[str, torch.Tensor] = {}
    for name in _exported(plans[0], cfg):
        ranks = range(tp_size) if plans[0][name].tp_sharded else range(1)
        hf_names = plans[0][name].hf_names
        targets = {n: torch.empty(shapes[n], dtype=states[0][name].dtype) for n in hf_names}
        for r in ranks:
            _paste(plans[r][name], states[r][name], targets)
        out.update(targets)
    return out


def _exported(plans: Mapping[str, TensorPlan], cfg: ModelConfig) -> list[str]:
    """Megatron names whose values are exported (a tied output layer is a copy of the embedding)."""
    return [n for n in plans if not (n == "output_layer.weight" and cfg.tie_word_embeddings)]


def _local_spec_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict with TE fused-norm names renamed to the local spec's, and ``_extra_state`` dropped."""
    out = {}
    for name, value in state.items():
        if name.endswith("_extra_state"):
            continue
        for fused, local in _TE_FUSED_NORMS.items():
            if name.endswith(fused):
                name = name[: -len(fused)] + local
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------------------
# Checkpoint files


def _weight_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it, from the index or the single file."""
    index = hf_dir / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: hf_dir / file for name, file in weight_map.items()}
    single = hf_dir / _SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    raise FileNotFoundError(
        f"{hf_dir} has neither {_INDEX_FILE} nor {_SINGLE_FILE}; only safetensors checkpoints are read "
        "(convert *.bin with transformers: from_pretrained(...).save_pretrained(dir))"
    )


class _SafetensorsReader:
    """Reads slices of HF tensors across a checkpoint's files, opening each file once."""

    def __init__(self, files: Mapping[str, Path], stack: ExitStack) -> None:
        from safetensors import safe_open

        self._files = files
        self._open = lambda path: stack.enter_context(safe_open(path, framework="pt"))
        self._handles: dict[Path, Any] = {}

    def _handle(self, name: str) -> Any:
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def __call__(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        view = self._handle(name).get_slice(name)
        return view[start:stop] if dim == 0 else view[:, start:stop]


def check_hf_checkpoint(hf_dir: str | os.PathLike, cfg: ModelConfig) -> None:
    """Check that the checkpoint in ``hf_dir`` fits ``cfg``: its config (architecture fields), then the
    names and shapes of its tensors (file headers only; no weights are read).

    Raises:
        ValueError: naming each differing config field, missing or unexpected tensor, or tensor whose shape
            differs (expected vs found), and the fix.
    """
    hf_dir = Path(hf_dir)
    found_cfg = model_config_from_hf(hf_dir)
    # max_position_embeddings does not shape or change any weight: a model may be trained on shorter contexts.
    mismatches = {
        k: v
        for k, v in _canonical(found_cfg).architecture_mismatches(_canonical(cfg)).items()
        if k != "max_position_embeddings"
    }
    if mismatches:
        lines = [f"{k}: checkpoint {a!r}, model {b!r}" for k, (a, b) in mismatches.items()]
        raise ValueError(
            f"{hf_dir}/config.json does not describe the model being loaded:\n  " + "\n  ".join(lines) + "\n"
            f"build the model from model_config_from_hf({str(hf_dir)!r}) or load the matching checkpoint"
        )
    files = _weight_files(hf_dir)
    expected = hf_tensor_shapes(cfg)
    problems = [
        f"missing tensor {n!r} (expected shape {list(s)})" for n, s in expected.items() if n not in files
    ]
    extra = [n for n in files if n not in expected and not _IGNORED_HF_TENSORS.match(n)]
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some tied checkpoints also store the copy; transformers ignores it
    problems += [f"unexpected tensor {n!r} (not part of this architecture, e.g. a bias)" for n in extra]
    with ExitStack() as stack:
        reader = _SafetensorsReader(files, stack)
        for name, shape in expected.items():
            if name in files and reader.shape(name) != shape:
                problems.append(
                    f"tensor {name!r} has shape {list(reader.shape(name))}, expected {list(shape)}"
                )
    if problems:
        raise ValueError(
            f"checkpoint {hf_dir} does not match its model config:\n  " + "\n  ".join(problems) + "\n"
            "the weights were saved from a different architecture than config.json describes; re-export the "
            "checkpoint or fix config.json"
        )


def _canonical(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with defaulted fields spelled out, so a preset and an imported config compare equal."""
    return cfg.replace(num_query_groups=cfg.query_groups, kv_channels=cfg.head_dim)


def save_hf_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    hf_config: Mapping[str, Any],
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Write ``config.json`` and safetensors weights the way ``save_pretrained`` does.

    One ``model.safetensors`` if everything fits in ``max_shard_bytes``, else ``model-0000k-of-0000n`` files
    of at most that size (a single larger tensor gets its own file) plus ``model.safetensors.index.json``.
    Tensors are consumed one at a time, so at most one shard is held in memory. Earlier weight files in
    ``out_dir`` are removed first, so loaders never see a mix.

    Returns:
        The weight files written.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if stale.is_file() and (stale.suffix == ".safetensors" or stale.name == _INDEX_FILE):
            stale.unlink()
    temp_files: list[Path] = []
    weight_map: dict[str, int] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = out_dir / f".shard-{len(temp_files):05d}.safetensors.tmp"
        save_file(pending, str(path), metadata={"format": "pt"})
        temp_files.append(path)
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.detach().contiguous()
        weight_map[name] = len(temp_files)
        pending_bytes += size
        total_bytes += size
    if pending or not temp_files:
        flush()
    count = len(temp_files)
    names = (
        [_SINGLE_FILE]
        if count == 1
        else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
    )
    files = [out_dir / name for name in names]
    for temp, final in zip(temp_files, files, strict=True):
        os.replace(temp, final)
    if count > 1:
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": {n: names[k] for n, k in weight_map.items()},
        }
        with atomic_write(out_dir / _INDEX_FILE) as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
    with atomic_write(out_dir / "config.json") as handle:
        json.dump(dict(hf_config), handle, indent=2, sort_keys=True)
        handle.write("\n")
    return files


# ----------------------------------------------------------------------------------------------------
# Megatron model chunks (need megatron's parallel state)


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _chunk_spec(chunk: torch.nn.Module) -> ShardSpec:
    """The :class:`ShardSpec` of a built GPTModel chunk, read from the model (global layer numbers come from
    each layer, so uneven or virtual pipeline splits are handled)."""
    from megatron.core import parallel_state as ps

    model = _unwrap(chunk)
    output = getattr(model, "output_layer", None)
    return ShardSpec(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        layers=tuple(layer.layer_number - 1 for layer in model.decoder.layers),
        has_embedding=bool(model.pre_process),
        has_final_norm=bool(model.post_process),
        has_output_layer=bool(model.post_process) and output is not None and output.weight is not None,
    )


def _chunk_params(chunk: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return _local_spec_names(dict(_unwrap(chunk).named_parameters()))


def load_hf_weights(
    model_chunks: Sequence[torch.nn.Module], hf_dir: str | os.PathLike, model_cfg: ModelConfig
) -> None:
    """Fill this rank's model chunks with the weights of a local HF checkpoint (Llama / Mistral / Qwen3).

    Every rank reads only the slices it holds (safetensors ``get_slice``), so no rank materialises the full
    model. Call it on every rank, before building the optimizer (which copies the weights into its fp32 main
    parameters). The checkpoint is checked first (:func:`check_hf_checkpoint`).

    Args:
        model_chunks: ``build_model`` output (optionally DDP-wrapped), built from ``model_cfg``.
        hf_dir: local directory with ``config.json`` and ``*.safetensors`` (sharded with an index, or one
            file). Hub repo ids are not resolved (no hub access here).
        model_cfg: the config the chunks were built from.

    Raises:
        ValueError: the checkpoint does not fit ``model_cfg`` (see :func:`check_hf_checkpoint`), or a chunk's
            parameter does not have the shape ``model_cfg`` implies (the chunks were built from another
            config); messages name the tensor, both shapes and the fix.
    """
    hf_dir = Path(hf_dir)
    check_hf_checkpoint(hf_dir, model_cfg)
    with ExitStack() as stack, torch.no_grad():
        read = _SafetensorsReader(_weight_files(hf_dir), stack)
        for chunk in model_chunks:
            plans = plan_shard(model_cfg, _chunk_spec(chunk))
            params = _chunk_params(chunk)
            unknown = sorted(set(params) - set(plans))
            if unknown:
                raise ValueError(
                    f"model parameters with no HF counterpart: {unknown}; the model was not built by "
                    "build_model from a Llama/Mistral/Qwen3 ModelConfig"
                )
            for name, plan in plans.items():
                if name not in params:
                    raise ValueError(
                        f"model_cfg implies a parameter {name!r} that the model lacks; build the model from "
                        "the same ModelConfig passed here"
                    )
                shard = _cut(plan, read)
                if params[name].shape != shard.shape:
                    found = list(params[name].shape)
                    raise ValueError(
                        f"model parameter {name!r} is {found} but {hf_dir} under model_cfg gives "
                        f"{list(shard.shape)} (from {', '.join(plan.hf_names)}); build the model from the "
                        "same ModelConfig passed here"
                    )
                params[name].copy_(shard)
    logger.info("loaded HF weights from %s into %d model chunk(s)", hf_dir, len(model_chunks))


def iter_hf_weights(
    model_chunks: Sequence[torch.nn.Module], model_cfg: ModelConfig, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the full model as ``(hf_name, tensor)`` pairs, stage by stage, on every rank.

    This is the in-memory export used to push weights into vLLM after a GRPO update. It is a collective over
    the tensor- and pipeline-parallel groups: every rank of a model replica must iterate it to the end, in
    step. Each megatron tensor is all-gathered over TP on the stage that holds it, re-laid out into HF
    tensors, and broadcast over PP; data-parallel replicas do not communicate (each yields its own copy).
    Peak extra memory is one layer's tensors. A tied output layer is not yielded (vLLM ties it itself).

    Args:
        model_chunks: this rank's chunks (optionally DDP-wrapped).
        model_cfg: the config they were built from.
        dtype: dtype of the yielded tensors; None = ``model_cfg.params_dtype``.

    Yields:
        ``(name, tensor)``: HF names (``model.layers.3.self_attn.q_proj.weight``), full unsharded tensors
        that the caller owns.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dtype = dtype or _params_dtype(model_cfg)
    shapes = hf_tensor_shapes(model_cfg)
    tp_group, tp_size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    pp_group, pp_size = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    specs = [_chunk_spec(chunk) for chunk in model_chunks]
    params = [_chunk_params(chunk) for chunk in model_chunks]
    stage_specs: list[Any] = [specs]
    if pp_size > 1:  # every rank needs to know what each stage holds, to take part in its broadcasts
        stage_specs = [None] * pp_size
        dist.all_gather_object(stage_specs, specs, group=pp_group)
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else [dist.get_rank()]
    device = next(iter(params[0].values())).device

    for stage, held in enumerate(stage_specs):
        for chunk_index, spec in enumerate(held):
            rank_plans = [plan_shard(model_cfg, replace(spec, tp_rank=r)) for r in range(tp_size)]
            for name in _exported(rank_plans[0], model_cfg):
                plan = rank_plans[0][name]
                targets = {n: torch.empty(shapes[n], dtype=dtype, device=device) for n in plan.hf_names}
                if stage == pp_rank:
                    shard = params[chunk_index][name].detach()
                    shards = [shard]
                    if plan.tp_sharded and tp_size > 1:
                        shards = [torch.empty_like(shard) for _ in range(tp_size)]
                        dist.all_gather(shards, shard.contiguous(), group=tp_group)
                    for r, piece in enumerate(shards):
                        _paste(rank_plans[r][name], piece, targets)
                for hf_name, tensor in targets.items():
                    if pp_size > 1:
                        dist.broadcast(tensor, src=pp_ranks[stage], group=pp_group)
                    yield hf_name, tensor


def export_hf(
    model_chunks: Sequence[torch.nn.Module],
    out_dir: str | os.PathLike,
    model_cfg: ModelConfig,
    hf_config_template: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write the model as a HF checkpoint (``config.json`` + safetensors) that transformers and vLLM load.

    A collective over the tensor- and pipeline-parallel groups (call it on every rank); weights are gathered
    to global rank 0, which writes them, streaming shard by shard (:func:`save_hf_checkpoint`). Other
    data-parallel replicas skip the gathering. Returns on every rank once the files exist.

    Args:
        model_chunks: this rank's chunks (optionally DDP-wrapped).
        out_dir: output directory (created; its previous weight files are replaced).
        model_cfg: the config the chunks were built from.
        hf_config_template: the source checkpoint's directory, ``config.json`` or dict: its keys are kept
            (see :func:`hf_config_from_model_config`). If it is a directory, its other non-weight files
            (tokenizer, generation config, chat template) are copied too, so ``out_dir`` is servable as is.
        dtype: dtype of the written weights; None = ``model_cfg.params_dtype``.
        max_shard_bytes: largest safetensors file before the checkpoint is split (HF's default is 5 GB).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dtype = dtype or _params_dtype(model_cfg)
    hf_config = hf_config_from_model_config(model_cfg, hf_config_template, dtype=dtype)
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
        weights = iter_hf_weights(model_chunks, model_cfg, dtype=dtype)
        if dist.get_rank() == 0:
            files = save_hf_checkpoint(weights, out_dir, hf_config, max_shard_bytes=max_shard_bytes)
            _copy_auxiliary_files(hf_config_template, Path(out_dir))
            logger.info("exported HF checkpoint to %s (%d weight file(s))", out_dir, len(files))
        else:
            for _ in weights:
                pass
    dist.barrier()


def _copy_auxiliary_files(template: Any, out_dir: Path) -> None:
    """Copy tokenizer and generation files from a template directory (everything but config and weights)."""
    if template is None or isinstance(template, Mapping) or not Path(template).is_dir():
        return
    if Path(template).resolve() == out_dir.resolve():
        return
    for path in Path(template).iterdir():
        if path.is_file() and path.name != "config.json" and not _WEIGHT_FILE.match(path.name):
            shutil.copy2(path, out_dir / path.name)
