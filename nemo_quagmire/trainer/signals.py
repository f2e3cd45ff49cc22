"""Stop a run cleanly on SIGTERM: finish the current step, checkpoint, exit.

Why: SIGTERM is how Slurm pre-empts a job (and how Kubernetes and most schedulers stop one); by default it
kills the process and loses every step since the last checkpoint. Here the handler only records the
request; the step loop asks `requested()` after each step, and on a request saves a checkpoint (unless that
step just saved one) and raises `Preempted`, which the entry point turns into exit code 143. The next
launch with the same command resumes from that checkpoint. Ranks agree through one all-reduce per step, so
a signal that reaches only some ranks (or reaches them between two checks) still stops all of them after the
same step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Preempted", "StopRequest", "stop_on_sigterm"]


class Preempted(Exception):
    """The run stopped early on SIGTERM, after checkpointing (the message names the checkpoint)."""


class StopRequest:
    """Whether SIGTERM arrived; `requested()` is collective when torch.distributed is initialized."""

    def __init__(self) -> None:
        self.received = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def requested(self) -> bool:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[StopRequest]:
    """Record SIGTERM in the yielded `StopRequest` instead of dying; the previous handler is restored after.
    Outside the main thread (signals cannot be handled there) the request never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.signal(signal.SIGTERM, request._handle)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)
