"""The GRPO entry point: dry runs of the shipped configs, config errors, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.plan.grpo import plan_grpo_run
from nemo_quagmire.trainer.entry import compose_run_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "train_grpo.py"


def _config(name: str, overrides: list[str] = ()) -> GRPORunConfig:
    return compose_run_config(name, overrides)


@pytest.mark.parametrize("name", ["tiny", "qwen3_4b", "llama3_8b", "nemo12b"])
def test_shipped_configs_fit_their_hardware(name):
    report, fits = plan_grpo_run(_config(name))
    assert fits, report
    assert "fits in 79.6 GiB per GPU" in report


def test_nemo12b_without_model_parallelism_does_not_fit_and_says_what_to_change():
    cfg = _config(
        "nemo12b",
        [
            "parallel.tensor_model_parallel_size=1",
            "parallel.sequence_parallel=false",
            "parallel.data_parallel_size=1",
            "rollout.vllm.tensor_parallel_size=1",
        ],
    )
    report, fits = plan_grpo_run(cfg)
    assert not fits
    assert "DOES NOT FIT" in report.upper() and "TP" in report


def test_a_layout_that_does_not_divide_the_model_is_a_config_error_naming_the_valid_sizes():
    with pytest.raises(
        ValueError, match=r"tensor_model_parallel_size=3 does not divide num_attention_heads=32"
    ):
        _config("nemo12b", ["parallel.tensor_model_parallel_size=3", "parallel.data_parallel_size=1"])


def test_a_world_the_layout_does_not_fit_is_an_input_error_before_anything_starts(monkeypatch):
    import torch.distributed as dist

    from nemo_quagmire.trainer.entry import plan_or_train
    from nemo_quagmire.utils.errors import InputError

    cfg = _config("tiny", ["parallel.tensor_model_parallel_size=2"])  # TP 2 splits the tiny model
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc-per-node 3 would set it
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # a fresh rank: no process group yet
    built = []
    with pytest.raises(InputError, match=r"world size 3 is not divisible by TP x PP x CP = 2 x 1 x 1 = 2"):
        plan_or_train(cfg, plan=plan_grpo_run, build=built.append, what="GRPO config")
    assert not built  # no trainer, no process group


def _launch(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_config_errors_exit_2_naming_the_key():
    process = _launch(["grpo.group_size=1"])
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert "grpo.group_size" in err and "at least 2" in err


TINY_RUN = [
    "max_steps=4",
    "+model.num_layers=2",
    "sft_warmup.steps=3",
    "sft_warmup.batch_size=8",
    "grpo.prompts_per_step=4",
    "grpo.group_size=4",
    "grpo.micro_batch_size=16",
    "rollout.max_new_tokens=24",
    "data.num_sft=64",
    "data.num_rl=32",
    "data.num_heldout=8",
    "validation.interval=2",
    "validation.num_problems=4",
    "validation.num_samples=2",
    "checkpoint.interval=2",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]
NON_DETERMINISTIC = ("time",)


def _deterministic(records: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in NON_DETERMINISTIC and not k.startswith("timing/")}
        for r in records
    ]


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_uninterrupted_run_exactly(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = _launch([*TINY_RUN, f"run_dir={straight}"])
    victim = _launch([*TINY_RUN, f"run_dir={killed}"], start_new_session=True)
    # Kill the second run after its step-3 record: the step-2 checkpoint exists, step 3 must be redone.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        path = killed / "metrics.jsonl"
        if path.exists() and any(
            '"step": 3,' in line and "train/" in line for line in path.read_text().splitlines()
        ):
            break
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        time.sleep(0.2)
    else:
        pytest.fail("the run never reached step 3")
    # SIGKILL the whole process group, as a crashed node would: the run's helper processes (the checkpoint
    # writer's multiprocessing manager) must not outlive it.
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert (killed / "checkpoints" / "step_00000002").is_dir()
    assert not (killed / "checkpoints" / "step_00000004").exists()

    resumed = _launch([*TINY_RUN, f"run_dir={killed}"])
    for process in (uninterrupted, resumed):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    assert "resumed from" in out + err
    expected, got = _deterministic(_metrics(straight)), _deterministic(_metrics(killed))
    assert [r["step"] for r in got] == [0, 1, 2, 2, 3, 4, 4]  # validations at 0, 2, 4 and steps 1-4
    assert got == expected
