"""Callbacks: how validation and monitoring code plugs into the SFT and GRPO loops.

A callback sees the policy through a `PolicyHandle` of small functions (per-token log-probs, generation, the
tokenizer, a data-parallel sum), never the trainer object: the held-out-loss and Pass@k callbacks then run
unchanged in either loop, and their Lightning adapters only have to provide the same functions.

Hooks and when they run (every rank calls them; callbacks reduce across data-parallel ranks themselves with
`PolicyHandle.all_reduce_sum` and log on rank 0 through the metrics they return):
- `on_train_start(handle)`
- `on_validation(handle) -> metrics`: at the start, every `val_interval` steps and at the end; the metrics
  returned (e.g. `val/heldout_loss/token_mean`) are logged at that step.
- `on_step_end(handle, metrics)`: after each optimizer step, with that step's metrics.
- `on_checkpoint(handle, path)`: after a checkpoint is complete on disk.
- `on_train_end(handle)`
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams


class Tokenizer(Protocol):
    """What the loops and callbacks need of a tokenizer (the synthetic CharTokenizer, or an HF adapter)."""

    pad_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    def save(self, directory: Path) -> object:
        """Write the tokenizer's files into `directory` (the run dir keeps them for evaluation)."""


@dataclass(frozen=True)
class PolicyHandle:
    """The policy as callbacks see it, at one step of one run.

    Attributes:
        step: optimizer steps done so far.
        run_dir: the run directory (callbacks write their artefacts under it).
        tokenizer: encodes prompts and decodes completions.
        logprobs: `(tokens Long[B, T], lengths Long[B]) -> Float[B, T]`, per-token log-probs under the current
            weights (aligned: `[b, t] = log p(tokens[b, t] | tokens[b, :t])`, 0 at position 0 and padding).
            Collective: every rank of a model replica calls it with the same batch.
        generate: `(prompt ids, group_size, SamplingParams) -> RolloutBatch` from the current weights.
        all_reduce_sum: sums a tensor over data-parallel ranks (identity with one rank).
        all_gather_objects: every data-parallel rank's picklable object, in rank order (`[obj]` with one).
        data_parallel_rank, data_parallel_size: this rank's share of evaluation work.
    """

    step: int
    run_dir: Path
    tokenizer: Tokenizer
    logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    generate: Callable[[Sequence[Sequence[int]], int, SamplingParams], RolloutBatch]
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    all_gather_objects: Callable[[Any], list[Any]] = lambda obj: [obj]
    data_parallel_rank: int = 0
    data_parallel_size: int = 1


class Callback:
    """Base class with no-op hooks; override the ones you need."""

    def on_train_start(self, handle: PolicyHandle) -> None:
        """Before the first step (after a resume: before the first resumed step)."""

    def on_validation(self, handle: PolicyHandle) -> Mapping[str, float]:
        """Evaluate; return metrics to log at `handle.step`."""
        return {}

    def on_step_end(self, handle: PolicyHandle, metrics: Mapping[str, Any]) -> None:
        """After each optimizer step."""

    def on_checkpoint(self, handle: PolicyHandle, path: Path) -> None:
        """After a checkpoint is complete on disk."""

    def on_train_end(self, handle: PolicyHandle) -> None:
        """After the last step (also when training stops early on an error)."""


class CallbackList:
    """Calls every callback's hook in order; validation metrics are merged (a duplicate name is an error)."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, handle: PolicyHandle) -> None:
        for callback in self.callbacks:
            callback.on_train_start(handle)

    def on_validation(self, handle: PolicyHandle) -> dict[str, float]:
        merged: dict[str, float] = {}
        for callback in self.callbacks:
            metrics = callback.on_validation(handle)
            clash = merged.keys() & metrics.keys()
            if clash:
                raise ValueError(
                    f"{type(callback).__name__} returned metrics {sorted(clash)} that another callback "
                    "already returned; give each callback its own metric prefix"
                )
            merged.update(metrics)
        return merged

    def on_step_end(self, handle: PolicyHandle, metrics: Mapping[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_step_end(handle, metrics)

    def on_checkpoint(self, handle: PolicyHandle, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(handle, path)

    def on_train_end(self, handle: PolicyHandle) -> None:
        for callback in self.callbacks:
            callback.on_train_end(handle)
