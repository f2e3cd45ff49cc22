"""train_step at TP=1: the gradient is that of the SUMMED globally-normalised micro-batch losses (megatron
must not divide by the number of micro-batches), metrics combine as they declare (sums, token means, maxes),
the entropy it passes the loss is that of the logits and changes nothing else, and the LR schedule is
applied."""

from __future__ import annotations

import pydantic
import pytest
import torch

from nemo_quagmire.config.optim import OptimConfig
from nemo_quagmire.config.parallel import ParallelConfig
from nemo_quagmire.megatron.logprobs import (
    ENTROPY_CHUNK_LOGITS,
    forward_logits,
    token_entropy_from_logits,
    token_logprobs_from_logits,
)
from nemo_quagmire.megatron.model import build_model
from nemo_quagmire.megatron.parallel import set_random_seed
from nemo_quagmire.megatron.train_step import setup_training, train_step
from tests.megatron.multiprocess_worker import MODEL, masked_nll, micro_batches


def _fresh_model():
    set_random_seed(1234)
    return build_model(MODEL, ParallelConfig())


def test_grad_norm_and_loss_are_those_of_the_full_batch_loss(megatron_world1):
    batches = micro_batches(step=0)  # 4 micro-batches, each loss divided by the global token count
    model = _fresh_model()
    # Brute force: plain autograd through the unwrapped model on the summed loss.
    total = sum(
        masked_nll(token_logprobs_from_logits(forward_logits(model[0], b["tokens"]), b["tokens"])[0], b)[0]
        for b in batches
    )
    total.backward()
    expected_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model[0].parameters())).item()
    for param in model[0].parameters():
        param.grad = None

    trainer = setup_training(model, OptimConfig(lr=1e-3, clip_grad=1.0))
    metrics = train_step(trainer, batches, masked_nll)
    assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-5)  # /4 if megatron averaged
    assert metrics["loss"] == pytest.approx(total.item(), rel=1e-6)
    assert metrics["tokens"] == sum(b["loss_mask"].sum().item() for b in batches)
    assert metrics["update_successful"] == 1.0


def test_entropy_and_maxima_are_those_of_the_whole_batch_and_leave_the_step_unchanged(megatron_world1):
    batches = micro_batches(step=0)
    # Brute force on the unwrapped model: full-vocabulary softmax entropy, aligned with the predicted token.
    model = _fresh_model()
    with torch.no_grad():
        logits = torch.cat([forward_logits(model[0], b["tokens"]) for b in batches]).float()
        log_p = torch.log_softmax(logits, dim=-1)
        entropy = torch.cat([torch.zeros(len(logits), 1), -(log_p.exp() * log_p).sum(-1)[:, :-1]], dim=1)
        tokens = torch.cat([b["tokens"] for b in batches])
        logprobs = log_p[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
        logprobs = torch.cat([torch.zeros(len(logits), 1), logprobs], dim=1)
    mask = torch.cat([b["loss_mask"] for b in batches]).bool()

    runs = {}
    for with_entropy in (False, True):
        trainer = setup_training(_fresh_model(), OptimConfig(lr=1e-3))
        metrics = train_step(trainer, batches, masked_nll, with_entropy=with_entropy)
        weights = torch.cat([p.detach().flatten() for p in trainer.model[0].parameters()])
        runs[with_entropy] = metrics, weights
    (plain, plain_weights), (with_entropy, entropy_weights) = runs[False], runs[True]

    assert with_entropy["entropy"] == pytest.approx(entropy[mask].mean().item(), rel=1e-5)
    assert with_entropy["logprob_max"] == pytest.approx(logprobs[mask].max().item(), rel=1e-5)
    assert "entropy" not in plain
    # The entropy is computed without gradient from logits it only reads: the step is bit for bit the same.
    assert {k: v for k, v in with_entropy.items() if k != "entropy"} == plain
    assert torch.equal(entropy_weights, plain_weights)


def test_entropy_is_computed_in_chunks_that_match_the_whole(megatron_world1, monkeypatch):
    import nemo_quagmire.megatron.logprobs as logprobs_module

    logits = torch.randn(3, 7, MODEL.vocab_size, generator=torch.Generator().manual_seed(0)) * 4
    whole = token_entropy_from_logits(logits, temperature=0.7)
    _, reference = token_logprobs_from_logits(
        logits.clone(), torch.zeros(3, 7, dtype=torch.long), temperature=0.7, with_entropy=True
    )
    monkeypatch.setattr(logprobs_module, "ENTROPY_CHUNK_LOGITS", 2 * MODEL.vocab_size)  # 11 chunks of 2 rows
    chunked = token_entropy_from_logits(logits, temperature=0.7)
    assert ENTROPY_CHUNK_LOGITS >= 2**20  # the default: one chunk for a micro-batch this small
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, reference, rtol=0, atol=1e-6)
    assert not chunked.requires_grad


def test_warm_up_and_decay_follow_the_schedule(megatron_world1):
    # linear warm-up from 0 over 2 steps, then linear decay to min_lr at step 4
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=4, lr_decay_style="linear")
    trainer = setup_training(_fresh_model(), optim)
    lrs = [train_step(trainer, micro_batches(step)[:1], masked_nll)["lr"] for step in range(5)]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5.5e-4, 1e-4])
    assert trainer.step == 5


def test_loss_fn_must_return_a_scalar(megatron_world1):
    trainer = setup_training(_fresh_model(), OptimConfig())
    with pytest.raises(ValueError, match="scalar tensor loss"):
        train_step(trainer, micro_batches(0)[:1], lambda logprobs, batch: (logprobs.sum(-1), {}))


def test_micro_batches_must_share_one_shape(megatron_world1):
    trainer = setup_training(_fresh_model(), OptimConfig())
    short = {"tokens": torch.zeros(2, 8, dtype=torch.long)}
    with pytest.raises(ValueError, match="same tokens shape"):
        train_step(trainer, [micro_batches(0)[0], short], masked_nll)


def test_decay_without_decay_steps_is_rejected():
    with pytest.raises(pydantic.ValidationError, match="lr_decay_steps > lr_warmup_steps=10"):
        OptimConfig(lr_warmup_steps=10, lr_decay_style="cosine")
