"""SFT rows and steps: packing keeps every example once with its own loss mask, and a packed, bucketed or
padded step gives the same loss and gradient (attention never crosses packed examples)."""

from __future__ import annotations

import pytest
import torch

from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_splits
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.trainer.sft_steps import (
    EncodedExample,
    build_rows,
    encode_example,
    micro_batches,
    sft_step,
)
from tests.tiny_model import TEST_MODEL

TOKENIZER = CharTokenizer()


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


def test_micro_batches_pad_to_one_shape_or_to_their_own_longest():
    rows = build_rows([_example(n) for n in (3, 5, 7, 9, 4)], "buckets", 16)  # 3, 4, 5, 7, 9
    uniform = micro_batches(rows, 2, pad_id=0, width_multiple=4)
    assert [tuple(mb["tokens"].shape) for mb in uniform] == [(2, 12)] * 3  # 9 -> 12; 5 rows -> 6
    assert uniform[-1]["loss_mask"][1].sum() == 0  # the filler row is fully masked
    ragged = micro_batches(rows, 2, pad_id=0, uniform_width=False)
    assert [tuple(mb["tokens"].shape) for mb in ragged] == [(2, 4), (2, 7), (1, 9)]
    assert sum(int(mb["loss_mask"].sum()) for mb in ragged) == sum(n - 2 for n in (3, 4, 5, 7, 9))


@pytest.fixture(scope="module")
def examples() -> list[EncodedExample]:
    splits = generate_splits(SyntheticTaskConfig(), seed=0, num_sft=12, num_rl=0, num_heldout=0)
    return [encode_example(r, TOKENIZER) for r in splits.sft_records()]


def _step(examples, packing, drop_segments=False):
    from nemo_quagmire.config.optim import OptimConfig
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import set_random_seed
    from nemo_quagmire.megatron.train_step import setup_training

    set_random_seed(1234)  # the same initial weights for every packing
    model_cfg = TEST_MODEL
    # A clip norm that never clips: grad_norm is reported, the gradient left as it is.
    trainer = setup_training(build_model(model_cfg, ParallelConfig()), OptimConfig(lr=1e-3, clip_grad=1e9))
    if drop_segments:  # what packing without the attention mask would compute
        import nemo_quagmire.trainer.sft_steps as steps

        original = steps.micro_batches

        def without_segments(*args, **kwargs):
            return [{k: v for k, v in mb.items() if k != "segment_ids"} for mb in original(*args, **kwargs)]

        steps.micro_batches = without_segments
        try:
            metrics = sft_step(trainer, examples, packing=packing, capacity=128, micro_batch_size=4, pad_id=0)
        finally:
            steps.micro_batches = original
    else:
        metrics = sft_step(
            trainer,
            examples,
            packing=packing,
            capacity=128,
            micro_batch_size=4,
            pad_id=0,
            uniform_width=False,
        )
    gradient = torch.cat([p.main_grad.flatten() for p in trainer.model[0].parameters()])  # megatron DDP's
    return metrics, gradient


def test_packed_buckets_and_padded_steps_are_the_same_step(megatron_world1, examples):
    padded, padded_gradient = _step(examples, "none")
    for packing in ("packed", "buckets"):
        metrics, gradient = _step(examples, packing)
        assert metrics["loss"] == pytest.approx(padded["loss"], rel=2e-6)
        assert metrics["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)
        assert (
            metrics["num_tokens"] == padded["num_tokens"] == sum(len(e) - e.prompt_length for e in examples)
        )
        torch.testing.assert_close(gradient, padded_gradient, atol=1e-6, rtol=1e-4)
    packed, _ = _step(examples, "packed")
    assert packed["slots"] >= packed["tokens"]
    assert packed["tokens"] == padded["tokens"] == sum(len(e) for e in examples)
    # Without the per-example mask, later examples of a row would attend to earlier ones: another loss.
    leaky, _ = _step(examples, "packed", drop_segments=True)
    assert abs(leaky["loss"] - padded["loss"]) > 1e-3
