"""Batching: first-fit decreasing against a hand-worked case and its invariants, packed rows that unpack back
to the input, SFT rows (packed with per-example loss masks, bucketed, padded) and their micro-batches, GRPO's
packed micro-batches (single-sequence rows first, no mask) and padded micro-batches."""

from __future__ import annotations

import random

import pytest
import torch

from nemo_quagmire.data.batching import (
    EncodedExample,
    build_rows,
    encode_example,
    first_fit_decreasing,
    pack_rows,
    packed_sequence_micro_batches,
    padded_micro_batches,
    row_micro_batches,
)
from nemo_quagmire.data.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer()


def test_first_fit_decreasing_hand_worked():
    # Capacity 10, lengths by index: 0:3 1:7 2:5 3:5 4:2 5:8. Longest first: 8 -> row A; 7 -> row B;
    # 5 (index 2) -> row C; 5 (index 3, the tie keeps input order) -> C (5 + 5 = 10); 3 -> B (7 + 3 = 10);
    # 2 -> A (8 + 2 = 10).
    assert first_fit_decreasing([3, 7, 5, 5, 2, 8], capacity=10) == [[5, 4], [1, 0], [2, 3]]


def test_first_fit_decreasing_places_every_sequence_once_within_capacity():
    rng = random.Random(0)
    for _ in range(200):
        capacity = rng.randint(1, 40)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 30))]
        rows = first_fit_decreasing(lengths, capacity)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        # First fit: the sequence that opened a row fitted in no earlier row, as filled when it came up
        # (sequences come longest first, ties in input order).
        order = {i: (-lengths[i], i) for i in range(len(lengths))}
        for later, row in enumerate(rows):
            opener = row[0]
            for earlier in rows[:later]:
                filled = sum(lengths[i] for i in earlier if order[i] < order[opener])
                assert filled + lengths[opener] > capacity
        # Hence any two rows together hold more than one row's capacity (so at most one is half empty).
        fills = [sum(lengths[i] for i in row) for row in rows]
        assert all(a + b > capacity for k, a in enumerate(fills) for b in fills[k + 1 :])


def test_first_fit_decreasing_refuses_a_sequence_longer_than_a_row():
    with pytest.raises(ValueError, match=r"sequences of \[12\] tokens exceed the row capacity of 10"):
        first_fit_decreasing([4, 12], capacity=10)


def test_packed_rows_unpack_to_the_input():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 2, 7, 3, 4])
    width, pad = 7, -1
    tokens = torch.randint(0, 100, (5, width), generator=generator)
    tokens[torch.arange(width) >= lengths[:, None]] = pad
    rows = first_fit_decreasing(lengths.tolist(), capacity=7)  # [[2], [0, 1], [4, 3]]
    packed = pack_rows(tokens, lengths, rows, pad_id=pad)

    assert rows == [[2], [0, 1], [4, 3]]
    assert packed.tokens.shape == (3, 7)
    assert packed.tokens[1].tolist() == tokens[0, :5].tolist() + tokens[1, :2].tolist()
    assert packed.segment_ids.tolist() == [[1] * 7, [1] * 5 + [2] * 2, [1] * 4 + [2] * 3]
    unpacked = packed.tokens.flatten()[packed.unpack]  # [5, 7]
    valid = torch.arange(width) < lengths[:, None]
    assert torch.equal(unpacked[valid], tokens[valid])
    # Beyond its length a sequence's index repeats its last token (any real value; the loss masks it).
    assert torch.equal(unpacked[1, 2:], tokens[1, 1].expand(5))


def test_unpacking_is_differentiable():
    lengths = torch.tensor([2, 3])
    tokens = torch.zeros(2, 3, dtype=torch.long)
    packed = pack_rows(tokens, lengths, [[1, 0]], pad_id=0)  # one row of 5
    values = torch.arange(5.0)[None].requires_grad_()  # [1, 5] per-token values in packed layout
    unpacked = values.flatten()[packed.unpack]  # [2, 3]
    assert unpacked.tolist() == [[3.0, 4.0, 4.0], [0.0, 1.0, 2.0]]
    unpacked[:, 0].sum().backward()
    assert values.grad.tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0]]


def test_pack_rows_refuses_rows_that_lose_or_repeat_a_sequence():
    tokens = torch.zeros(3, 4, dtype=torch.long)
    lengths = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="exactly once"):
        pack_rows(tokens, lengths, [[0, 1]], pad_id=0)
    with pytest.raises(ValueError, match="exactly once"):
        pack_rows(tokens, lengths, [[0, 1], [1, 2]], pad_id=0)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\]"):
        pack_rows(tokens, torch.tensor([0, 2, 3]), [[0], [1], [2]], pad_id=0)


def _example(length: int, prompt_length: int = 2) -> EncodedExample:
    return EncodedExample(tuple(range(3, 3 + length)), prompt_length)


def test_encode_example_masks_the_prompt():
    encoded = encode_example({"prompt": "1+2=", "response": "\n\\boxed{3}"}, TOKENIZER)
    assert encoded.ids == (
        TOKENIZER.bos_id,
        *TOKENIZER.encode("1+2=\n\\boxed{3}", add_bos=False),
        TOKENIZER.eos_id,
    )
    assert encoded.prompt_length == 5  # BOS + 4 characters


def test_packed_rows_hold_every_example_once_with_its_own_mask():
    examples = [_example(n, prompt_length=p) for n, p in [(6, 1), (5, 2), (4, 3), (3, 1), (2, 1)]]
    rows = build_rows(examples, "packed", capacity=10)
    # First-fit decreasing: [6, 4] and [5, 3, 2]; 20 tokens cannot fit in fewer than 2 rows of 10.
    assert [len(r.tokens) for r in rows] == [10, 10]
    found = []
    for row in rows:
        segments = sorted(set(row.segment_ids))
        assert segments == list(range(1, len(segments) + 1))  # 1, 2, ... in order
        for segment in segments:
            positions = [i for i, s in enumerate(row.segment_ids) if s == segment]
            assert positions == list(range(positions[0], positions[-1] + 1))  # contiguous
            tokens = tuple(row.tokens[i] for i in positions)
            mask = [row.loss_mask[i] for i in positions]
            example = next(e for e in examples if e.ids == tokens)
            assert mask == [i >= example.prompt_length for i in range(len(example))]  # restarts per example
            found.append(example)
    assert sorted(found, key=len) == sorted(examples, key=len)


def test_buckets_sort_by_length_and_none_keeps_the_order():
    examples = [_example(n) for n in (5, 9, 3, 7)]
    assert [len(r.tokens) for r in build_rows(examples, "buckets", 16)] == [3, 5, 7, 9]
    assert [len(r.tokens) for r in build_rows(examples, "none", 16)] == [5, 9, 3, 7]
    assert all(r.segment_ids is None for r in build_rows(examples, "buckets", 16))
    with pytest.raises(ValueError, match=r"examples of \[9\] tokens exceed the row capacity of 8"):
        build_rows(examples, "packed", 8)


def test_row_micro_batches_pad_to_one_shape_or_to_their_own_longest():
    rows = build_rows([_example(n) for n in (3, 5, 7, 9, 4)], "buckets", 16)  # 3, 4, 5, 7, 9
    uniform = row_micro_batches(rows, 2, pad_id=0, width_multiple=4)
    assert [tuple(mb["tokens"].shape) for mb in uniform] == [(2, 12)] * 3  # 9 -> 12; 5 rows -> 6
    assert uniform[-1]["loss_mask"][1].sum() == 0  # the filler row is fully masked
    ragged = row_micro_batches(rows, 2, pad_id=0, uniform_width=False)
    assert [tuple(mb["tokens"].shape) for mb in ragged] == [(2, 4), (2, 7), (1, 9)]
    assert sum(int(mb["loss_mask"].sum()) for mb in ragged) == sum(n - 2 for n in (3, 4, 5, 7, 9))


def test_packed_micro_batches_put_single_sequence_rows_first_without_a_mask():
    lengths = torch.tensor([20, 7, 30, 9, 12, 30, 5, 18])
    tokens = torch.arange(8)[:, None].expand(8, 30) + 1  # row i holds token i + 1
    fields = {"tokens": tokens, "mask": torch.ones(8, 30, dtype=torch.bool), "advantages": torch.arange(8.0)}
    micro = packed_sequence_micro_batches(fields, lengths, 2, pad_id=0)

    assert [mb["tokens"].shape for mb in micro] == [(2, 30), (2, 30), (1, 12)]
    assert ["segment_ids" in mb for mb in micro] == [False, True, True]
    # Sequences 2 and 5 (length 30) alone; then 0 + 3 and 7 + 4 (20 + 9, 18 + 12); then 1 + 6 (7 + 5).
    assert [mb["advantages"].tolist() for mb in micro] == [[2.0, 5.0], [0.0, 3.0, 7.0, 4.0], [1.0, 6.0]]
    for mb in micro:
        unpacked = mb["tokens"].flatten()[mb["unpack"]]  # one sequence per row again
        assert torch.equal(unpacked[:, 0] - 1, mb["advantages"].long())
        assert mb["mask"].shape == mb["unpack"].shape


def test_padded_micro_batches_fill_rows_and_round_widths_with_zeros():
    fields = {
        "tokens": torch.arange(1, 16).reshape(3, 5),
        "mask": torch.ones(3, 5, dtype=torch.bool),
        "advantages": torch.tensor([1.0, 2.0, 3.0]),
    }
    micro = padded_micro_batches(fields, 2, width_multiple=4)
    assert [tuple(mb["tokens"].shape) for mb in micro] == [(2, 8), (2, 8)]
    assert torch.equal(micro[0]["tokens"][:, :5], fields["tokens"][:2])
    assert not micro[1]["mask"][1].any() and micro[1]["advantages"].tolist() == [3.0, 0.0]
    assert int(sum(mb["tokens"][:, 5:].abs().sum() for mb in micro)) == 0  # width padding is token 0
    (whole,) = padded_micro_batches(fields, 3)
    assert torch.equal(whole["tokens"], fields["tokens"])  # nothing to pad: the input as it is
