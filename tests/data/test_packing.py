"""Sequence packing: first-fit decreasing against a hand-worked case and its invariants, and packed rows that
unpack back to the input."""

from __future__ import annotations

import random

import pytest
import torch

from nemo_quagmire.data.packing import first_fit_decreasing, pack_rows


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
