"""compute_logprobs / token_logprobs_from_logits at TP=1 against torch.log_softmax of the full logits."""

from __future__ import annotations

import pytest
import torch

from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.config.parallel import ParallelConfig
from nemo_quagmire.megatron.logprobs import compute_logprobs, forward_logits, token_logprobs_from_logits
from nemo_quagmire.megatron.model import build_model

TINY = get_model_preset("tiny")


@pytest.fixture(scope="module")
def model(megatron_world1):
    return build_model(TINY, ParallelConfig())


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, TINY.vocab_size, (6, 12), generator=generator), torch.tensor([12, 7, 1, 0, 9, 3])


def _reference(model, tokens, lengths, temperature):
    """Brute force: full log-softmax at every position, pick the next token, align, mask."""
    with torch.no_grad():
        log_p = torch.log_softmax(forward_logits(model[0], tokens).float() / temperature, dim=-1)  # [B, T, V]
    next_logprobs = log_p[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)[:, :-1]
    valid = torch.arange(1, tokens.shape[1]) < lengths[:, None]
    zero = torch.zeros(len(tokens), 1)
    return torch.cat([zero, next_logprobs * valid], 1), torch.cat([zero, entropy * valid], 1)


# packed, one row per micro-batch: lengths 12, 7, 1, 0, 9, 3 -> [12] (no mask), [9 + 3] and [7 + 1] (masked:
# the 3-token sequence would see the 9 before it without the mask); the empty sequence is not run at all.
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_log_softmax(model, temperature, packed):
    tokens, lengths = _batch()
    out = compute_logprobs(
        model,
        tokens,
        lengths,
        micro_batch_size=1 if packed else 2,
        temperature=temperature,
        with_entropy=True,
        packed=packed,
    )
    expected_logprobs, expected_entropy = _reference(model, tokens, lengths, temperature)
    assert out.logprobs.shape == out.entropy.shape == tokens.shape
    torch.testing.assert_close(out.logprobs, expected_logprobs, atol=2e-6, rtol=0)
    torch.testing.assert_close(out.entropy, expected_entropy, atol=2e-6, rtol=0)
    assert (out.logprobs[:, 0] == 0).all() and (out.logprobs[1, 7:] == 0).all()  # no context; padding
    assert (out.logprobs[0, 1:] < 0).all()


def test_result_does_not_depend_on_micro_batching(model):
    # Right padding + causal attention: other rows and padding never leak into a sequence's log-probs.
    tokens, lengths = _batch()
    one = compute_logprobs(model, tokens, lengths, micro_batch_size=1).logprobs
    all_at_once = compute_logprobs(model, tokens, lengths, micro_batch_size=5).logprobs
    garbage_padding = tokens.masked_fill(torch.arange(12) >= lengths[:, None], 99)
    padded_differently = compute_logprobs(model, garbage_padding, lengths, micro_batch_size=3).logprobs
    torch.testing.assert_close(one, all_at_once, atol=2e-6, rtol=0)
    torch.testing.assert_close(one, padded_differently, atol=2e-6, rtol=0)


def test_gradients_match_autograd_of_log_softmax(megatron_world1):
    # The vocab-parallel cross-entropy and entropy have hand-written backward passes; at TP=1 they must
    # reproduce autograd through torch.log_softmax for a loss mixing both.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator)
    tokens = torch.randint(0, 11, (2, 5), generator=generator)
    weights = torch.randn(2, 5, generator=generator)

    ours = logits.clone().requires_grad_()
    # ``ours * 1`` stands for the output layer: the cross-entropy shifts its (non-leaf) input in place.
    logprobs, entropy = token_logprobs_from_logits(ours * 1, tokens, temperature=0.5, with_entropy=True)
    ((logprobs + 0.3 * entropy) * weights).sum().backward()

    ref = logits.clone().requires_grad_()
    log_p = torch.log_softmax(ref / 0.5, dim=-1)
    ref_logprobs = log_p[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    ref_entropy = -(log_p.exp() * log_p).sum(-1)[:, :-1]
    ((ref_logprobs + 0.3 * ref_entropy) * weights[:, 1:]).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_eval_mode_is_restored(model):
    tokens, lengths = _batch()
    model[0].train()
    compute_logprobs(model, tokens, lengths, micro_batch_size=2)
    assert model[0].training


@pytest.mark.parametrize(
    ("tokens", "lengths", "message"),
    [
        (torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2), "expected tokens"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(3), "lengths"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 4]), r"lengths must lie in \[0, T=3\]"),
    ],
)
def test_bad_shapes_are_rejected(model, tokens, lengths, message):
    with pytest.raises(ValueError, match=message):
        compute_logprobs(model, tokens, lengths, micro_batch_size=1)
