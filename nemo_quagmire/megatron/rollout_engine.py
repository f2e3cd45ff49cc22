"""Rollouts from the policy itself: KV-cached batched sampling on the trainer's megatron ``GPTModel``.

Why in-process: on a CPU (tests, CI, the tiny GRPO runs) a separate inference server costs more to start and
to keep in sync than generation itself, and the trainer's own parameters are by definition the current
policy, so there is nothing to synchronise (``shares_policy_weights``). Production GPU runs use vLLM behind
the same :class:`~nemo_quagmire.rollout.base.RolloutEngine` interface.

How it runs. Each pass takes up to ``max_batch_size`` rows (prompt ``i`` repeated ``group_size`` times):

- Prompts are **left-padded** to the longest one, so the whole batch is prefilled in one forward pass and
  every row then decodes at the same cache offset. RoPE only sees relative offsets, so shifting a row right
  by its padding changes nothing but float rounding; padding keys are removed by an explicit attention
  mask (causal + key padding in the prefill, key padding in each decode step), which the local spec's
  attention honours. Transformer Engine attention ignores arbitrary masks, so with the TE layer spec only
  equal-length prompts are accepted (use vLLM there).
- Each distinct prompt is prefilled once and its cached keys/values copied to the rows that repeat it (a
  GRPO group repeats its prompt ``group_size`` times), so a group costs one prefill, not G (the saving:
  benchmarks/README.md, "Measurements behind design choices").
- The KV cache is megatron's ``StaticInferenceContext`` passed to ``GPTModel.forward``: megatron's attention
  writes each step's keys/values at the context's offset and attends over the cached prefix. This is the
  leanest path through megatron-core 0.16.1 (its ``StaticInferenceEngine`` adds tokenizers, request objects
  and a text controller the trainer does not need; the dynamic engine needs flash-attn). The cache tensors
  are allocated here, on the model's device (megatron would allocate them on ``torch.cuda.current_device()``).
  With the local layer spec the cache holds keys already rotated by RoPE and attention runs in torch SDPA
  with grouped-query support (``nemo_quagmire.megatron.attention``); megatron's own modules would re-rotate
  and, for grouped-query attention, copy the whole cached prefix at every step.
- Megatron asserts that inference gathers the vocab-parallel logits (``runtime_gather_output``), so every
  tensor-parallel rank sees the full ``[B, V]`` last-position logits each step. For the tiny model that is
  nothing; for a 150k vocabulary it is an all-gather of ``B x V`` floats per token (80 MB at B = 128), which
  is the price of this CPU/debug engine (vLLM does the same gather).
- Sampling (:func:`sample_tokens`) is inverse-CDF on the tempered, optionally top-p truncated, distribution,
  driven by exactly one uniform draw per row and step from a ``torch.Generator``. Every TP rank samples with
  an identically seeded generator from identical gathered logits, so their streams stay in step; the tokens
  of TP rank 0 are then broadcast over the TP group, so agreement does not rest on bitwise-identical kernels.
- Rows that emitted a stop token are fed padding (their outputs discarded) until a quarter of the batch has
  stopped; then they are dropped from the batch and the cache. The loop ends when every row has stopped or
  the token budget is spent.

Log-probs: each sampled token's log-prob under the **full tempered** distribution ``log_softmax(logits / T)``
(not the top-p renormalised one), which is what the trainer recomputes with
``nemo_quagmire.megatron.logprobs.compute_logprobs(..., temperature=T)``. Greedy decoding (``T = 0``) reports
log-probs under ``T = 1``. Alignment follows ``RolloutBatch``: ``logprobs[n, t]`` scores ``tokens[n, t]``.

Random streams: with ``SamplingParams.seed`` set, a call draws from a generator seeded with it (the same
request gives the same batch); without, from the engine's own stream, seeded at construction and advancing
from call to call. Either seed is offset by the data-parallel rank, so replicas sampling different prompts
never share random numbers.

Not supported: pipeline parallelism (raises; use PP = 1 for the in-process engine, or vLLM) and context
parallelism.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nemo_quagmire.config.model import ModelConfig
from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams
from nemo_quagmire.utils.logging import get_logger

if TYPE_CHECKING:
    from megatron.core.inference.contexts import StaticInferenceContext

__all__ = ["MegatronRolloutEngine", "sample_tokens"]

logger = get_logger(__name__)

_DP_SEED_STRIDE = 1_000_003  # seeds of different data-parallel ranks never coincide for ranks < this


def sample_tokens(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; also return the distribution whose log-probs the engine reports.

    Inverse-CDF sampling: one uniform per row (whatever the distribution, so random streams advance by a
    fixed amount per step) is located in the cumulative probabilities. With ``top_p < 1`` the vocabulary is
    first sorted by probability and cut to the smallest prefix whose mass reaches ``top_p`` (the most likely
    token always stays); the draw is from that prefix, renormalised.

    Args:
        logits: float ``[B, V]``, full-vocabulary next-token logits.
        temperature: 0 = greedy (argmax; no random draw), else the logits are divided by it.
        top_p: nucleus mass in (0, 1]; 1 = no truncation. Ignored when greedy.
        generator: source of the uniforms (on ``logits.device``).

    Returns:
        ``(tokens, log_probs)``: long ``[B]``, and float32 ``[B, V]`` = ``log_softmax(logits / temperature)``
        over the full vocabulary, not truncated by top-p (``temperature = 1`` when greedy).
    """
    log_probs = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)  # [B, V]
    if temperature == 0.0:
        return log_probs.argmax(dim=-1), log_probs
    probs = log_probs.exp()
    uniforms = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)  # [B, 1]
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)  # [B, V], non-decreasing
    picked = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    tokens = order.gather(-1, picked) if top_p < 1.0 else picked  # [B, 1]
    return tokens.squeeze(-1), log_probs


@dataclass(frozen=True)
class _Completions:
    """One generation pass, right-padded: tokens and logprobs ``[b, T]``, lengths and truncated ``[b]``."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor


class MegatronRolloutEngine:
    """KV-cached batched generation with the trainer's megatron model chunks (see the module docstring).

    Args:
        model_chunks: this rank's ``build_model`` output (optionally DDP-wrapped): one chunk, PP = 1.
        model_cfg: the config the chunks were built from (vocabulary and context limits).
        pad_id: token that right-pads the returned rows (and fills the left padding of the prefill).
        eos_id: the tokenizer's end-of-sequence id; always a stop token.
        max_batch_size: rows per generation pass (KV-cache rows); larger requests run in several passes.
        seed: seed of the engine's random stream (used by calls whose ``SamplingParams.seed`` is None).

    Raises:
        NotImplementedError: pipeline or context parallelism, or several model chunks.
        ValueError: ``pad_id``/``eos_id`` outside the vocabulary, or ``max_batch_size < 1``.
    """

    def __init__(
        self,
        model_chunks: Sequence[torch.nn.Module],
        model_cfg: ModelConfig,
        *,
        pad_id: int,
        eos_id: int,
        max_batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.attention import Attention
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        if ps.get_pipeline_model_parallel_world_size() > 1 or len(model_chunks) != 1:
            raise NotImplementedError(
                f"MegatronRolloutEngine runs one model chunk at pipeline_model_parallel_size=1, got "
                f"{len(model_chunks)} chunk(s) at PP={ps.get_pipeline_model_parallel_world_size()}; use "
                "the vLLM rollout engine, or pipeline_model_parallel_size: 1 for in-process rollouts"
            )
        if ps.get_context_parallel_world_size() > 1:
            raise NotImplementedError(
                f"MegatronRolloutEngine does not split sequences (context_parallel_size="
                f"{ps.get_context_parallel_world_size()}); use the vLLM rollout engine"
            )
        for name, token in (("pad_id", pad_id), ("eos_id", eos_id)):
            if not 0 <= token < model_cfg.vocab_size:
                raise ValueError(f"{name}={token} is outside the vocabulary [0, {model_cfg.vocab_size})")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._model = model_chunks[0]
        self._cfg = model_cfg
        self._pad_id = pad_id
        self._eos_id = eos_id
        self._max_batch_size = max_batch_size
        self._device = next(self._model.parameters()).device
        self._tp_group = ps.get_tensor_model_parallel_group()
        self._tp_size = ps.get_tensor_model_parallel_world_size()
        self._tp_src = ps.get_tensor_model_parallel_src_rank()
        self._dp_rank = ps.get_data_parallel_rank()
        self._attention = [m for m in self._model.modules() if isinstance(m, Attention)]
        self._masks_padding = all(isinstance(m.core_attention, DotProductAttention) for m in self._attention)
        self._dtype = next(self._model.parameters()).dtype
        self._stream = self._new_generator(seed)

    @property
    def shares_policy_weights(self) -> bool:
        """Always True: generation runs on the trainer's own parameters."""
        return True

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """No-op: the engine reads the policy's parameters directly."""

    def close(self) -> None:
        """Nothing to release (KV caches live only during a call)."""

    def generate(
        self, prompts: Sequence[Sequence[int]], group_size: int, sampling: SamplingParams
    ) -> RolloutBatch:
        """``group_size`` completions of every prompt; prompt ``i`` owns rows ``i*group_size ...``.

        Collective over the tensor-parallel group: every TP rank must call it with the same arguments, and
        gets the same batch back.

        Args:
            prompts: token ids of each prompt (no padding), each non-empty.
            group_size: completions per prompt.
            sampling: temperature, top-p, token budget, extra stop ids and optional seed.

        Returns:
            A :class:`RolloutBatch` of ``len(prompts) * group_size`` rows on the model's device.

        Raises:
            ValueError: empty prompt list or prompt, ids outside the vocabulary, prompt plus budget longer
                than ``max_position_embeddings``, or ragged prompts with Transformer Engine attention
                (``group_size`` comes checked from the config: grpo.group_size, validation.num_samples).
        """
        self._check_request(prompts, sampling)
        generator = self._stream if sampling.seed is None else self._new_generator(sampling.seed)
        stop_ids = torch.tensor(sorted({self._eos_id, *sampling.stop_token_ids}), device=self._device)
        rows = [list(prompt) for prompt in prompts for _ in range(group_size)]
        passes = -(-len(rows) // self._max_batch_size)
        rows_per_pass = -(-len(rows) // passes)  # balanced passes: 130 rows at 128 -> 65 + 65
        was_training = self._model.training
        self._model.eval()
        try:
            with torch.inference_mode():
                parts = [
                    self._generate_pass(rows[start : start + rows_per_pass], sampling, stop_ids, generator)
                    for start in range(0, len(rows), rows_per_pass)
                ]
        finally:
            self._model.train(was_training)
        logger.debug("generated %d rows in %d pass(es) of <= %d rows", len(rows), len(parts), rows_per_pass)
        width = max(part.tokens.shape[1] for part in parts)
        prompt_lengths = torch.tensor([len(row) for row in rows], device=self._device)
        return RolloutBatch(
            tokens=torch.cat([_pad_columns(p.tokens, width, self._pad_id) for p in parts]),
            prompt_lengths=prompt_lengths,
            lengths=torch.cat([p.lengths for p in parts]),
            logprobs=torch.cat([_pad_columns(p.logprobs, width, 0.0) for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]),
            prompt_index=torch.arange(len(prompts), device=self._device).repeat_interleave(group_size),
        )

    def _check_request(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> None:
        vocab = self._cfg.vocab_size
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
            bad = [token for token in prompt if not 0 <= token < vocab]
            if bad:
                raise ValueError(
                    f"prompt {index} has token ids {bad[:5]} outside the vocabulary [0, {vocab})"
                )
        bad_stops = [token for token in sampling.stop_token_ids if not 0 <= token < vocab]
        if bad_stops:
            raise ValueError(f"stop_token_ids {bad_stops} are outside the vocabulary [0, {vocab})")
        longest = max(len(prompt) for prompt in prompts)
        if longest + sampling.max_new_tokens > self._cfg.max_position_embeddings:
            raise ValueError(
                f"longest prompt ({longest} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the "
                f"model's max_position_embeddings={self._cfg.max_position_embeddings}; shorten the prompts "
                "or lower max_new_tokens"
            )
        if not self._masks_padding and len({len(prompt) for prompt in prompts}) > 1:
            raise ValueError(
                "prompts of different lengths need a key-padding attention mask, which this model's "
                "attention (Transformer Engine) ignores; batch equal-length prompts, build the model with "
                "megatron's local layer spec, or use the vLLM rollout engine"
            )

    def _new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self._device).manual_seed(
            (seed + _DP_SEED_STRIDE * self._dp_rank) % 2**63
        )

    def _generate_pass(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        stop_ids: torch.Tensor,
        generator: torch.Generator,
    ) -> _Completions:
        """Generate for ``b`` rows at once: left-padded prefill, then one cached decode step per token."""
        device, budget = self._device, sampling.max_new_tokens
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)  # [b]
        batch, longest = len(prompts), int(prompt_lengths.max())
        total = longest + budget
        left_pad = longest - prompt_lengths  # [b]
        sequence = torch.full((batch, total), self._pad_id, dtype=torch.long, device=device)  # [b, total]
        for row, prompt in enumerate(prompts):
            sequence[row, longest - len(prompt) : longest] = torch.tensor(prompt, device=device)
        positions = torch.arange(total, device=device)
        key_is_padding = positions < left_pad[:, None]  # [b, total]
        ragged = bool(left_pad.any())
        logprobs = torch.zeros(batch, total, device=device)
        completion_lengths = torch.full((batch,), budget, device=device)  # until a stop token says otherwise
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        context = self._new_context(batch, total)

        # Prefill each distinct prompt once (a GRPO group repeats its prompt group_size times), then copy its
        # cached keys/values and logits to the rows that repeat it. Masks: True = masked;
        # [u, 1, longest, longest] = causal | padding key; None = causal.
        distinct, copies = _distinct_rows(sequence[:, :longest])  # [u], [b]
        mask = None
        if ragged:
            causal = positions[None, :longest] > positions[:longest, None]
            mask = (causal[None] | key_is_padding[distinct, None, :longest])[:, None]
        logits = self._forward(sequence[distinct, :longest], positions[:longest], mask, context)[copies]
        if len(distinct) < batch:
            _select_cache_rows(context, copies)
        context.enable_decode_mode()
        rows = torch.arange(batch, device=device)  # the pass rows the cache (and the logits) hold, [a]
        end = longest
        for step in range(budget):
            tokens, log_probs = sample_tokens(
                logits, temperature=sampling.temperature, top_p=sampling.top_p, generator=generator
            )  # [a], [a, V]
            if self._tp_size > 1:
                dist.broadcast(tokens, src=self._tp_src, group=self._tp_group)
            done = finished[rows]  # [a]
            sequence[rows, end] = tokens.masked_fill(done, self._pad_id)
            logprobs[rows, end] = log_probs.gather(-1, tokens[:, None]).squeeze(-1).masked_fill(done, 0.0)
            stopped = torch.isin(tokens, stop_ids) & ~done
            completion_lengths[rows[stopped]] = step + 1
            finished[rows[stopped]] = True
            end += 1
            if step == budget - 1 or bool(finished.all()):
                break
            running = ~finished[rows]
            if 4 * int(running.sum()) <= 3 * len(rows):  # a quarter of the work is wasted: drop those rows
                rows = rows[running]
                _select_cache_rows(context, running.nonzero().squeeze(1))
            mask = key_is_padding[rows, None, None, :end] if ragged else None  # [a, 1, 1, end]
            logits = self._forward(sequence[rows, end - 1 : end], positions[end - 1 : end], mask, context)

        # Left-padded [b, end] -> right-padded: row r's tokens start left_pad[r] columns later.
        lengths = prompt_lengths + completion_lengths  # [b]
        width = int(lengths.max())
        source = (positions[None, :width] + left_pad[:, None]).clamp_(max=end - 1)  # [b, width]
        beyond = positions[None, :width] >= lengths[:, None]
        return _Completions(
            tokens=sequence.gather(1, source).masked_fill_(beyond, self._pad_id),
            logprobs=logprobs.gather(1, source).masked_fill_(beyond, 0.0),
            lengths=lengths,
            truncated=~finished,
        )

    def _new_context(self, batch: int, total: int) -> StaticInferenceContext:
        """A static KV cache for ``batch`` rows of ``total`` positions, allocated here on the model's device
        (megatron would allocate it on ``torch.cuda.current_device()``, which fails without CUDA).

        Megatron indexes the cache as ``[S, b, groups, d]``; the memory is laid out ``[b, groups, S, d]``, so
        the keys one attention head reads in a decode step are contiguous."""
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=total)
        for attention in self._attention:
            shape = (batch, attention.num_query_groups_per_partition, total, attention.key_hidden_size)
            context.key_value_memory_dict[attention.layer_number] = tuple(
                torch.empty(shape, dtype=self._dtype, device=self._device).permute(2, 0, 1, 3)
                for _ in range(2)
            )
        return context

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        context: StaticInferenceContext,
    ) -> torch.Tensor:
        """Run ``tokens [b, s]`` at cache offset ``positions[0]``; return the last position's full-vocabulary
        logits ``[b, V]`` (gathered over TP) and advance the cache offset by ``s``."""
        logits = self._model(
            tokens,
            positions.expand_as(tokens),
            attention_mask,
            inference_context=context,
            runtime_gather_output=True,
        )  # [b, 1, V]: the context materialises only the last position
        context.increment_sequence_len_offset(tokens.shape[1])
        return logits[:, -1]


def _distinct_rows(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distinct, copies)`` for ``tokens [b, s]``: ``distinct [u]`` holds the first row of each distinct
    content, and ``tokens[distinct][copies] == tokens`` with ``copies [b]``."""
    position: dict[tuple[int, ...], int] = {}  # a row's content -> its index in `distinct`
    distinct, copies = [], []
    for row, content in enumerate(map(tuple, tokens.tolist())):
        if content not in position:
            position[content] = len(distinct)
            distinct.append(row)
        copies.append(position[content])
    return torch.tensor(distinct, device=tokens.device), torch.tensor(copies, device=tokens.device)


def _select_cache_rows(context: StaticInferenceContext, rows: torch.Tensor) -> None:
    """Replace every layer's cached keys/values ``[S, b, groups, d]`` by their rows ``rows [a]`` (to drop
    finished rows or to repeat a prefilled prompt; megatron's ``swap_key_value_dict`` only permutes), keeping
    the ``[b, groups, S, d]`` memory layout of :meth:`MegatronRolloutEngine._new_context`."""
    for layer, cache in context.key_value_memory_dict.items():
        context.key_value_memory_dict[layer] = tuple(
            t.permute(1, 2, 0, 3)[rows].permute(2, 0, 1, 3) for t in cache
        )


def _pad_columns(values: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """Right-pad ``[b, w]`` to ``[b, width]`` with ``fill``."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]), value=fill)
