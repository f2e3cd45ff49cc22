"""The local spec's attention modules against megatron's own: SDPA core attention vs ``DotProductAttention``
(outputs and gradients, every mask shape the project passes), and the rotated-key cache vs megatron's
``SelfAttention`` in cached generation."""

from __future__ import annotations

import pytest
import torch

from nemo_quagmire.config.model import get_model_preset

TINY = get_model_preset("tiny")  # 4 heads, 2 KV groups: grouped-query attention
ATOL = 1e-5  # float32 attention over <= 24 keys; the two compute the same sums in different orders


def _transformer_config(**overrides):
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.model import LayerSpecSelection, make_transformer_config

    model_cfg = TINY.model_copy(update=overrides)
    return make_transformer_config(model_cfg, ParallelConfig(), LayerSpecSelection("local", None), cuda=False)


def _core_pair(config, layer_number: int = 1):
    """Megatron's DotProductAttention and the SDPA subclass, built identically."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_quagmire.megatron.attention import SDPACoreAttention

    kwargs = dict(
        config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )
    return DotProductAttention(**kwargs), SDPACoreAttention(**kwargs)


def _qkv(sq: int, sk: int, batch: int = 3, seed: int = 0, grad: bool = False):
    """query [sq, b, 4, 32], key/value [sk, b, 2, 32] (the tiny preset's heads and groups)."""
    generator = torch.Generator().manual_seed(seed)
    heads, groups, dim = TINY.num_attention_heads, TINY.query_groups, TINY.head_dim
    tensors = [
        torch.randn(s, batch, h, dim, generator=generator)
        for s, h in ((sq, heads), (sk, groups), (sk, groups))
    ]
    return [t.requires_grad_(grad) for t in tensors]


def _packed_mask(segments: list[list[int]]) -> torch.Tensor:
    from nemo_quagmire.megatron.logprobs import packed_attention_mask

    return packed_attention_mask(torch.tensor(segments))


def _left_padded_prefill_mask(left_pad: list[int], width: int) -> torch.Tensor:
    """The rollout engine's ragged prefill mask: causal | key is left padding. Query rows inside the padding
    have every key masked."""
    positions = torch.arange(width)
    causal = positions[None, :] > positions[:, None]  # [T, T]
    key_is_padding = positions[None, :] < torch.tensor(left_pad)[:, None]  # [b, T]
    return (causal[None] | key_is_padding[:, None, :])[:, None]  # [b, 1, T, T]


@pytest.mark.parametrize(
    ("sq", "sk", "mask"),
    [
        (7, 7, None),  # causal training / log-prob forward
        (1, 9, None),  # a decode step over the cache: every cached key
        (6, 6, _packed_mask([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 3, 0, 0]])),  # packed rows
        (1, 9, (torch.arange(9) < 2).expand(3, 1, 1, 9)),  # a ragged decode step: two padding keys
    ],
    ids=["causal", "decode", "packed", "decode-padding-keys"],
)
def test_sdpa_equals_megatron_dot_product_attention(megatron_world1, sq, sk, mask):
    megatron_core, sdpa_core = _core_pair(_transformer_config())
    inputs = _qkv(sq, sk, grad=True)
    expected = megatron_core(*inputs, mask)  # [sq, b, 128]
    expected.square().sum().backward()
    expected_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None

    got = sdpa_core(*inputs, mask)
    got.square().sum().backward()

    assert got.shape == expected.shape == (sq, 3, TINY.num_attention_heads * TINY.head_dim)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    for name, t, g in zip(("query", "key", "value"), inputs, expected_grads, strict=True):
        torch.testing.assert_close(t.grad, g, atol=10 * ATOL, rtol=0, msg=f"gradient of {name}")


def test_sdpa_on_fully_masked_padding_rows_is_finite_and_real_rows_match(megatron_world1):
    # Left padding 0, 2 and 4 of 6: the first 2 (4) query rows of rows 1 (2) see no key at all.
    megatron_core, sdpa_core = _core_pair(_transformer_config())
    left_pad = [0, 2, 4]
    mask = _left_padded_prefill_mask(left_pad, 6)
    inputs = _qkv(6, 6)
    expected, got = megatron_core(*inputs, mask), sdpa_core(*inputs, mask)
    assert torch.isfinite(got).all()
    for row, pad in enumerate(left_pad):
        torch.testing.assert_close(got[pad:, row], expected[pad:, row], atol=ATOL, rtol=0)
        assert not got[:pad, row].any()  # SDPA's convention for rows with no key: zeros


def test_sdpa_keeps_the_softmax_scale_under_query_key_layer_scaling(megatron_world1):
    # Megatron divides the scale by the layer number and multiplies the scores back inside its softmax.
    config = _transformer_config()
    config.apply_query_key_layer_scaling = True
    megatron_core, sdpa_core = _core_pair(config, layer_number=3)
    inputs = _qkv(5, 5)
    torch.testing.assert_close(sdpa_core(*inputs, None), megatron_core(*inputs, None), atol=ATOL, rtol=0)


def test_sdpa_refuses_what_it_does_not_implement(megatron_world1):
    _, sdpa_core = _core_pair(_transformer_config())
    query, key, value = _qkv(4, 6)
    with pytest.raises(ValueError, match="sq=4, sk=6"):
        sdpa_core(query, key, value, None)
    with pytest.raises(NotImplementedError, match="attention_bias"):
        sdpa_core(*_qkv(4, 4), None, attention_bias=torch.zeros(1))


def test_local_attention_modules_fall_back_where_sdpa_does_not_fit(megatron_world1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from nemo_quagmire.megatron.attention import (
        RotatedKeyCacheSelfAttention,
        SDPACoreAttention,
        local_attention_modules,
    )

    assert local_attention_modules(_transformer_config()) == (RotatedKeyCacheSelfAttention, SDPACoreAttention)
    # Attention dropout is drawn from megatron's tensor-parallel RNG tracker: keep megatron's module.
    assert local_attention_modules(_transformer_config(attention_dropout=0.1))[1] is DotProductAttention


def test_built_local_model_uses_both_modules(megatron_world1):
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.attention import RotatedKeyCacheSelfAttention, SDPACoreAttention
    from nemo_quagmire.megatron.model import build_model

    (model,) = build_model(TINY, ParallelConfig())
    layers = model.decoder.layers
    assert len(layers) == TINY.num_layers
    assert all(type(layer.self_attention) is RotatedKeyCacheSelfAttention for layer in layers)
    assert all(type(layer.self_attention.core_attention) is SDPACoreAttention for layer in layers)


def _cached_greedy_logits(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill ``prompt [b, s]`` into megatron's static KV cache, then ``steps`` greedy decode steps; the
    last-position logits of every forward, ``[steps + 1, b, V]``."""
    from megatron.core.inference.contexts import StaticInferenceContext

    batch, length = prompt.shape
    context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=length + steps)
    for layer in model.decoder.layers:
        attention = layer.self_attention
        shape = (length + steps, batch, attention.num_query_groups_per_partition, attention.key_hidden_size)
        context.key_value_memory_dict[attention.layer_number] = (torch.zeros(shape), torch.zeros(shape))
    tokens, start, outputs = prompt, 0, []
    with torch.inference_mode():
        for _ in range(steps + 1):
            positions = torch.arange(start, start + tokens.shape[1]).expand_as(tokens)
            logits = model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
            context.increment_sequence_len_offset(tokens.shape[1])
            context.enable_decode_mode()
            start += tokens.shape[1]
            outputs.append(logits[:, -1])
            tokens = logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(outputs)


def test_rotated_key_cache_generates_what_megatrons_cache_does(megatron_world1):
    from megatron.core.transformer.attention import SelfAttention

    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.attention import RotatedKeyCacheSelfAttention
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import set_random_seed

    set_random_seed(7)
    (model,) = build_model(TINY, ParallelConfig())
    model.eval()
    assert all(type(layer.self_attention) is RotatedKeyCacheSelfAttention for layer in model.decoder.layers)
    prompt = torch.randint(0, TINY.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))

    got = _cached_greedy_logits(model, prompt, steps=12)
    for layer in model.decoder.layers:
        layer.self_attention.__class__ = SelfAttention  # megatron's cache: raw keys, re-rotated every step
    expected = _cached_greedy_logits(model, prompt, steps=12)

    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # The cache must matter: a decode step's logits differ from the prefill's, so equality is not vacuous.
    assert (got[1:] - got[:1]).abs().max() > 1e-2
