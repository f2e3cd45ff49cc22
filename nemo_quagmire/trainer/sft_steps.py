"""Supervised steps on prompt/response pairs: tokenization, rows (packed or padded), micro-batches, one step.

Used by the SFT trainer and by the GRPO run's SFT warm-up. The loss covers response tokens (and EOS) only,
as the token-mean negative log-likelihood with the step's *global* response-token count as the normalizer,
so micro-batches and data-parallel ranks sum to the whole batch's loss (the contract of
`nemo_quagmire.megatron.train_step`). How examples become rows changes the work per step, never the loss:

- "packed": several examples share a row of `capacity` tokens (first-fit decreasing), each a segment with
  its own loss mask; attention stays within a segment (`segment_ids`, a block-diagonal causal mask), so an
  example sees exactly the context it would see alone. Needs attention that applies explicit masks
  (megatron's local spec; Transformer Engine's fused attention would need THD packed sequences instead).
- "buckets": one example per row, sorted by length, so each micro-batch pads only to its own longest
  (without pipeline parallelism, whose stages exchange fixed shapes). Works with any attention.
- "none": one example per row in data order, all padded to the step's longest (the warm-up's rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nemo_quagmire.algorithms.losses import aggregate_loss
from nemo_quagmire.config.sft import Packing
from nemo_quagmire.data.packing import first_fit_decreasing
from nemo_quagmire.eval.benchmarks import PromptTemplate
from nemo_quagmire.trainer.callbacks import Tokenizer

__all__ = [
    "EncodedExample",
    "Row",
    "build_rows",
    "encode_example",
    "micro_batches",
    "nll_loss",
    "sft_step",
]


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example (prompt then response and EOS) and how many of them are the prompt."""

    ids: tuple[int, ...]
    prompt_length: int

    def __len__(self) -> int:
        return len(self.ids)


def encode_example(
    example: Mapping[str, str], tokenizer: Tokenizer, template: PromptTemplate = "plain"
) -> EncodedExample:
    """Tokenize a `{"prompt", "response"}` pair: BOS + prompt ("plain"), or the prompt as one user turn of the
    tokenizer's chat template with the assistant cue ("chat"); then the response and EOS.

    Raises:
        ValueError: "chat" with a tokenizer that has no chat template, or an unknown template.
    """
    if template == "plain":
        prompt = tokenizer.encode(example["prompt"], add_bos=True, add_eos=False)
    elif template == "chat":
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError(
                f"prompt template 'chat' needs a tokenizer with a chat template; {type(tokenizer).__name__} "
                "has none: use 'plain'"
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": example["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        prompt = tokenizer.encode(text, add_bos=False)  # the template writes its own BOS
    else:
        raise ValueError(f"unknown prompt template {template!r}; use 'plain' or 'chat'")
    response = tokenizer.encode(example["response"], add_bos=False, add_eos=True)
    return EncodedExample(tuple(prompt + response), len(prompt))


@dataclass(frozen=True)
class Row:
    """One training row: token ids, loss mask, and the segment of each token (None: a single example)."""

    tokens: list[int]
    loss_mask: list[bool]
    segment_ids: list[int] | None = None


def _single(example: EncodedExample) -> Row:
    return Row(list(example.ids), [i >= example.prompt_length for i in range(len(example))])


def build_rows(examples: Sequence[EncodedExample], packing: Packing, capacity: int) -> list[Row]:
    """Rows for one rank's share of a step (see the module docstring for the packing modes).

    Args:
        examples: the share, in data order; each at most `capacity` tokens.
        packing: "packed", "buckets" or "none".
        capacity: tokens per packed row.

    Raises:
        ValueError: an example longer than `capacity`, or an unknown packing mode.
    """
    if too_long := [len(e) for e in examples if len(e) > capacity]:
        raise ValueError(f"examples of {too_long[:5]} tokens exceed the row capacity of {capacity}")
    if packing == "none":
        return [_single(e) for e in examples]
    if packing == "buckets":
        return [_single(e) for e in sorted(examples, key=len)]
    if packing != "packed":
        raise ValueError(f"unknown packing {packing!r}; use 'packed', 'buckets' or 'none'")
    rows = []
    for members in first_fit_decreasing([len(e) for e in examples], capacity):
        parts = [_single(examples[i]) for i in members]
        rows.append(
            Row(
                tokens=[t for part in parts for t in part.tokens],
                loss_mask=[m for part in parts for m in part.loss_mask],
                segment_ids=[s for s, part in enumerate(parts, start=1) for _ in part.tokens],
            )
        )
    return rows


def micro_batches(
    rows: Sequence[Row],
    micro_batch_size: int,
    *,
    pad_id: int,
    width_multiple: int = 1,
    uniform_width: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Tensors of `micro_batch_size` rows each (with `uniform_width`, the last one is filled up with fully
    masked rows; otherwise it may have fewer rows).

    Args:
        rows: the rows, in order.
        micro_batch_size: rows per micro-batch.
        pad_id: token of padding positions.
        width_multiple: widths are rounded up to a multiple of this (sequence parallelism, FP8).
        uniform_width: pad every micro-batch to the longest row of all (pipeline parallelism needs one
            shape); False pads each to its own longest.

    Returns:
        Dicts with `tokens` Long[b, T], `loss_mask` Bool[b, T] and, if any row is packed, `segment_ids`
        Long[b, T] (0 at padding).
    """
    if not rows:
        raise ValueError("no rows to train on")
    packed = any(row.segment_ids is not None for row in rows)
    filler = (-len(rows) % micro_batch_size) if uniform_width else 0  # one shape needs full micro-batches
    padded = list(rows) + [Row([], [], [] if packed else None)] * filler
    chunks = [padded[i : i + micro_batch_size] for i in range(0, len(padded), micro_batch_size)]
    longest = max(len(row.tokens) for row in rows)
    result = []
    for chunk in chunks:
        width = longest if uniform_width else max(len(row.tokens) for row in chunk)
        width = -(-width // width_multiple) * width_multiple
        tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [b, T]
        loss_mask = torch.zeros((len(chunk), width), dtype=torch.bool)  # [b, T]
        segments = torch.zeros((len(chunk), width), dtype=torch.long)  # [b, T]
        for i, row in enumerate(chunk):
            tokens[i, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
            loss_mask[i, : len(row.loss_mask)] = torch.tensor(row.loss_mask, dtype=torch.bool)
            if row.segment_ids is not None:
                segments[i, : len(row.segment_ids)] = torch.tensor(row.segment_ids, dtype=torch.long)
        batch = {"tokens": tokens, "loss_mask": loss_mask}
        if packed:
            batch["segment_ids"] = segments
        result.append(batch)
    return result


def nll_loss(
    logprobs: torch.Tensor, micro_batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean NLL of the masked tokens, normalized by `micro_batch["global_num_tokens"]`.

    Args:
        logprobs: Float[b, T] aligned log-probs of `micro_batch["tokens"]`.
        micro_batch: `loss_mask` Bool[b, T] and `global_num_tokens` (0-dim) besides the tokens.
    """
    mask = micro_batch["loss_mask"]
    loss = aggregate_loss(
        -logprobs,
        mask,
        "token-mean",
        global_num_tokens=micro_batch["global_num_tokens"],
        global_num_seqs=None,
        token_sum_normalizer=None,
    )
    return loss, {"num_tokens": mask.sum()}


def sft_step(
    trainer: Any,
    examples: Sequence[EncodedExample],
    *,
    packing: Packing,
    capacity: int,
    micro_batch_size: int,
    pad_id: int,
    width_multiple: int = 1,
    uniform_width: bool = True,
) -> dict[str, float]:
    """One optimizer step on this data-parallel rank's share of a batch (collective over DP ranks).

    Returns:
        `nemo_quagmire.megatron.train_step`'s metrics (loss, num_tokens, grad_norm, lr, update_successful)
        plus, summed over ranks, `tokens` (real tokens processed) and `slots` (row positions computed), whose
        ratio is the packing efficiency.
    """
    from nemo_quagmire.megatron.parallel import all_reduce_sum_data_parallel
    from nemo_quagmire.megatron.train_step import train_step

    rows = build_rows(examples, packing, capacity)
    micro = micro_batches(
        rows, micro_batch_size, pad_id=pad_id, width_multiple=width_multiple, uniform_width=uniform_width
    )
    counts = torch.stack(
        [
            sum(mb["loss_mask"].sum() for mb in micro),
            torch.tensor(sum(len(row.tokens) for row in rows)),
            torch.tensor(sum(mb["tokens"].numel() for mb in micro)),
        ]
    )
    global_counts = all_reduce_sum_data_parallel(counts)  # [3]: loss tokens, real tokens, slots
    device = next(trainer.model[0].parameters()).device
    micro = [
        {**{k: v.to(device) for k, v in mb.items()}, "global_num_tokens": global_counts[0].to(device)}
        for mb in micro
    ]
    metrics = train_step(trainer, micro, nll_loss, variable_shapes=not uniform_width)
    metrics["tokens"] = float(global_counts[1])
    metrics["slots"] = float(global_counts[2])
    return metrics
