"""The CPU compatibility layer: a no-op where CUDA exists, idempotent, and each patched call site works."""

from __future__ import annotations

import importlib

import pytest
import torch

from nemo_quagmire.megatron import compat


@pytest.fixture
def fresh_compat(megatron_world1):
    """Compat switched off for the test; switched back on afterwards (the other tests need it on CPU)."""
    compat.deactivate()
    yield
    compat.deactivate()
    compat.activate()


def _patched_attributes() -> dict[str, object]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as mcore_random

    found = {f"{name}.torch": importlib.import_module(name).torch for name in compat.PROXIED_MODULES}
    found["Tensor.type"] = torch.Tensor.type
    found["Tensor.cuda"] = torch.Tensor.cuda
    found["tracker class"] = mcore_random.CudaRNGStatesTracker
    found["DistributedOptimizer.load_state_dict"] = DistributedOptimizer.load_state_dict
    return found


def test_no_op_when_cuda_is_available(fresh_compat, monkeypatch):
    before = _patched_attributes()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compat.activate() is False
    assert not compat.is_active()
    assert _patched_attributes() == before
    assert all(value is torch for key, value in before.items() if key.endswith(".torch"))


def test_activation_is_idempotent_and_reversible(fresh_compat):
    original = _patched_attributes()
    assert compat.activate() is True
    patched = _patched_attributes()
    assert all(patched[key] is not original[key] for key in original)
    assert compat.activate() is True
    assert _patched_attributes() == patched  # nothing wrapped twice
    compat.deactivate()
    assert _patched_attributes() == original


def test_rng_tracker_runs_on_the_cpu_generator(megatron_world1):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(77)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(5)
    outside = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)  # the default stream is untouched
    with tracker.fork():
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the tracked stream advanced
    torch.manual_seed(77 + 2718)  # megatron's model-parallel seed for TP rank 0
    assert torch.equal(first, torch.rand(3))


def test_cuda_devices_in_factories_become_cpu(megatron_world1):
    from megatron.core.transformer.utils import get_default_causal_mask
    from megatron.core.utils import GlobalMemoryBuffer, local_multi_tensor_l2_norm

    assert torch.equal(get_default_causal_mask(3), torch.ones(3, 3).triu(1).bool())
    buffer = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "test")
    assert buffer.device.type == "cpu" and buffer.shape == (2, 3)
    norm, _ = local_multi_tensor_l2_norm(None, None, [[torch.tensor([3.0]), torch.tensor([4.0])]], False)
    assert norm.item() == pytest.approx(5.0)


def test_type_checks_see_cuda_names_only_inside_megatron_optimizer_modules(megatron_world1):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    assert torch.zeros(1).type() == "torch.FloatTensor"  # callers elsewhere see the truth
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=5.0)  # asserts grad.type() is CUDA float
    torch.testing.assert_close(param.grad, torch.tensor([0.6, 0.8]), atol=1e-6, rtol=0)


def test_tensor_cuda_is_a_no_op_only_inside_the_language_module(megatron_world1):
    # The real call site (tied embeddings synchronised across pipeline stages) runs in test_hf.py at PP=2;
    # here a function compiled as part of that module stands in for it.
    namespace = {"__name__": "megatron.core.models.common.language_module.language_module"}
    exec("def move(tensor):\n    return tensor.cuda()", namespace)
    weight = torch.ones(2)
    assert namespace["move"](weight) is weight
    with pytest.raises((AssertionError, RuntimeError)):  # anywhere else CPU-only torch still refuses
        weight.cuda()


def test_inference_communication_accepts_cpu_tensors():
    from megatron.core.inference import communication_utils

    communication_utils._is_cuda(torch.zeros(1))
    with pytest.raises(AssertionError):
        communication_utils._is_cuda(None)


def test_trace_lists_redirected_call_sites(fresh_compat):
    from megatron.core.transformer.utils import get_default_causal_mask

    compat.activate(trace=True)
    get_default_causal_mask(2)
    assert any(
        site.startswith("torch.ones(device='cuda') at megatron/core/transformer/utils.py:")
        for site in compat.redirected_call_sites()
    )
