"""Distributed start-up and tear-down: process groups, megatron parallel state, seeds.

A bad layout (8 heads on TP=3, 30 layers on PP=4, 6 GPUs for TP=4) makes megatron fail late and obscurely:
an assertion inside a layer constructor, or a hang when ranks disagree. :func:`validate_layout` therefore runs
on the configs alone, before any process group exists, and says which numbers clash and how to fix them.

The backend follows the hardware: NCCL with CUDA, gloo without (then the CPU compatibility layer in
``compat`` is switched on). Context parallelism needs Transformer Engine attention, so it is refused on gloo.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from nemo_quagmire.config.model import ModelConfig
from nemo_quagmire.config.parallel import ParallelConfig, model_split_problems
from nemo_quagmire.megatron import compat
from nemo_quagmire.utils.distributed import all_gather_objects, all_reduce_sum
from nemo_quagmire.utils.logging import get_logger

__all__ = [
    "Layout",
    "destroy_parallel",
    "initialize_parallel",
    "launched_world",
    "parallel_context",
    "set_random_seed",
    "validate_layout",
]

logger = get_logger(__name__)


@dataclass(frozen=True)
class Layout:
    """A validated layout with the data-parallel size resolved."""

    tp: int
    pp: int
    cp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def validate_layout(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    world_size: int,
    *,
    backend: Literal["nccl", "gloo"] | None = None,
) -> Layout:
    """Check that ``model_cfg`` splits evenly under ``parallel_cfg`` on ``world_size`` ranks.

    Megatron's rules: attention heads, query groups (``num_query_groups % TP == 0``), the MLP width and the
    vocabulary split over TP; layers split over PP; TP x PP x CP divides the world size.

    Args:
        model_cfg: the model.
        parallel_cfg: the requested split.
        world_size: number of processes that will run.
        backend: the process-group backend when known; ``"gloo"`` refuses context parallelism.

    Returns:
        The layout with the data-parallel size filled in.

    Raises:
        ValueError: every violated rule, one per line, each naming the values and a fix.
    """
    tp = parallel_cfg.tensor_model_parallel_size
    pp = parallel_cfg.pipeline_model_parallel_size
    cp = parallel_cfg.context_parallel_size
    problems = model_split_problems(model_cfg, parallel_cfg)
    if cp > 1 and backend == "gloo":
        problems.append(
            f"context_parallel_size={cp} is unsupported on gloo/CPU: megatron-core runs context parallelism "
            "only in Transformer Engine attention (CUDA); set context_parallel_size: 1"
        )
    if parallel_cfg.sequence_parallel and backend == "gloo":
        problems.append(
            "sequence_parallel=True needs Transformer Engine (CUDA); set sequence_parallel: false"
        )
    model_parallel = tp * pp * cp
    dp = parallel_cfg.data_parallel_size
    if world_size % model_parallel:
        problems.append(
            f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes or change the split"
        )
    elif dp is not None and dp * model_parallel != world_size:
        problems.append(
            f"data_parallel_size={dp} but world size {world_size} / (TP x PP x CP = {model_parallel}) = "
            f"{world_size // model_parallel}; leave data_parallel_size unset or launch "
            f"{dp * model_parallel} processes"
        )
    if problems:
        raise ValueError("invalid parallel layout:\n  " + "\n  ".join(problems))
    return Layout(tp=tp, pp=pp, cp=cp, dp=world_size // model_parallel)


def set_random_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker, Megatron-LM style.

    Each pipeline stage gets ``seed + 100 * pp_rank`` (stages hold different layers); tensor-parallel ranks
    share the seed, so CPU-initialised weights match the TP=1 model; the tracker gives TP ranks distinct
    dropout streams. Call after megatron's parallel state is initialised.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def launched_world() -> tuple[int, Literal["nccl", "gloo"]]:
    """The world size and backend :func:`initialize_parallel` will use: the existing process group's size,
    else the launcher's ``WORLD_SIZE``, else 1; NCCL with CUDA, else gloo. Reads no process group state
    beyond ``is_initialized``, so entry points check the layout with it before starting anything."""
    backend: Literal["nccl", "gloo"] = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_initialized():
        return dist.get_world_size(), backend
    return int(os.environ.get("WORLD_SIZE", "1")), backend


def initialize_parallel(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, seed: int = 1234, timeout_minutes: int = 30
) -> Layout:
    """Validate the layout, then create the process group (if needed) and megatron's parallel state.

    Reads the world from the launcher (torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``); without a
    launcher it starts a one-process world on a free local port. A process group that already exists is
    reused (so a job can switch layouts: :func:`destroy_parallel` then ``initialize_parallel`` again).

    Returns:
        The validated layout.

    Raises:
        ValueError: the layout does not fit (see :func:`validate_layout`).
    """
    cuda = torch.cuda.is_available()
    launched = "WORLD_SIZE" in os.environ
    world_size, backend = launched_world()
    layout = validate_layout(model_cfg, parallel_cfg, world_size, backend=backend)
    if not cuda:
        compat.activate()
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if launched:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                timeout=timeout,
            )
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_random_seed(seed)
    logger.info(
        "parallel state: world %d = TP %d x PP %d x CP %d x DP %d on %s",
        world_size,
        layout.tp,
        layout.pp,
        layout.cp,
        layout.dp,
        backend,
    )
    return layout


def destroy_parallel(destroy_process_group: bool = True) -> None:
    """Tear down megatron's parallel state and, if asked, the default process group (idempotent)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def parallel_context(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, seed: int = 1234, timeout_minutes: int = 30
) -> Iterator[Layout]:
    """``initialize_parallel`` on entry; on exit tear down what it created (the process group only if it was
    not there before)."""
    owns_group = not dist.is_initialized()
    layout = initialize_parallel(model_cfg, parallel_cfg, seed=seed, timeout_minutes=timeout_minutes)
    try:
        yield layout
    finally:
        destroy_parallel(destroy_process_group=owns_group)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_parallel_rank_and_size() -> tuple[int, int]:
    """This rank's data-parallel index and the data-parallel size ((0, 1) before parallel start-up)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def _data_parallel_group() -> Any:
    """Megatron's data-parallel group, or None before parallel start-up (then one rank: nothing to reduce)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None


def all_reduce_sum_data_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` summed over data-parallel ranks (a plain copy with one rank)."""
    group = _data_parallel_group()
    return all_reduce_sum(tensor, group) if group is not None else tensor.clone()


def all_gather_objects_data_parallel(obj: object) -> list[object]:
    """Every data-parallel rank's picklable ``obj``, in rank order (``[obj]`` with one rank)."""
    group = _data_parallel_group()
    return all_gather_objects(obj, group) if group is not None else [obj]
