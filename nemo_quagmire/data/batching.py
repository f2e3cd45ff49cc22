"""Batching: how sequences become the rows and micro-batches a forward/backward pass computes.

Why one module: the SFT step, the GRPO update and the log-prob passes all turn variable-length sequences into
fixed-width tensors, and the three ways of doing it (packed, length-bucketed, padded) must keep the same
meaning everywhere: a packed sequence attends only within its segment and sees exactly the context it would
see alone, and padding never reaches a loss. Pure: lists and torch tensors only (no model, no ranks).

- packed: several sequences share a row (first-fit decreasing, :func:`first_fit_decreasing`); each row
  carries ``segment_ids`` for a block-diagonal causal mask (``nemo_quagmire.megatron.logprobs``), and
  ``unpack`` maps any per-token result back to one sequence per row. SFT packs examples into rows of
  ``sft.seq_length`` tokens with their loss masks laid out alike (:func:`build_rows`); GRPO and the log-prob
  passes pack the batch's sequences into rows as wide as its longest (:func:`pack_micro_batches`), rows with
  one sequence first, so that micro-batches made only of them need no mask.
- buckets (SFT): one example per row, sorted by length, so that each micro-batch pads only to its own longest.
- padded: one sequence per row in data order (:func:`row_micro_batches` with ``packing="none"``, and
  :func:`padded_micro_batches` for tensors), the last micro-batch filled with fully masked rows so that every
  micro-batch has one shape (pipeline parallelism exchanges fixed shapes).

Widths are rounded up to ``width_multiple`` (sequence parallelism and FP8 need multiples of TP or 16).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nemo_quagmire.config.sft import Packing
from nemo_quagmire.eval.benchmarks import PromptTemplate

if TYPE_CHECKING:
    from nemo_quagmire.trainer.callbacks import Tokenizer

__all__ = [
    "EncodedExample",
    "PackedMicroBatch",
    "PackedRows",
    "Row",
    "build_rows",
    "encode_example",
    "first_fit_decreasing",
    "pack_micro_batches",
    "pack_rows",
    "packed_sequence_micro_batches",
    "padded_micro_batches",
    "row_micro_batches",
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


def row_micro_batches(
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


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sequences into rows of at most ``capacity`` tokens.

    Longest first, each into the first row with room (ties keep their input order, so the result is
    deterministic). Rows are returned in creation order, so a row's first sequence is its longest.

    Args:
        lengths: tokens of each sequence.
        capacity: tokens per row.

    Returns:
        The indices into ``lengths`` of each row's sequences.

    Raises:
        ValueError: a sequence longer than ``capacity``.
    """
    if too_long := [n for n in lengths if n > capacity]:
        raise ValueError(f"sequences of {too_long[:5]} tokens exceed the row capacity of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(index)
        room[slot] -= lengths[index]
    return rows


@dataclass(frozen=True)
class PackedRows:
    """Packed sequences and the map back to one sequence per row.

    Attributes:
        tokens: ``[r, C]`` the sequences of each row back to back, then ``pad_id``; ``C`` = longest row.
        segment_ids: ``[r, C]`` 1, 2, ... for the sequences of a row, 0 at padding.
        unpack: ``[n, T]`` index into ``tokens.flatten()`` of position ``t`` of sequence ``i`` (``T`` = the
            input width); positions at or beyond a sequence's length point at its last token. Any per-token
            ``[r, C]`` result unpacks as ``values.flatten()[unpack]`` (differentiable).
    """

    tokens: torch.Tensor
    segment_ids: torch.Tensor
    unpack: torch.Tensor


def pack_rows(
    tokens: torch.Tensor, lengths: torch.Tensor, rows: Sequence[Sequence[int]], *, pad_id: int
) -> PackedRows:
    """Lay right-padded sequences out in packed rows.

    Args:
        tokens: ``[n, T]`` one right-padded sequence per row.
        lengths: ``[n]`` tokens of each sequence (>= 1).
        rows: the sequences (indices into ``tokens``) of each packed row, e.g. from
            :func:`first_fit_decreasing`; every sequence exactly once.

    Raises:
        ValueError: ``rows`` does not place every sequence exactly once, or a length is outside [1, T].
    """
    count, width = tokens.shape
    placed = sorted(i for row in rows for i in row)
    if placed != list(range(count)):
        raise ValueError(f"rows must place each of the {count} sequences exactly once, got {placed[:10]}...")
    sizes = lengths.tolist()
    if not all(1 <= n <= width for n in sizes):
        raise ValueError(f"lengths must lie in [1, {width}], got {sizes}")
    packed_width = max(sum(sizes[i] for i in row) for row in rows)
    packed = torch.full((len(rows), packed_width), pad_id, dtype=tokens.dtype, device=tokens.device)
    segment_ids = torch.zeros((len(rows), packed_width), dtype=torch.long, device=tokens.device)
    starts = torch.zeros(count, dtype=torch.long)  # flat index of each sequence's first token
    for row_index, row in enumerate(rows):
        column = 0
        for segment, i in enumerate(row, start=1):
            n = sizes[i]
            packed[row_index, column : column + n] = tokens[i, :n]
            segment_ids[row_index, column : column + n] = segment
            starts[i] = row_index * packed_width + column
            column += n
    offsets = torch.minimum(torch.arange(width)[None, :], lengths.cpu()[:, None] - 1)  # [n, T]
    unpack = (starts[:, None] + offsets).to(tokens.device)
    return PackedRows(tokens=packed, segment_ids=segment_ids, unpack=unpack)


@dataclass(frozen=True)
class PackedMicroBatch:
    """One micro-batch of packed rows.

    Attributes:
        sequences: ``[n]`` the input sequences it holds (indices into the batch), in ``rows.unpack`` order.
        width: the longest of them: ``rows.unpack`` is ``[n, width]``.
        rows: the packed rows, ``[r, C]``.
        needs_mask: some row holds several sequences, so attention needs ``rows.segment_ids``; otherwise
            plain causal attention is exact.
    """

    sequences: torch.Tensor
    width: int
    rows: PackedRows
    needs_mask: bool


def pack_micro_batches(
    tokens: torch.Tensor, lengths: torch.Tensor, rows_per_micro_batch: int, *, pad_id: int
) -> list[PackedMicroBatch]:
    """Pack a batch first-fit decreasing into rows as wide as its longest sequence, then group the rows into
    micro-batches, rows holding one sequence first: the micro-batches made only of them need no attention
    mask (the causal fast path). Each micro-batch is as wide as its own longest row.

    Args:
        tokens: ``[N, T]`` one right-padded sequence per row.
        lengths: ``[N]`` tokens of each sequence, each in [1, T].
        rows_per_micro_batch: packed rows per micro-batch.
    """
    sizes = lengths.tolist()
    rows = first_fit_decreasing(sizes, capacity=max(sizes))
    rows.sort(key=lambda row: len(row) > 1)  # stable: single-sequence rows first, longest first
    result = []
    for start in range(0, len(rows), rows_per_micro_batch):
        chunk = rows[start : start + rows_per_micro_batch]
        members = [i for row in chunk for i in row]
        width = max(sizes[i] for i in members)
        local_rows, offset = [], 0
        for row in chunk:
            local_rows.append(list(range(offset, offset + len(row))))
            offset += len(row)
        index = torch.tensor(members, device=tokens.device)
        packed = pack_rows(tokens[index, :width], lengths[index], local_rows, pad_id=pad_id)
        result.append(PackedMicroBatch(index, width, packed, any(len(row) > 1 for row in chunk)))
    return result


def packed_sequence_micro_batches(
    fields: Mapping[str, torch.Tensor], lengths: torch.Tensor, micro_batch_size: int, *, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of ``micro_batch_size`` packed rows (:func:`pack_micro_batches`) of the sequences in
    ``fields["tokens"]`` [N, T]. Each carries its packed ``tokens [r, C]``, ``segment_ids`` when a row holds
    several sequences, ``unpack [n, T']`` and the other fields of its ``n`` sequences, one per row, trimmed
    to their longest ``T'``."""
    result = []
    for part in pack_micro_batches(fields["tokens"], lengths, micro_batch_size, pad_id=pad_id):
        micro = {
            name: value[part.sequences, : part.width] if value.dim() == 2 else value[part.sequences]
            for name, value in fields.items()
            if name != "tokens"
        }
        micro |= {"tokens": part.rows.tokens, "unpack": part.rows.unpack}
        if part.needs_mask:
            micro["segment_ids"] = part.rows.segment_ids
        result.append(micro)
    return result


def padded_micro_batches(
    fields: Mapping[str, torch.Tensor], micro_batch_size: int, *, width_multiple: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Equal-shape micro-batches of one sequence per row: the rows are filled up to a multiple of
    ``micro_batch_size`` with zeros (fully masked rows, token 0) and [N, T] fields are right-padded with zeros
    to a width that is a multiple of ``width_multiple``; [N] fields are split alike."""
    rows, width = fields["tokens"].shape
    extra_rows = -rows % micro_batch_size
    extra_columns = -width % width_multiple

    def pad(value: torch.Tensor) -> torch.Tensor:
        if extra_columns and value.dim() == 2:
            value = torch.cat([value, value.new_zeros(value.shape[0], extra_columns)], dim=1)
        if extra_rows:
            value = torch.cat([value, value.new_zeros(extra_rows, *value.shape[1:])])
        return value

    chunks = {name: pad(value).split(micro_batch_size) for name, value in fields.items()}
    return [{name: parts[i] for name, parts in chunks.items()} for i in range(len(chunks["tokens"]))]
