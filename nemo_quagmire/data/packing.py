"""Sequence packing: several variable-length sequences share one row, so a batch carries fewer padding tokens.

Why: a rollout batch is as wide as its longest completion, and reasoning completions vary in length by an
order of magnitude, so a padded batch spends much of its forward and backward passes on padding. Packing
puts short sequences side by side in one row (first-fit decreasing into rows of the batch's width); each
keeps its own segment id, and the model attends within a segment only (a block-diagonal causal mask, see
``nemo_quagmire.megatron.logprobs``), so every sequence sees exactly the context it sees alone.

Used by SFT (``sft.packing=packed``) and GRPO (``grpo.packing=packed``). Pure: lists and torch tensors only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PackedMicroBatch", "PackedRows", "first_fit_decreasing", "pack_micro_batches", "pack_rows"]


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
