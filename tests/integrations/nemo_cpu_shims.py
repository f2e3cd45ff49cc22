"""CPU-only shims of NeMo 2.7.3 internals, so a real `llm.finetune` runs in CI without a GPU.

They belong to the tests: on a GPU none of them is needed, and the library never installs them. Each is the
narrowest change that lets NeMo's own code path run on the CPU; megatron-core's own CPU fixes come from
`nemo_quagmire.megatron.compat` (activated here too). Model settings are not shims: the test's `GPTConfig`
asks for `use_cpu_initialization=True`, local (non-TE) layers and no fused kernels, as a CPU user would.
What NeMo assumes, where (files under nemo/ unless said), and the shim:

1. CUDA stream: `torch.cuda.Stream()` wraps DDP set-up (lightning/megatron_parallel.py
   `MegatronParallel.init_model_parallel`), and `default_data_step` moves batches to
   `torch.cuda.current_device()`; both raise without CUDA. Shim: that module's `torch.cuda.Stream()` is None
   (`torch.cuda.stream(None)` is already a no-op context) and its `current_device()` is the CPU.
2. Pinned log scalars: values logged during training are staged with `torch.tensor(x, pin_memory=True)
   .to("cuda", non_blocking=True)` (lightning/pytorch/strategies/megatron_strategy.py `training_step`,
   lightning/pytorch/plugins/data_sampler.py `on_megatron_step_end`); pinning needs CUDA. Shim: in those
   modules `torch.tensor(..., pin_memory=True)` returns an object whose `.to(...)` is the CPU tensor.
3. Batch to device: `gpt_data_step` (collections/llm/gpt/model/base.py) moves the batch with
   `tensor.cuda(non_blocking=True)`. Shim (`cpu_data_step`): the model config's `data_step_fn` runs it with
   `Tensor.cuda` returning the tensor itself, for the duration of that call only.
4. RNG tracker seed: NeMo seeds megatron's model-parallel RNG tracker only when
   `torch.cuda.device_count() > 0` (lightning/megatron_init.py `_set_random_seed`), and megatron's
   attention forks that tracker. Shim: after NeMo's seeding, seed the tracker (CPU states, via compat).
5. Samples-mapping check: the fine-tuning dataset all-reduces `torch.cuda.LongTensor([1])`
   (collections/llm/gpt/data/utils.py `_get_samples_mapping`). Shim: that module's `torch.cuda.LongTensor`
   is the CPU `torch.LongTensor`.
6. Timers: NeMo's progress printer logs megatron's timers, which gather them on
   `torch.cuda.current_device()` (megatron/core/timers.py `_get_elapsed_time_all_ranks`). Shim: that
   module's `current_device()` is the CPU.

Shims 1, 2, 5 and 6 are one stand-in `torch` module (`_CpuTorch`) set as the `torch` global of exactly the
modules named above, for the duration of `nemo_on_cpu()`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Iterator
from typing import Any

import torch


class _Staged:
    """`torch.tensor(x, pin_memory=True)` on CPU: `.to(device, ...)` returns the plain CPU tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.tensor


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as the shimmed NeMo modules see it."""

    Stream = staticmethod(lambda *args, **kwargs: None)  # torch.cuda.stream(None) is a no-op context
    LongTensor = torch.LongTensor

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")


class _CpuTorch(types.ModuleType):
    """`torch` as the shimmed NeMo modules see it: torch's, but with `_CpuCuda` and pinning-free scalars."""

    cuda = _CpuCuda("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def tensor(*args: Any, pin_memory: bool = False, **kwargs: Any) -> Any:
        value = torch.tensor(*args, **kwargs)
        return _Staged(value) if pin_memory else value


@contextlib.contextmanager
def _tensor_cuda_is_identity() -> Iterator[None]:
    real = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = real


def cpu_data_step(data_step: Any) -> Any:
    """Shim 3: `data_step` (e.g. `gpt_data_step`) with `Tensor.cuda` as the identity during the call."""

    @functools.wraps(data_step)
    def on_cpu(*args: Any, **kwargs: Any) -> Any:
        with _tensor_cuda_is_identity():
            return data_step(*args, **kwargs)

    return on_cpu


@contextlib.contextmanager
def nemo_on_cpu() -> Iterator[None]:
    """Shims 1, 2, 4, 5 and 6 (and megatron-core's CPU compat layer) for the duration of the block."""
    from nemo_quagmire.megatron import compat

    compat.activate()
    parallel = importlib.import_module("nemo.lightning.megatron_parallel")
    strategy = importlib.import_module("nemo.lightning.pytorch.strategies.megatron_strategy")
    sampler = importlib.import_module("nemo.lightning.pytorch.plugins.data_sampler")
    init = importlib.import_module("nemo.lightning.megatron_init")
    data_utils = importlib.import_module("nemo.collections.llm.gpt.data.utils")
    timers = importlib.import_module("megatron.core.timers")
    shimmed = (parallel, strategy, sampler, data_utils, timers)
    saved = [(module, "torch", module.torch) for module in shimmed]
    saved.append((init, "_set_random_seed", init._set_random_seed))
    for module in shimmed:
        module.torch = _CpuTorch("torch")
    real_seed = init._set_random_seed

    def set_random_seed(seed: int) -> None:
        from megatron.core import tensor_parallel
        from megatron.core.parallel_state import get_pipeline_model_parallel_rank

        real_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * get_pipeline_model_parallel_rank())

    init._set_random_seed = set_random_seed
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        compat.deactivate()
