"""Layer-spec / FP8 selection (pure, every case on CPU), and the built model against the parameter count."""

from __future__ import annotations

import pytest
import torch

from nemo_quagmire.config.model import count_parameters, get_model_preset
from nemo_quagmire.config.parallel import ParallelConfig
from nemo_quagmire.megatron.model import (
    LayerSpecSelection,
    build_model,
    detect_transformer_engine,
    make_transformer_config,
    select_layer_spec_and_fp8,
)

BF16_TINY = get_model_preset("tiny").replace(params_dtype="bf16")


@pytest.mark.parametrize(
    ("fp8", "te_version", "capability", "expected"),
    [
        (None, None, None, LayerSpecSelection("local", None)),
        (None, "2.8.0", (9, 0), LayerSpecSelection("transformer_engine", None)),
        ("delayed", "1.13.0", (8, 9), LayerSpecSelection("transformer_engine", "delayed")),
        ("tensorwise", "2.2.0", (9, 0), LayerSpecSelection("transformer_engine", "tensorwise")),
        ("blockwise", "2.3.0", (9, 0), LayerSpecSelection("transformer_engine", "blockwise")),
        ("mxfp8", "2.1.0", (10, 0), LayerSpecSelection("transformer_engine", "mxfp8")),
        (
            "mxfp8",
            "2.1.0",
            None,
            LayerSpecSelection("transformer_engine", "mxfp8"),
        ),  # GPU unknown: TE check only
    ],
)
def test_selection(fp8, te_version, capability, expected):
    cfg = BF16_TINY.replace(fp8=fp8)
    assert select_layer_spec_and_fp8(cfg, te_version=te_version, gpu_capability=capability) == expected


@pytest.mark.parametrize(
    ("fp8", "te_version", "capability", "fragments"),
    [
        ("delayed", None, None, ["fp8='delayed' needs Transformer Engine", "set fp8: null to train in bf16"]),
        ("tensorwise", "2.1.0", (9, 0), ["Transformer Engine >= 2.2.0.dev0", "found 2.1.0"]),
        ("blockwise", "2.2.0", (9, 0), ["Transformer Engine >= 2.3.0.dev0", "found 2.2.0"]),
        ("mxfp8", "2.0.0", (10, 0), ["Transformer Engine >= 2.1.0"]),
        ("mxfp8", "2.5.0", (9, 0), ["compute capability >= 10.0, this one is 9.0"]),
        ("delayed", "2.5.0", (8, 0), ["compute capability >= 8.9, this one is 8.0"]),
    ],
)
def test_unsupported_fp8_is_a_clear_start_up_error(fp8, te_version, capability, fragments):
    with pytest.raises(ValueError) as info:
        select_layer_spec_and_fp8(
            BF16_TINY.replace(fp8=fp8), te_version=te_version, gpu_capability=capability
        )
    for fragment in fragments:
        assert fragment in str(info.value)


def test_transformer_engine_is_absent_on_this_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("GPU machine: TE may be installed")
    assert detect_transformer_engine() is None


def test_cpu_transformer_config_turns_off_fusions(megatron_world1):
    config = make_transformer_config(
        get_model_preset("tiny"), ParallelConfig(), LayerSpecSelection("local", None), cuda=False
    )
    fusions = (
        "gradient_accumulation_fusion",
        "bias_activation_fusion",
        "bias_dropout_fusion",
        "masked_softmax_fusion",
        "apply_rope_fusion",
        "persist_layer_norm",
        "sequence_parallel",
    )
    assert not any(getattr(config, name) for name in fusions)
    assert config.use_cpu_initialization and config.calculate_per_token_loss and config.fp8 is None
    assert (config.num_query_groups, config.kv_channels, config.normalization) == (2, 32, "RMSNorm")


@pytest.mark.parametrize(
    "changes",
    [
        {},
        # Qwen3-like: QK-norm, tied embeddings, heads x head_dim (4 x 48) != hidden, RoPE scaling
        {"qk_layernorm": True, "tie_word_embeddings": True, "kv_channels": 48, "rope_scaling_factor": 8.0},
    ],
    ids=["tiny", "qwen3_like"],
)
def test_built_model_has_the_counted_parameters(megatron_world1, changes):
    cfg = get_model_preset("tiny").replace(**changes)
    (model,) = build_model(cfg, ParallelConfig())
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total
    has_qk_norm = any("q_layernorm" in name for name, _ in model.named_parameters())
    assert has_qk_norm == cfg.qk_layernorm


def test_build_refuses_a_parallel_config_other_than_the_initialised_one(megatron_world1):
    with pytest.raises(ValueError, match=r"\(TP, PP\) = \(2, 1\) but megatron was initialised with \(1, 1\)"):
        build_model(get_model_preset("tiny"), ParallelConfig(tensor_model_parallel_size=2))


def _saved_bytes_forward_calls_and_gradient(recompute: str):
    """Bytes autograd saves in a forward pass of the tiny model, forward calls of layer 0's core attention
    and MLP over forward + backward, and the gradient."""
    from nemo_quagmire.megatron.logprobs import forward_logits
    from nemo_quagmire.megatron.parallel import set_random_seed

    set_random_seed(5)  # the same weights for every setting
    (model,) = build_model(get_model_preset("tiny").replace(recompute=recompute), ParallelConfig())
    layer = model.decoder.layers[0]
    calls = {"core_attention": 0, "mlp": 0}
    for name in calls:
        getattr(layer.self_attention if name == "core_attention" else layer, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    saved = 0

    def count(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    tokens = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        loss = forward_logits(model, tokens).float().logsumexp(-1).mean()
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
    return saved, calls, gradient


def test_activation_recomputation_trades_saved_activations_for_a_second_forward(megatron_world1):
    none, selective, full = (
        _saved_bytes_forward_calls_and_gradient(r) for r in ("none", "selective", "full")
    )
    # selective re-runs core attention in the backward, full re-runs whole layers (MLP included)
    assert none[1] == {"core_attention": 1, "mlp": 1}
    assert selective[1] == {"core_attention": 2, "mlp": 1}
    assert full[1] == {"core_attention": 2, "mlp": 2}
    assert full[0] < selective[0] < none[0]
    for setting in (selective, full):  # recomputation changes memory, never the gradient
        torch.testing.assert_close(setting[2], none[2], atol=0, rtol=0)


@pytest.mark.gpu
def test_fp8_training_step_on_gpu(megatron_world1):
    """Real FP8 (delayed scaling) forward/backward/optimizer step with Transformer Engine on an FP8 GPU."""
    if detect_transformer_engine() is None or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs Transformer Engine and an FP8-capable GPU (compute capability >= 8.9)")
    from nemo_quagmire.config.optim import OptimConfig
    from nemo_quagmire.megatron.train_step import setup_training, train_step

    cfg = BF16_TINY.replace(fp8="delayed", ffn_hidden_size=352)  # FP8 GEMMs need multiples of 16
    trainer = setup_training(build_model(cfg, ParallelConfig()), OptimConfig(lr=1e-4))
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), device="cuda")
    metrics = train_step(trainer, [{"tokens": tokens}], lambda lp, _: (-lp.sum() / lp.numel(), {}))
    assert torch.isfinite(torch.tensor([metrics["loss"], metrics["grad_norm"]])).all()
    assert metrics["update_successful"] == 1.0
