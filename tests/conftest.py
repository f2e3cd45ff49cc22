"""Shared fixtures. Tests read benchmark data from ../shared/benchmarks (or $NEMO_QUAGMIRE_BENCHMARKS_DIR)
and skip, saying why, where neither exists (a user's fresh clone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO_ROOT.parent / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def shared_benchmarks_dir() -> Path:
    """The real 7-benchmark data directory, or skip."""
    env = os.environ.get("NEMO_QUAGMIRE_BENCHMARKS_DIR")
    path = Path(env) if env else SHARED_BENCHMARKS
    if not (path / "math500.jsonl").is_file():
        pytest.skip(
            f"no benchmark data at {path}: set NEMO_QUAGMIRE_BENCHMARKS_DIR or run scripts/prepare_benchmarks.py"
        )
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
