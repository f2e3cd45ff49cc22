"""Shared fixtures. Tests read benchmark data from ../shared/benchmarks (or $NEMO_QUAGMIRE_BENCHMARKS_DIR)
and skip, saying why, where neither exists (a user's fresh clone)."""

from __future__ import annotations

import os
from collections.abc import Iterator
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
            f"no benchmark data at {path}: set NEMO_QUAGMIRE_BENCHMARKS_DIR or run "
            "scripts/prepare_benchmarks.py"
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


@pytest.fixture(scope="session")
def megatron_world1() -> Iterator[None]:
    """Megatron parallel state for one process (gloo on CPU, TP = PP = CP = DP = 1), seeded with 1234.

    Megatron's parallel state is process-global, so it is created once per session and torn down at the end.
    """
    import torch.distributed as dist

    from nemo_quagmire.config.model import get_model_preset
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.parallel import destroy_parallel, initialize_parallel

    owns_group = not dist.is_initialized()
    initialize_parallel(get_model_preset("tiny"), ParallelConfig(), seed=1234)
    yield
    destroy_parallel(destroy_process_group=owns_group)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real Llama chat model as an HF directory: byte-level BPE tokenizer with a chat template, random
    weights, float32-rounded rms_norm_eps, a generation config (tests/hf_models.py). Read-only: copy it to
    change it."""
    from tests.hf_models import make_tiny_chat_model

    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat_model"))
