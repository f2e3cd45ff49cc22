"""MegatronPolicy, the adapter the trainers and evaluate.py hold: seeded construction, weights from a run
checkpoint or an HF directory, a frozen copy, a save/resume round trip, and the callbacks' handle — each
checked against the megatron functions it wraps."""

from __future__ import annotations

import pytest
import torch

from nemo_quagmire.config.optim import OptimConfig
from nemo_quagmire.config.parallel import ParallelConfig
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.megatron.checkpoint import save_checkpoint
from nemo_quagmire.megatron.logprobs import compute_logprobs
from nemo_quagmire.megatron.policy import MegatronPolicy
from tests.megatron.multiprocess_worker import MODEL, masked_nll, micro_batches

TOKENS = torch.randint(3, MODEL.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
LENGTHS = torch.tensor([12, 7, 9])


def _weights(policy: MegatronPolicy) -> dict[str, torch.Tensor]:
    return {
        name: value.clone() for name, value in policy.modules()[0].state_dict().items() if value is not None
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_the_seed_alone_decides_the_initial_weights(megatron_world1):
    first = _weights(MegatronPolicy(MODEL, ParallelConfig(), seed=7))
    torch.rand(100)  # whatever ran in between
    assert _same(first, _weights(MegatronPolicy(MODEL, ParallelConfig(), seed=7)))
    assert not _same(first, _weights(MegatronPolicy(MODEL, ParallelConfig(), seed=8)))


def test_weights_load_from_a_run_checkpoint_and_from_an_hf_directory(megatron_world1, tmp_path):
    source = MegatronPolicy(MODEL, ParallelConfig(), seed=1)
    checkpoint = save_checkpoint(tmp_path / "checkpoints", 3, source.chunks, model_cfg=MODEL)
    source.export_hf(tmp_path / "hf")
    for path in (checkpoint, tmp_path / "hf"):
        target = MegatronPolicy(MODEL, ParallelConfig(), seed=2)
        target.load_weights(path)
        torch.testing.assert_close(
            target.logprobs(TOKENS, LENGTHS, micro_batch_size=2),
            compute_logprobs(source.chunks, TOKENS, LENGTHS, micro_batch_size=2).logprobs,
            rtol=0,
            atol=1e-6,
        )


def test_a_frozen_copy_scores_like_the_policy_and_keeps_its_weights_through_training(megatron_world1):
    policy = MegatronPolicy(MODEL, ParallelConfig(), seed=3)
    policy.attach_optimizer(OptimConfig(lr=1e-2))
    reference = MegatronPolicy(MODEL, ParallelConfig(), seed=None)
    reference.copy_weights_from(policy)
    reference.freeze()
    before = reference.logprobs(TOKENS, LENGTHS, micro_batch_size=3)
    torch.testing.assert_close(before, policy.logprobs(TOKENS, LENGTHS, micro_batch_size=3), rtol=0, atol=0)

    metrics = policy.train(micro_batches(0), masked_nll)
    assert metrics["update_successful"] == 1.0 and metrics["lr"] == pytest.approx(1e-2)
    assert not any(p.requires_grad for p in reference.modules()[0].parameters())
    torch.testing.assert_close(
        reference.logprobs(TOKENS, LENGTHS, micro_batch_size=3), before, rtol=0, atol=0
    )
    assert (policy.logprobs(TOKENS, LENGTHS, micro_batch_size=3) - before).abs().max() > 1e-4


def test_save_and_resume_restore_weights_optimizer_and_client_state(megatron_world1, tmp_path):
    policy = MegatronPolicy(MODEL, ParallelConfig(), seed=4)
    policy.attach_optimizer(OptimConfig(lr=1e-3))
    policy.train(micro_batches(0), masked_nll)
    path = policy.save(tmp_path, 1, {"step": 1, "note": "kept"}, keep_last=2)
    expected = policy.train(micro_batches(1), masked_nll)  # the step a resumed run must repeat

    resumed = MegatronPolicy(MODEL, ParallelConfig(), seed=5)
    resumed.attach_optimizer(OptimConfig(lr=1e-3))
    state = resumed.resume(path)
    assert state["step"] == 1 and state["note"] == "kept"
    repeated = resumed.train(micro_batches(1), masked_nll)
    assert repeated["loss"] == expected["loss"] and repeated["grad_norm"] == expected["grad_norm"]


def test_training_needs_an_optimizer_and_the_handle_scores_like_the_policy(megatron_world1, tmp_path):
    policy = MegatronPolicy(MODEL, ParallelConfig(), seed=6)
    with pytest.raises(RuntimeError, match="call attach_optimizer first"):
        policy.train(micro_batches(0), masked_nll)
    handle = policy.handle(
        step=4, run_dir=tmp_path, tokenizer=CharTokenizer(), generate=None, micro_batch_size=2
    )
    assert (handle.step, handle.data_parallel_rank, handle.data_parallel_size) == (4, 0, 1)
    torch.testing.assert_close(
        handle.logprobs(TOKENS, LENGTHS), policy.logprobs(TOKENS, LENGTHS, micro_batch_size=2), rtol=0, atol=0
    )
    assert torch.equal(handle.all_reduce_sum(torch.tensor([2.0])), torch.tensor([2.0]))
