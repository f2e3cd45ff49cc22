from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nemo_quagmire.trainer.callbacks import Callback, CallbackList, PolicyHandle


def _handle() -> PolicyHandle:
    return PolicyHandle(
        step=3,
        run_dir=Path("."),
        tokenizer=None,  # type: ignore[arg-type]
        logprobs=lambda tokens, lengths: torch.zeros_like(tokens, dtype=torch.float),
        generate=lambda prompts, group_size, sampling: None,  # type: ignore[arg-type,return-value]
        all_reduce_sum=lambda t: t,
    )


class _Recorder(Callback):
    def __init__(self, name: str, metrics: dict[str, float], calls: list[str]) -> None:
        self.name, self.metrics, self.calls = name, metrics, calls

    def on_train_start(self, handle):
        self.calls.append(f"{self.name}.start@{handle.step}")

    def on_validation(self, handle):
        self.calls.append(f"{self.name}.validation")
        return self.metrics

    def on_step_end(self, handle, metrics):
        self.calls.append(f"{self.name}.step:{metrics['train/loss']}")

    def on_checkpoint(self, handle, path):
        self.calls.append(f"{self.name}.checkpoint:{path.name}")

    def on_train_end(self, handle):
        self.calls.append(f"{self.name}.end")


def test_hooks_run_in_order_and_validation_metrics_merge():
    calls: list[str] = []
    callbacks = CallbackList([_Recorder("a", {"val/a": 1.0}, calls), _Recorder("b", {"val/b": 2.0}, calls)])
    handle = _handle()
    callbacks.on_train_start(handle)
    assert callbacks.on_validation(handle) == {"val/a": 1.0, "val/b": 2.0}
    callbacks.on_step_end(handle, {"train/loss": 0.5})
    callbacks.on_checkpoint(handle, Path("ckpt/step_3"))
    callbacks.on_train_end(handle)
    assert calls == [
        "a.start@3",
        "b.start@3",
        "a.validation",
        "b.validation",
        "a.step:0.5",
        "b.step:0.5",
        "a.checkpoint:step_3",
        "b.checkpoint:step_3",
        "a.end",
        "b.end",
    ]


def test_two_callbacks_reporting_the_same_metric_is_an_error():
    calls: list[str] = []
    callbacks = CallbackList([_Recorder("a", {"val/x": 1.0}, calls), _Recorder("b", {"val/x": 2.0}, calls)])
    with pytest.raises(ValueError, match=r"\['val/x'\].*own metric prefix"):
        callbacks.on_validation(_handle())


def test_default_handle_gathers_a_single_rank():
    assert _handle().all_gather_objects({"k": 1}) == [{"k": 1}]
