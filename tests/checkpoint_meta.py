"""The metadata file of a checkpoint of this project, for tests that only need a checkpoint's metadata (the
keys `nemo_quagmire.megatron.checkpoint.read_checkpoint_meta` requires of every checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from nemo_quagmire.config.model import ModelConfig


def write_checkpoint_meta(path: Path, step: int, model: ModelConfig) -> Path:
    """`path/checkpoint_meta.json` of a step-`step` checkpoint of `model` (created with its directory)."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": 2,
        "step": step,
        "model_config": model.model_dump(mode="json"),
        "layout": {"tp": 1, "pp": 1, "dp": 1},
        "has_optimizer": False,
        "optimizer_metadata": None,
    }
    (path / "checkpoint_meta.json").write_text(json.dumps(meta))
    return path
