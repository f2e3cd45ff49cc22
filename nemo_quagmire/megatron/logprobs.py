"""Per-token log-probabilities (and entropies) of given token sequences under a megatron ``GPTModel``.

GRPO needs ``log pi(token_t | tokens_<t)`` for every completion token, for the current, old and reference
policies. With tensor parallelism each rank holds a vocabulary slice of the logits, and gathering the full
``[B, T, V]`` logits (V = 150k for Qwen3) would cost more memory than the model: log-probs therefore come from
megatron's vocab-parallel cross-entropy and the entropy from three all-reduces of ``[B, T]`` partial sums over
the TP group. The batch runs through megatron's forward-only pipeline schedule, so the same call works at
any TP/PP.

Alignment (the same everywhere in the project): outputs are ``[B, T]`` aligned with ``tokens``;
``logprobs[b, t] = log p(tokens[b, t] | tokens[b, :t])`` for ``1 <= t < lengths[b]``. Position 0 (no
context) and padding positions (``t >= lengths[b]``) are 0. Sequences are right-padded.

Packed rows (SFT sequence packing): a micro-batch may carry ``segment_ids [B, T]`` (1, 2, ... per packed
example, 0 at padding); the forward pass then attends only within a segment (a block-diagonal causal mask), so
each example sees exactly the context it would see alone. RoPE is applied at the row's positions, which only
shifts every query and key of an example by the same offset: attention scores depend on relative positions
only, so this changes nothing but float rounding. The local spec's attention (megatron's
``DotProductAttention`` or its SDPA subclass) applies the mask; Transformer Engine's fused attention ignores
arbitrary masks (check with :func:`honours_attention_masks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nemo_quagmire.data.batching import pack_micro_batches, padded_micro_batches

__all__ = [
    "LogprobOutput",
    "compute_logprobs",
    "honours_attention_masks",
    "packed_attention_mask",
    "token_entropy_from_logits",
    "token_logprobs_from_logits",
    "vocab_parallel_entropy",
]

# Logits per chunk of `token_entropy_from_logits`: its float32 temporaries (tempered logits, shifted, exp,
# product) stay under 4 x 4 B x 2^22 = 64 MiB whatever the micro-batch and vocabulary.
ENTROPY_CHUNK_LOGITS = 2**22


@dataclass(frozen=True)
class LogprobOutput:
    """Float32 ``[B, T]`` tensors aligned with the input tokens (see the module docstring)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` when the vocabulary is split over the tensor-parallel group.

    ``H = log S - sum_v e_v s_v / S`` with ``s = logits - max``, ``e = exp(s)`` and ``S = sum_v e_v``; the two
    sums over the vocabulary are all-reduced across TP (identity in backward, so the result is
    differentiable), the max only shifts.

    Args:
        logits: float ``[..., V / TP]``, this rank's slice of the vocabulary.

    Returns:
        ``[...]``, the same on every TP rank.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    group = ps.get_tensor_model_parallel_group()
    logits_max = logits.detach().amax(dim=-1, keepdim=True)
    dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - logits_max
    exp = shifted.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1), group)
    sum_exp_shifted = reduce_from_tensor_model_parallel_region((exp * shifted).sum(dim=-1), group)
    return sum_exp.log() - sum_exp_shifted / sum_exp


def token_logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Aligned per-token log-probs (and entropies) from vocab-parallel logits; differentiable.

    Args:
        logits: ``[B, T, V / TP]``, the model output at every position (batch first).
        tokens: ``[B, T]`` token ids; ``logits[:, t]`` predicts ``tokens[:, t + 1]``.
        temperature: the logits are divided by it first (use the sampling temperature so that the log-probs
            are those of the distribution the tokens were drawn from).
        with_entropy: also return the entropy of each predictive distribution.

    Returns:
        ``(logprobs, entropy)``, float32 ``[B, T]``, column 0 = 0 (nothing predicts the first token);
        entropy is None unless asked for. Padding is not masked here.
    """
    from megatron.core import tensor_parallel

    logits = _tempered(logits, temperature)
    # Entropy first: vocab_parallel_cross_entropy shifts its input in place.
    entropy = vocab_parallel_entropy(logits) if with_entropy else None  # [B, T]
    next_tokens = torch.roll(tokens, shifts=-1, dims=1)  # [B, T]; the last column wraps and is dropped
    next_logprobs = -tensor_parallel.vocab_parallel_cross_entropy(logits, next_tokens)  # [B, T]
    return _shift_right(next_logprobs), None if entropy is None else _shift_right(entropy)


def token_entropy_from_logits(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Aligned per-token entropies of vocab-parallel logits, for monitoring a training step: no gradient.

    Runs under ``no_grad`` on detached logits, so it keeps nothing for the backward pass, and works on
    chunks of at most :data:`ENTROPY_CHUNK_LOGITS` logits, so its temporaries are a bounded transient
    (<= 64 MiB) rather than several copies of the micro-batch's logits. It only reads ``logits``: call it
    before :func:`token_logprobs_from_logits`, whose cross-entropy may overwrite them in place.

    Args:
        logits: ``[B, T, V / TP]``, the model output at every position (batch first).
        temperature: the logits are divided by it first (the sampling temperature).

    Returns:
        float32 ``[B, T]``, column 0 = 0, the same values as ``token_logprobs_from_logits(...,
        with_entropy=True)``; padding is not masked.
    """
    with torch.no_grad():
        flat = logits.detach().flatten(0, -2)  # [B*T, V/TP]
        rows = max(1, ENTROPY_CHUNK_LOGITS // flat.shape[-1])
        entropy = torch.cat(
            [vocab_parallel_entropy(_tempered(chunk, temperature)) for chunk in flat.split(rows)]
        )
    return _shift_right(entropy.view(logits.shape[:-1]))


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def _shift_right(per_position: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` values at the predicting position -> aligned with the predicted token (column 0 = 0)."""
    return torch.cat([per_position.new_zeros(per_position.shape[0], 1), per_position[:, :-1]], dim=1)


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed rows: causal within each segment, nothing across segments.

    Args:
        segment_ids: ``[B, T]`` segment of each position (padding is a segment of its own).

    Returns:
        Bool ``[B, 1, T, T]``, True where query ``q`` must NOT attend to key ``k`` (megatron's convention).
    """
    seq = segment_ids.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).triu(1)  # [T, T]
    other_segment = segment_ids[:, :, None] != segment_ids[:, None, :]  # [B, T, T]
    return (other_segment | future)[:, None]


def honours_attention_masks(model: Sequence[torch.nn.Module]) -> bool:
    """Whether every attention layer of the chunks applies an explicit mask: megatron's local
    ``DotProductAttention`` (and its SDPA subclass) does; Transformer Engine's fused attention (causal mask
    type) ignores it."""
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return all(
        isinstance(module.core_attention, DotProductAttention)
        for chunk in model
        for module in chunk.modules()
        if isinstance(module, Attention)
    )


def forward_logits(
    model: torch.nn.Module, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """One forward pass of a model chunk on right-padded ``tokens [B, T]`` (causal attention, so padding
    never influences real positions); with ``segment_ids [B, T]``, attention stays within each packed
    segment (see the module docstring). Returns ``[B, T, V / TP]`` logits on the last pipeline stage, hidden
    states elsewhere."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    mask = None if segment_ids is None else packed_attention_mask(segment_ids)
    return model(tokens, positions, mask)


def sequence_pad_multiple(model: Sequence[torch.nn.Module]) -> int:
    """Sequence lengths must be multiples of this: TP with sequence parallelism splits the sequence; FP8
    GEMMs need multiples of 16."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return multiple * 16 if config.fp8 else multiple


def run_schedule(
    model: Sequence[torch.nn.Module],
    micro_batches: Sequence[dict[str, torch.Tensor]],
    loss_func_for: Callable[[dict[str, torch.Tensor]], Callable[[torch.Tensor], tuple]],
    *,
    forward_only: bool,
    variable_shapes: bool = False,
) -> list[Any]:
    """Run megatron's forward(-backward) schedule over ``micro_batches``.

    Every micro-batch's ``tokens`` must have one shape, unless ``variable_shapes`` (e.g. length buckets, each
    padded to its own longest) and there is no pipeline parallelism (stages exchange fixed-shape
    activations). A micro-batch's ``segment_ids``, if present, restrict attention to packed segments (see
    the module docstring).
    ``loss_func_for(micro_batch)`` returns the schedule's loss function for that micro-batch's logits.
    Returns what the loss functions reported, on the last pipeline stage (an empty list elsewhere).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if ps.get_context_parallel_world_size() > 1:
        raise NotImplementedError(
            "context parallelism splits each sequence across ranks, which the log-prob and training paths do "
            "not handle yet (the next token of a chunk lives on another rank); use context_parallel_size: 1"
        )
    shapes = {tuple(mb["tokens"].shape) for mb in micro_batches}
    if len(shapes) != 1 and not (variable_shapes and ps.get_pipeline_model_parallel_world_size() == 1):
        raise ValueError(
            f"all micro-batches must have the same tokens shape [b, T] (pipeline sends fixed "
            f"shapes), got {sorted(shapes)}; pad them to one shape"
        )
    (micro_batch_size, seq_length) = max(shapes)  # what the pipeline schedule sizes its buffers by
    multiple = sequence_pad_multiple(model)
    if bad := sorted({length for _, length in shapes if length % multiple}):
        raise ValueError(
            f"sequence lengths {bad} must be multiples of {multiple} (sequence parallelism splits them "
            "over TP ranks, FP8 GEMMs need multiples of 16); right-pad the tokens"
        )

    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], chunk: torch.nn.Module) -> tuple:
        micro_batch = next(data_iterator)
        logits = forward_logits(chunk, micro_batch["tokens"], micro_batch.get("segment_ids"))
        return logits, loss_func_for(micro_batch)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=list(model),
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def compute_logprobs(
    model: Sequence[torch.nn.Module],
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    *,
    micro_batch_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    packed: bool = False,
) -> LogprobOutput:
    """Log-probs of this data-parallel rank's sequences, aligned with ``tokens`` (see module docstring).

    Runs without gradients, in eval mode (restored afterwards). Every rank of a tensor/pipeline group must
    pass the same ``tokens``; the result is returned on every rank (broadcast from the last stage).

    Args:
        model: this rank's model chunks (``build_model`` output, DDP-wrapped or not).
        tokens: ``[B, T]`` token ids, right-padded (any id at padding positions).
        lengths: ``[B]`` number of real tokens per sequence, ``0 <= lengths <= T``.
        micro_batch_size: sequences per forward pass; ``B`` is padded up to a multiple internally.
        temperature: divide the logits by this (the sampling temperature).
        with_entropy: also return per-position entropies (vocab-parallel, no logits gathered).
        packed: pack the sequences into rows (``data.batching.pack_micro_batches``; ``micro_batch_size``
            then counts packed rows) instead of padding each to ``T``: the same values, fewer tokens through
            the model. Needs attention that honours masks (:func:`honours_attention_masks`) and no pipeline
            parallelism.

    Returns:
        :class:`LogprobOutput` with float32 ``[B, T]`` tensors on the model's device.
    """
    if tokens.dim() != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(
            f"expected tokens [B, T] and lengths [B], got {tuple(tokens.shape)} and {tuple(lengths.shape)}"
        )
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if ((lengths < 0) | (lengths > tokens.shape[1])).any():
        raise ValueError(f"lengths must lie in [0, T={tokens.shape[1]}], got {lengths.tolist()}")
    from megatron.core import parallel_state as ps

    batch, seq = tokens.shape
    device = next(model[0].parameters()).device
    tokens, lengths = tokens.to(device), lengths.to(device)
    parts = []  # packed micro-batches of the non-empty sequences
    if packed:
        nonempty = (lengths > 0).nonzero().squeeze(1)
        if len(nonempty):
            parts = pack_micro_batches(tokens[nonempty], lengths[nonempty], micro_batch_size, pad_id=0)
        micro_batches = [
            {"tokens": part.rows.tokens} | ({"segment_ids": part.rows.segment_ids} if part.needs_mask else {})
            for part in parts
        ]
    else:
        micro_batches = padded_micro_batches(
            {"tokens": tokens}, micro_batch_size, width_multiple=sequence_pad_multiple(model)
        )

    def loss_func_for(micro_batch: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], tuple]:
        def loss_func(logits: torch.Tensor) -> tuple:
            logprobs, entropy = token_logprobs_from_logits(
                logits, micro_batch["tokens"], temperature=temperature, with_entropy=with_entropy
            )
            no_tokens = torch.zeros((), dtype=torch.int, device=logits.device)
            return logits.new_zeros(()), no_tokens, {"logprobs": logprobs, "entropy": entropy}

        return loss_func

    was_training = [chunk.training for chunk in model]
    for chunk in model:
        chunk.eval()
    try:
        with torch.no_grad():
            reported = (
                run_schedule(model, micro_batches, loss_func_for, forward_only=True, variable_shapes=packed)
                if micro_batches
                else []
            )
    finally:
        for chunk, training in zip(model, was_training, strict=True):
            chunk.train(training)

    fields = ["logprobs", "entropy"] if with_entropy else ["logprobs"]
    out = {}
    for field in fields:
        if not ps.is_pipeline_last_stage():
            values = torch.empty(batch, seq, dtype=torch.float32, device=device)
        elif packed:
            values = torch.zeros(batch, seq, dtype=torch.float32, device=device)
            for part, result in zip(parts, reported, strict=True):
                unpacked = result[field].flatten()[part.rows.unpack]  # [n, width]
                values[nonempty[part.sequences], : part.width] = unpacked
            values[:, 0] = 0.0  # a segment's first position was scored after the previous segment
        else:
            values = torch.cat([r[field] for r in reported])[:batch, :seq].contiguous()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(
                values,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
        positions = torch.arange(seq, device=device)
        out[field] = values.masked_fill(positions >= lengths[:, None], 0.0)
    return LogprobOutput(logprobs=out["logprobs"], entropy=out.get("entropy"))
