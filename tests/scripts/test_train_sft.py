"""The SFT entry point: a real tiny run in a subprocess, dry runs and config errors in-process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_quagmire.config.errors import validate_config
from nemo_quagmire.config.sft import SFTRunConfig
from nemo_quagmire.plan.sft import plan_sft_run
from nemo_quagmire.trainer.build import build_sft_trainer
from nemo_quagmire.trainer.entry import compose_sft_config, plan_or_train
from nemo_quagmire.utils.errors import InputError

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "train_sft.py"

_spec = importlib.util.spec_from_file_location("train_sft", SCRIPT)
train_sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_sft)

TINY_RUN = [
    "+model.num_layers=2",
    "sft.max_steps=2",
    "sft.global_batch_size=16",
    "sft.micro_batch_size=8",
    "data.num_sft=64",
    "data.num_heldout=8",
    "validation.interval=2",
    "validation.num_problems=4",
    "validation.num_samples=2",
    "validation.max_new_tokens=24",
    "checkpoint.interval=2",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]


def test_a_tiny_run_trains_validates_and_checkpoints(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY_RUN, f"run_dir={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "train/loss" in r) for r in records] == [(0, False), (1, True), (2, True), (2, False)]
    assert records[-1]["val/heldout_loss/token_mean"] < records[0]["val/heldout_loss/token_mean"]
    assert "val/macro/pass@2" in records[-1]
    assert (tmp_path / "checkpoints" / "step_00000002" / "checkpoint_meta.json").is_file()
    assert (tmp_path / "eval" / "step_00000002" / "samples.parquet").is_file()


@pytest.mark.parametrize("name", ["tiny", "nemo12b"])
def test_dry_runs_print_the_plan(name, capsys):
    cfg = compose_sft_config(name, ["dry_run=true"])
    assert plan_or_train(cfg, plan=plan_sft_run, build=build_sft_trainer, what="SFT config") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"SFT dry run of runs/sft-{name}") and "fits in" in out


def test_config_errors_exit_2_naming_the_key():
    raw = compose_sft_config("tiny").model_dump()
    raw["sft"]["packing"] = "zip"
    with pytest.raises(InputError) as info:  # exit code 2 in the scripts (utils.errors.cli_main)
        validate_config(SFTRunConfig, raw, "SFT config")
    err = str(info.value)
    assert "invalid SFT config" in err and "sft.packing = 'zip'" in err
