"""Sums and gathers over a process group that also work without one: the reductions a `PolicyHandle`
exposes to callbacks, in one place for every policy behind it (our engine's data-parallel group, or the group
another framework hands its callbacks).

Plain `torch.distributed`: no megatron, so the light layer (the NeMo 2 / Megatron-Bridge adapters) uses it
too. Under NCCL a CPU tensor makes the round trip through the GPU, since NCCL reduces device memory only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_objects", "all_reduce_sum", "group_rank_and_size"]


def group_rank_and_size(group: Any = None) -> tuple[int, int]:
    """This process's rank in `group` (None: the whole world) and the group's size; (0, 1) without a
    process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """A copy of `tensor` summed over `group`, on `tensor`'s device (a copy even with one rank)."""
    result = tensor.clone()
    if group_rank_and_size(group)[1] > 1:
        on_gpu = dist.get_backend(group) == "nccl" and result.device.type == "cpu"
        reduced = result.cuda() if on_gpu else result
        dist.all_reduce(reduced, group=group)
        result = reduced.to(tensor.device) if on_gpu else reduced
    return result


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (`[obj]` with one rank)."""
    size = group_rank_and_size(group)[1]
    if size == 1:
        return [obj]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, obj, group=group)
    return gathered
