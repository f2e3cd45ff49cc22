"""Build megatron-core ``GPTModel`` chunks from a :class:`~nemo_quagmire.config.model.ModelConfig`.

Which transformer layer implementation runs is decided once, by a pure function
(:func:`select_layer_spec_and_fp8`) that CPU tests can exercise for every case: with Transformer Engine (the
GPU/NGC path) the TE layer spec, fused kernels and an optional FP8 recipe; without it megatron's local spec
(torch RMSNorm, unfused attention) and no FP8. Asking for FP8 where it cannot run is an error at start-up,
naming the missing piece, instead of a crash deep inside the first forward pass.

Two settings are not megatron's defaults and matter for correctness:

- ``calculate_per_token_loss=True``: the project's losses arrive already normalised by *global* token/sequence
  counts, so micro-batch losses must be summed, not averaged. With this flag megatron's schedule does not
  divide each micro-batch loss by the number of micro-batches and its DDP sums gradients across data-parallel
  ranks instead of averaging them (see ``train_step``).
- ``use_cpu_initialization=True`` on CPU: weights are drawn full-size from the CPU generator and then split,
  so a tensor-parallel model starts from exactly the weights of the TP=1 model with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from packaging.version import Version

from nemo_quagmire.config.model import Fp8Recipe, ModelConfig
from nemo_quagmire.config.parallel import ParallelConfig
from nemo_quagmire.megatron import compat
from nemo_quagmire.utils.logging import get_logger

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = [
    "LayerSpecSelection",
    "build_model",
    "detect_transformer_engine",
    "make_transformer_config",
    "select_layer_spec_and_fp8",
]

logger = get_logger(__name__)

# Oldest Transformer Engine for which megatron-core 0.16.1 builds each recipe (fp8_utils.get_fp8_recipe).
_FP8_MIN_TE_VERSION: dict[str, str] = {
    "delayed": "1.0",
    "mxfp8": "2.1.0",
    "tensorwise": "2.2.0.dev0",
    "blockwise": "2.3.0.dev0",
}
# Oldest GPU architecture with the tensor-core support each recipe needs (Ada/Hopper FP8, Hopper blockwise
# scaling, Blackwell microscaling).
_FP8_MIN_CAPABILITY: dict[str, tuple[int, int]] = {
    "delayed": (8, 9),
    "tensorwise": (8, 9),
    "blockwise": (9, 0),
    "mxfp8": (10, 0),
}


@dataclass(frozen=True)
class LayerSpecSelection:
    """What :func:`build_model` will build.

    Attributes:
        backend: ``"transformer_engine"`` (TE layer spec, fused kernels) or ``"local"`` (megatron-core modules
            on plain torch; the only choice on CPU).
        fp8_recipe: the FP8 recipe to train with, or None.
    """

    backend: Literal["transformer_engine", "local"]
    fp8_recipe: Fp8Recipe | None


def select_layer_spec_and_fp8(
    model_cfg: ModelConfig, *, te_version: str | None, gpu_capability: tuple[int, int] | None = None
) -> LayerSpecSelection:
    """Choose the layer implementation and validate the FP8 request (pure: no import of TE or megatron).

    Args:
        model_cfg: the model; only ``fp8`` is read.
        te_version: installed Transformer Engine version, or None when it is not importable.
        gpu_capability: CUDA compute capability ``(major, minor)`` of this GPU, or None when unknown/no GPU
            (then only the TE version is checked).

    Raises:
        ValueError: FP8 requested without TE, with a TE too old for the recipe, or on a GPU without the
            needed FP8 support. The message names the recipe, the versions and the fix.
    """
    recipe = model_cfg.fp8
    if te_version is None:
        if recipe is not None:
            raise ValueError(
                f"fp8={recipe!r} needs Transformer Engine, which is not importable here (it needs CUDA); "
                "install transformer-engine[pytorch] or use an NGC PyTorch container, or set fp8: null to "
                f"train in {model_cfg.params_dtype}"
            )
        return LayerSpecSelection(backend="local", fp8_recipe=None)
    if recipe is not None:
        needed = _FP8_MIN_TE_VERSION[recipe]
        if Version(te_version) < Version(needed):
            raise ValueError(
                f"fp8={recipe!r} needs Transformer Engine >= {needed} with megatron-core 0.16.1, found "
                f"{te_version}; upgrade TE or choose fp8='delayed'"
            )
        min_cap = _FP8_MIN_CAPABILITY[recipe]
        if gpu_capability is not None and tuple(gpu_capability) < min_cap:
            raise ValueError(
                f"fp8={recipe!r} needs a GPU of compute capability >= {min_cap[0]}.{min_cap[1]}, this one "
                f"is {gpu_capability[0]}.{gpu_capability[1]}; choose another recipe (delayed/tensorwise need "
                "8.9, blockwise 9.0, mxfp8 10.0) or set fp8: null"
            )
    return LayerSpecSelection(backend="transformer_engine", fp8_recipe=recipe)


def detect_transformer_engine() -> str | None:
    """Version of an importable Transformer Engine, else None (importing TE without CUDA raises, not only
    ImportError, so any failure counts as absent)."""
    try:
        from importlib.metadata import version

        import transformer_engine  # noqa: F401

        return version("transformer-engine")
    except Exception:  # noqa: BLE001 - OSError/RuntimeError when CUDA libraries are missing
        return None


def make_transformer_config(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig, selection: LayerSpecSelection, *, cuda: bool
) -> TransformerConfig:
    """The megatron ``TransformerConfig`` for ``model_cfg`` under ``parallel_cfg`` on this backend.

    Fused kernels (and TE's gradient-accumulation fusion) are used with the TE spec only; without TE they
    either need apex or CUDA, so they are all off, as are sequence parallelism (needs TE norms) and
    persistent layer norm (apex).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if model_cfg.params_dtype == "bf16" else torch.float32
    fused = selection.backend == "transformer_engine"
    fp8 = selection.fp8_recipe is not None
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.query_groups,
        kv_channels=model_cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        qk_layernorm=model_cfg.qk_layernorm,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=model_cfg.attention_dropout,
        hidden_dropout=model_cfg.hidden_dropout,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=model_cfg.params_dtype == "bf16",
        calculate_per_token_loss=True,
        fp8=model_cfg.fp8_format if fp8 else None,
        fp8_recipe=selection.fp8_recipe if fp8 else "delayed",
        fp8_margin=model_cfg.fp8_margin,
        fp8_amax_history_len=model_cfg.fp8_amax_history_len,
        fp8_amax_compute_algo=model_cfg.fp8_amax_compute_algo,
        gradient_accumulation_fusion=fused,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        apply_rope_fusion=fused,
        persist_layer_norm=False,
        use_cpu_initialization=not cuda,
        recompute_granularity=None if model_cfg.recompute == "none" else model_cfg.recompute,
        # full: every layer is its own recompute unit, as the memory plan assumes
        recompute_method="uniform" if model_cfg.recompute == "full" else None,
        recompute_num_layers=1 if model_cfg.recompute == "full" else None,
    )


def build_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> list[GPTModel]:
    """Build this rank's model chunk(s) for the parallel layout set up by ``initialize_parallel``.

    The pipeline stage of this rank decides what the chunk holds (embedding on the first stage, final norm and
    output layer on the last). Virtual pipeline stages are not supported, so the list has one chunk; it is a
    list because megatron's schedules and optimizer take one. Weights are random (seeded by
    ``initialize_parallel``); load a checkpoint or HF weights into them.

    Raises:
        ValueError: FP8 requested where it cannot run, sequence parallelism without TE, or ``parallel_cfg``
            not matching the initialised megatron parallel state.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    cuda = torch.cuda.is_available()
    compat.activate()
    live = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    wanted = (parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size)
    if live != wanted:
        raise ValueError(
            f"parallel_cfg asks for (TP, PP) = {wanted} but megatron was initialised with {live}; pass the "
            "ParallelConfig given to initialize_parallel"
        )
    capability = torch.cuda.get_device_capability() if cuda else None
    selection = select_layer_spec_and_fp8(
        model_cfg, te_version=detect_transformer_engine(), gpu_capability=capability
    )
    if parallel_cfg.sequence_parallel and selection.backend != "transformer_engine":
        raise ValueError(
            "sequence_parallel=True needs Transformer Engine norms (megatron's torch norm asserts it off); "
            "set sequence_parallel: false"
        )
    config = make_transformer_config(model_cfg, parallel_cfg, selection, cuda=cuda)
    if selection.backend == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model_cfg.qk_layernorm)
    else:
        from nemo_quagmire.megatron.attention import local_attention_modules

        spec = get_gpt_layer_local_spec(qk_layernorm=model_cfg.qk_layernorm, normalization="RMSNorm")
        attention = spec.submodules.self_attention
        attention.module, attention.submodules.core_attention = local_attention_modules(config)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=model_cfg.rotary_percent,
        rotary_base=model_cfg.rotary_base,
        rope_scaling=model_cfg.rope_scaling_factor is not None,
        rope_scaling_factor=model_cfg.rope_scaling_factor or 8.0,
    )
    if cuda:
        model.cuda(torch.cuda.current_device())
    logger.info(
        "built GPTModel (%s layers, backend=%s, core attention=%s, fp8=%s): %d parameters on this rank",
        model_cfg.num_layers,
        selection.backend,
        type(model.decoder.layers[0].self_attention.core_attention).__name__,
        selection.fp8_recipe,
        sum(p.numel() for p in model.parameters()),
    )
    return [model]
