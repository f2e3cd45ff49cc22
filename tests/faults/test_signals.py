"""Signals on a real training process: SIGTERM (how Slurm pre-empts) checkpoints at the end of the current
step and exits 143, and the same command resumes from there; Ctrl-C exits 130 without a traceback and leaves
no process behind. Two short SFT runs and one resume (~10 s of imports each)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.faults.conftest import launch

MAX_STEPS = 12
RUN = [
    "+model.num_layers=2",
    f"sft.max_steps={MAX_STEPS}",
    "sft.global_batch_size=8",
    "sft.micro_batch_size=8",
    "data.num_sft=64",
    "data.num_heldout=4",
    "validation.interval=1000",  # validations at the start and the end only
    "validation.num_problems=2",
    "validation.num_samples=1",
    "validation.max_new_tokens=8",
    "checkpoint.interval=1000",  # no scheduled checkpoint before the end: a mid-run one is SIGTERM's
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]


def _trained_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
    return [r["step"] for r in records if "train/loss" in r]


def _wait_for_a_step(process, run_dir: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if _trained_steps(run_dir):
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    pytest.fail("the run never finished a step")


def _preempt_and_resume(script: str, args: list[str], steps_dir: Path, steps: int, between=None) -> None:
    """SIGTERM once the run in `steps_dir` has a step: exit 143 naming the checkpoint saved after the current
    step; `between(checkpoint)` checks the stopped state; the same command resumes from that checkpoint and
    trains every step exactly once."""
    process = launch(script, args)
    _wait_for_a_step(process, steps_dir)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]
    stopped_at = _trained_steps(steps_dir)[-1]
    assert stopped_at < steps and "Traceback" not in err
    checkpoint = steps_dir / "checkpoints" / f"step_{stopped_at:08d}"
    assert f"SIGTERM: stopped after step {stopped_at} of {steps} with checkpoint {checkpoint}" in err
    if between is not None:
        between(checkpoint)

    resumed = launch(script, args)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {checkpoint} (step {stopped_at})" in err
    assert _trained_steps(steps_dir) == list(range(1, steps + 1))  # no step lost, none repeated


@pytest.mark.slow
def test_sigterm_checkpoints_after_the_current_step_and_the_same_command_resumes(tmp_path):
    run_dir = tmp_path / "run"

    def only_that_checkpoint(checkpoint: Path) -> None:
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [checkpoint.name]

    _preempt_and_resume("train_sft", [*RUN, f"run_dir={run_dir}"], run_dir, MAX_STEPS, only_that_checkpoint)


@pytest.mark.slow
def test_ctrl_c_exits_130_without_a_traceback_or_leftover_processes(tmp_path):
    run_dir = tmp_path / "run"
    process = launch("train_sft", [*RUN, f"run_dir={run_dir}"], start_new_session=True)
    _wait_for_a_step(process, run_dir)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal sends to the foreground group on Ctrl-C
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    deadline = time.monotonic() + 30  # helpers (forkserver, resource tracker) exit once they see EOF
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return  # the whole group is gone (grader workers included)
        time.sleep(0.2)
    pytest.fail("processes of the interrupted run are still alive")


WARMUP_STEPS = 200
GRPO_RUN = [
    "+model.num_layers=2",
    "max_steps=1",
    f"sft_warmup.steps={WARMUP_STEPS}",
    "sft_warmup.batch_size=8",
    "grpo.prompts_per_step=2",
    "grpo.group_size=2",
    "grpo.micro_batch_size=8",
    "rollout.max_new_tokens=8",
    "data.num_sft=2048",
    "data.num_rl=8",
    "data.num_heldout=4",
    "validation.interval=1000",
    "validation.num_problems=2",
    "validation.num_samples=1",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]


@pytest.mark.slow
def test_sigterm_during_the_grpo_warm_up_checkpoints_it_and_the_same_command_resumes_it(tmp_path):
    """The SFT warm-up is an SFT run of its own: pre-empted, it keeps its steps like any run."""
    run_dir = tmp_path / "run"

    def grpo_not_started(checkpoint: Path) -> None:
        assert not (run_dir / "checkpoints").exists()

    args = [*GRPO_RUN, f"run_dir={run_dir}"]
    _preempt_and_resume("train_grpo", args, run_dir / "sft_warmup", WARMUP_STEPS, grpo_not_started)
    assert (run_dir / "checkpoints" / "step_00000001").is_dir()  # then GRPO ran
