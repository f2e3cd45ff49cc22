"""Let megatron-core 0.16.1 run on a CPU-only torch (gloo), for tests and CI; a no-op wherever CUDA exists.
It also serves megatron-core 0.15.3 (NeMo 2.7's) for what the NeMo 2 integration runs there: a training
step, forward-only log-probs and KV-cached generation (CI's NeMo stage, tests/integrations/test_nemo.py).

megatron-core assumes a GPU in a handful of places. :func:`activate` patches exactly those, and only when
``torch.cuda.is_available()`` is False, so behaviour on a GPU never changes. It is idempotent, and
:func:`deactivate` undoes it (for tests). Set ``NEMO_QUAGMIRE_COMPAT_TRACE=1`` to record every redirected
call site; :func:`redirected_call_sites` lists them (and they are logged at exit).

What breaks on CPU, where (files under megatron/core/), and the fix:

==============================  ============================================  ================================
What breaks                     Where                                         Fix
==============================  ============================================  ================================
``torch.cuda.get_rng_state``    tensor_parallel/random.py:                    tracker subclass keeping its
asserts; attention dropout      CudaRNGStatesTracker.add / .fork              named states as CPU-generator
always forks the tracker        (model_parallel_cuda_manual_seed, dropout)    states
``device="cuda"``,              pipeline_parallel/schedules.py,               a ``torch`` proxy in these
``torch.cuda.current_device``,  pipeline_parallel/p2p_communication.py,       modules only: factories map
``torch.cuda.synchronize`` in   models/common/embeddings/                     cuda to cpu and drop
tensor factories and p2p        rotary_pos_embedding.py, transformer/         pin_memory; current_device()
                                utils.py (causal mask), utils.py (Global-     is the CPU; synchronize() is a
                                MemoryBuffer, l2 norm), tensor_parallel/      no-op
                                mappings.py, distributed/param_and_grad_
                                buffer.py, optimizer/optimizer.py,
                                optimizer/clip_grads.py, dist_checkpointing/
                                strategies/{state_dict_saver,
                                filesystem_async}.py
``weight.data.cuda()``          models/common/language_module/                ``Tensor.cuda()`` returns the
(tied embeddings, PP>1)         language_module.py                            tensor, for calls from there
``t.type() ==                   optimizer/clip_grads.py, optimizer/           ``Tensor.type()`` answers the
'torch.cuda.FloatTensor'``      optimizer.py, optimizer/distrib_optimizer.py  CUDA name, for calls from there
torch Adam (no apex/TE) in the  DistributedOptimizer.                         copy under no_grad; skip 'step'
distributed optimizer: restore  _set_main_param_and_optimizer_states          (load_state_dict sets it from
copies into a leaf view, and                                                  param_groups)
resets 'step' to the template's
no Adam state before the first  DistributedOptimizer.state_dict (also         create zero state with step 0
step: ``assert len(steps)==1``  used by sharded_state_dict when loading)      first
one 'step' tensor shared by all DistributedOptimizer.load_state_dict          give each parameter its own
params, incremented once per                                                  copy
param: resume is not exact
inference at PP>1 asserts       inference/communication_utils.py: _is_cuda    check only that it is not None
``tensor.is_cuda``
activation recomputation saves  tensor_parallel/random.py:                    no CUDA state on CPU: an empty
and restores the CUDA RNG       _get_cuda_rng_state / _set_cuda_rng_state     placeholder, restoring it is a
state (``CheckpointFunction``)  (via _get_all_rng_states, _fork_rng)          no-op (torch's CPU state and
                                                                              the tracker's are restored)
==============================  ============================================  ================================

Not patched (not needed with the settings of ``model.make_transformer_config`` on CPU): fused kernels,
sequence parallelism, CUDA graphs.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from nemo_quagmire.utils.logging import get_logger

__all__ = ["activate", "deactivate", "is_active", "redirected_call_sites"]

logger = get_logger(__name__)

TRACE_ENV = "NEMO_QUAGMIRE_COMPAT_TRACE"

# Modules whose global ``torch`` is replaced by the CPU proxy (see the table above).
PROXIED_MODULES: tuple[str, ...] = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
)
# Modules whose ``tensor.cuda()`` calls return the tensor unchanged.
CUDA_MOVE_MODULES: frozenset[str] = frozenset({"megatron.core.models.common.language_module.language_module"})
# Modules whose ``tensor.type()`` calls get the CUDA type name.
TYPE_CHECK_MODULES: frozenset[str] = frozenset(
    {
        "megatron.core.optimizer.clip_grads",
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.distrib_optimizer",
    }
)

_undo: list[tuple[Any, str, Any]] = []  # (owner, attribute, original value), in patch order
_trace = False
_sites: set[str] = set()


def is_active() -> bool:
    """Whether the patches are installed."""
    return bool(_undo)


def redirected_call_sites() -> list[str]:
    """Call sites redirected so far (``"<what> at megatron/core/<file>:<line>"``); empty unless tracing."""
    return sorted(_sites)


def activate(trace: bool | None = None) -> bool:
    """Install the CPU patches if CUDA is absent; idempotent.

    Args:
        trace: record redirected call sites; None = read ``NEMO_QUAGMIRE_COMPAT_TRACE``.

    Returns:
        Whether the patches are active (False on a machine with CUDA: nothing is touched there).
    """
    global _trace
    if torch.cuda.is_available():
        return False
    if _undo:
        return True
    _trace = os.environ.get(TRACE_ENV) == "1" if trace is None else trace
    _patch_rng_tracker()
    proxy = _CpuTorch()
    for name in PROXIED_MODULES:
        _set(importlib.import_module(name), "torch", proxy)
    _set(torch.Tensor, "type", _make_type_as_cuda(torch.Tensor.type))
    _set(torch.Tensor, "cuda", _make_cuda_as_noop(torch.Tensor.cuda))
    _patch_distributed_optimizer_restore()
    communication_utils = importlib.import_module("megatron.core.inference.communication_utils")
    _set(communication_utils, "_is_cuda", _assert_not_none)
    if _trace:
        atexit.unregister(_log_sites)  # once, however often activation is cycled
        atexit.register(_log_sites)
    logger.debug("megatron CPU compatibility layer active (trace=%s)", _trace)
    return True


def deactivate() -> None:
    """Undo :func:`activate` (restores every patched attribute; meant for tests)."""
    while _undo:
        owner, name, original = _undo.pop()
        setattr(owner, name, original)
    _sites.clear()


def _set(owner: Any, name: str, value: Any) -> None:
    _undo.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _record(what: str) -> None:
    if _trace:
        frame = sys._getframe(2)
        where = frame.f_code.co_filename.split("site-packages/")[-1]
        _sites.add(f"{what} at {where}:{frame.f_lineno}")


def _log_sites() -> None:
    logger.info(
        "megatron CPU compat redirected %d call sites:\n  %s", len(_sites), "\n  ".join(sorted(_sites))
    )


# --- hard-coded CUDA devices -----------------------------------------------------------------------------


class _CpuCuda:
    """Stands in for ``torch.cuda`` inside the proxied modules; everything else is the real module."""

    def __init__(self) -> None:
        self._real = torch.cuda

    def current_device(self) -> torch.device:
        _record("torch.cuda.current_device()")
        return torch.device("cpu")

    def synchronize(self, device: Any = None) -> None:
        _record("torch.cuda.synchronize()")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _CpuTorch:
    """Stands in for ``torch`` inside the proxied modules: tensor factories asked for a CUDA device get the
    CPU (and no pinned memory); ``torch.cuda`` is :class:`_CpuCuda`; every other attribute is torch's own."""

    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor")

    def __init__(self) -> None:
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name), name))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _on_cpu(factory: Callable[..., torch.Tensor], name: str) -> Callable[..., torch.Tensor]:
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        if device is not None and (isinstance(device, int) or torch.device(device).type == "cuda"):
            _record(f"torch.{name}(device={device!r})")
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            _record(f"torch.{name}(pin_memory=True)")
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    return make


# --- tensor type-string checks -------------------------------------------------------------------------


def _make_type_as_cuda(real_type: Callable[..., Any]) -> Callable[..., Any]:
    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = real_type(self, *args, **kwargs)
        if args or kwargs or result.startswith("torch.cuda."):
            return result
        if sys._getframe(1).f_globals.get("__name__") in TYPE_CHECK_MODULES:
            _record("Tensor.type()")
            return "torch.cuda." + result.removeprefix("torch.")
        return result

    return type_


def _make_cuda_as_noop(real_cuda: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if sys._getframe(1).f_globals.get("__name__") in CUDA_MOVE_MODULES:
            _record("Tensor.cuda()")
            return self
        return real_cuda(self, *args, **kwargs)

    return cuda


# --- RNG tracker on the CPU generator ------------------------------------------------------------------


_cpu_tracker_class: type | None = None


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    global _cpu_tracker_class
    if _cpu_tracker_class is None:
        _cpu_tracker_class = _make_cpu_tracker_class(
            mcore_random.CudaRNGStatesTracker, mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME
        )
    _set(mcore_random, "CudaRNGStatesTracker", _cpu_tracker_class)
    _set(mcore_random, "_get_cuda_rng_state", _no_cuda_rng_state)
    _set(mcore_random, "_set_cuda_rng_state", _restore_no_cuda_rng_state)
    existing = mcore_random._CUDA_RNG_STATE_TRACKER
    if existing is not None and not isinstance(existing, _cpu_tracker_class):  # created before activation
        _set(existing, "__class__", _cpu_tracker_class)


def _no_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    _record("_get_cuda_rng_state()")
    return torch.empty(0, dtype=torch.uint8)


def _restore_no_cuda_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    _record("_set_cuda_rng_state()")


def _make_cpu_tracker_class(base: type, default_name: str) -> type:
    class CpuRNGStatesTracker(base):
        """megatron's tracker with its named RNG states held as CPU-generator states."""

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name: str = default_name) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            # megatron-core 0.15 (NeMo 2.7's) has no _current_state_name: forks there are never nested.
            outer_name = getattr(self, "_current_state_name", "default-rng")
            outer_state = torch.get_rng_state()
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(self.states_[outer_name] if outer_name != "default-rng" else outer_state)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


# --- DistributedOptimizer state restore with torch Adam ------------------------------------------------


def _patch_distributed_optimizer_restore() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def restore(self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        targets = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            # 'step' comes from param_groups (load_state_dict); here it is the unloaded template's value.
            for key in (targets.keys() & tensors.keys()) - {"step"}:
                targets[key].copy_(tensors[key])
        return None

    _set(DistributedOptimizer, "_set_main_param_and_optimizer_states", restore)

    original_state_dict = DistributedOptimizer.state_dict

    def state_dict(self: Any) -> dict:
        # torch Adam creates its state lazily at the first step; megatron reads a 'step' from it.
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state[param]
                if "step" not in state:
                    state.setdefault("exp_avg", torch.zeros_like(param))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param))
                    state["step"] = torch.tensor(0.0)
        return original_state_dict(self)

    _set(DistributedOptimizer, "state_dict", state_dict)

    original_load_state_dict = DistributedOptimizer.load_state_dict

    def load_state_dict(self: Any, state_dict: dict) -> None:
        original_load_state_dict(self, state_dict)
        # megatron hands every parameter the same 'step' tensor; torch Adam would increment it once per param.
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()

    _set(DistributedOptimizer, "load_state_dict", load_state_dict)


# --- inference communication ---------------------------------------------------------------------------


def _assert_not_none(tensor: torch.Tensor | None) -> None:
    assert tensor is not None
