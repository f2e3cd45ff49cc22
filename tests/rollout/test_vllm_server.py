"""VLLMServerEngine's process boundary, in the base venv: the server hosts the fake engine of
tests/rollout/fake_engine.py (the real vLLM behind it is tested in test_vllm_engine.py and the GRPO tests).

What crosses the boundary is checked against values computed here: the fake engine's completions are a pure
function of the prompt seeds and of a checksum of the weights it holds, so a push that did not arrive, or
seeds that were not passed on, change the expected tokens. Each server start costs a Python start with
torch (~2-8 s on 2 busy cores): one server serves the happy-path tests, only failure tests start their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.megatron.hf import hf_config_from_model_config, hf_tensor_shapes, save_hf_checkpoint
from nemo_quagmire.rollout.base import SamplingParams
from nemo_quagmire.rollout.vllm_server import (
    PYTHON_ENV,
    EngineServerError,
    VLLMServerEngine,
    server_environment,
)
from tests.rollout.fake_engine import FAKE_ENGINE, expected_completion, weights_checksum

REPO = Path(__file__).resolve().parents[2]
MODEL = get_model_preset("tiny").replace(num_layers=1)


def _random_weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in hf_tensor_shapes(MODEL).items()}


def _write_model(directory: Path, weights: dict[str, torch.Tensor]) -> Path:
    save_hf_checkpoint(weights.items(), directory, hf_config_from_model_config(MODEL))
    return directory


@pytest.fixture(autouse=True)
def _fake_engine_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server imports the fake engine from this repository's tests package."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("models")
    weights = {name: _random_weights(seed) for seed, name in enumerate(("old", "new"))}
    return {name: (_write_model(root / name, w), w) for name, w in weights.items()}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServerEngine]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        # what torchrun gives a trainer rank: the server must not see it
        for name, value in {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500",
        }.items():
            patch.setenv(name, value)
        patch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
        engine = VLLMServerEngine(
            models["old"][0], devices=[1], log_file=log, engine_class=FAKE_ENGINE, dtype="float32", seed=3
        )
    yield engine
    engine.close()


def _completions(batch) -> list[list[int]]:
    return batch.completion_ids()


def test_generate_crosses_the_boundary_with_seeds_and_layout(server: VLLMServerEngine, models):
    checksum = weights_checksum(models["old"][1].items())
    prompts = [[5, 6, 7], [8]]
    batch = server.generate(prompts, 2, SamplingParams(max_new_tokens=4, seed=10))
    assert batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert batch.prompt_lengths.tolist() == [3, 3, 1, 1]
    assert batch.tokens[0, :3].tolist() == [5, 6, 7] and batch.tokens[2, :1].tolist() == [8]
    # prompt i gets seed 10 + i; group member m draws from seed * 1000 + m (the fake engine's rule)
    expected = [
        expected_completion((10 + i) * 1000 + m, checksum, MODEL.vocab_size, 4)
        for i in (0, 1)
        for m in (0, 1)
    ]
    assert _completions(batch) == expected
    explicit = server.generate(prompts, 2, SamplingParams(max_new_tokens=4, seed=10), prompt_seeds=[11, 10])
    assert _completions(explicit) == [expected[2], expected[3], expected[0], expected[1]]
    assert server.dtype == torch.float32 and server.eos_token_ids == {2}
    assert not server.shares_policy_weights


def test_the_server_runs_outside_the_trainers_world_on_its_devices(server: VLLMServerEngine):
    line = next(
        line for line in server.log_file.read_text().splitlines() if line.startswith("fake engine pid")
    )
    assert f"pid {server.pid}:" in line
    assert "RANK=None, WORLD_SIZE=None, LOCAL_RANK=None, MASTER_ADDR=None, MASTER_PORT=None" in line
    assert "CUDA_VISIBLE_DEVICES=7" in line  # device 1 of the visible "4,7"


def test_pushed_weights_reach_the_engine_and_bad_streams_do_not(server: VLLMServerEngine, models):
    sampling = SamplingParams(max_new_tokens=3, seed=1)
    new = models["new"][1]
    server.update_weights(iter(new.items()))
    first = server.generate([[4]], 1, sampling)
    assert _completions(first) == [
        expected_completion(1000, weights_checksum(new.items()), MODEL.vocab_size, 3)
    ]

    with pytest.raises(ValueError, match=r"'model.norm.weight' of shape \[3\]"):
        server.update_weights({**new, "model.norm.weight": torch.zeros(3)}.items())
    with pytest.raises(ValueError, match=r"ended without 1 tensor"):
        server.update_weights((n, t) for n, t in new.items() if n != "model.norm.weight")
    assert _completions(server.generate([[4]], 1, sampling)) == _completions(first)  # still the pushed ones

    server.load_checkpoint(models["old"][0])
    old = weights_checksum(models["old"][1].items())
    assert _completions(server.generate([[4]], 1, sampling)) == [
        expected_completion(1000, old, MODEL.vocab_size, 3)
    ]


def test_engine_errors_come_back_as_their_type(server: VLLMServerEngine, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"no safetensors in .*raised in the vLLM server; log: "):
        server.load_checkpoint(tmp_path)
    assert server.generate([[4]], 1, SamplingParams(max_new_tokens=1)).tokens.shape == (1, 2)  # still serving


def test_start_up_failure_is_raised_with_its_message_and_reaped(models, tmp_path: Path):
    with pytest.raises(ValueError, match=r"colocated needs sleep mode \(raised in the vLLM server; log: "):
        VLLMServerEngine(
            models["old"][0],
            log_file=tmp_path / "server.log",
            engine_class=FAKE_ENGINE,
            fail_on_start="colocated needs sleep mode",
        )
    assert (
        "the engine tests.rollout.fake_engine:FakeEngine did not start"
        in (tmp_path / "server.log").read_text()
    )
    assert not _server_pids(tmp_path / "server.log", alive=True)


def test_a_server_that_dies_is_reported_with_the_end_of_its_log(models, tmp_path: Path):
    engine = VLLMServerEngine(
        models["old"][0], log_file=tmp_path / "server.log", engine_class=FAKE_ENGINE, exit_on_generate=True
    )
    with pytest.raises(
        EngineServerError, match=r"exited with code 3 during its generate(.|\n)*exiting on purpose"
    ):
        engine.generate([[4]], 1, SamplingParams())
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([[4]], 1, SamplingParams())


def test_a_slow_start_times_out_and_is_killed(models, tmp_path: Path):
    started = time.monotonic()
    with pytest.raises(EngineServerError, match=r"did not finish its start-up within 3 s"):
        VLLMServerEngine(
            models["old"][0],
            log_file=tmp_path / "server.log",
            engine_class=FAKE_ENGINE,
            startup_delay=600,
            startup_timeout=3,
        )
    assert time.monotonic() - started < 60
    assert not _server_pids(tmp_path / "server.log", alive=True)


def test_the_server_python_comes_from_the_argument_then_the_environment(
    models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "no-such-python"))
    with pytest.raises(EngineServerError, match=r"could not start the vLLM server with '.*no-such-python'"):
        VLLMServerEngine(models["old"][0], engine_class=FAKE_ENGINE, log_file=tmp_path / "a.log")
    with pytest.raises(
        EngineServerError, match=r"could not start the vLLM server with '/nonexistent/python'"
    ):
        VLLMServerEngine(
            models["old"][0],
            python="/nonexistent/python",
            engine_class=FAKE_ENGINE,
            log_file=tmp_path / "b.log",
        )


def test_the_server_dies_with_the_trainer(models, tmp_path: Path):
    """A trainer killed with SIGKILL runs no cleanup: the kernel ends the server (PR_SET_PDEATHSIG)."""
    script = textwrap.dedent(
        f"""
        import time
        from nemo_quagmire.rollout.vllm_server import VLLMServerEngine
        engine = VLLMServerEngine({str(models["old"][0])!r}, engine_class={FAKE_ENGINE!r},
                                  log_file={str(tmp_path / "server.log")!r})
        print(engine.pid, flush=True)
        time.sleep(600)
        """
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(trainer.stdout.readline())
        assert _alive(server_pid)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    deadline = time.monotonic() + 20
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid)


def test_server_environment_drops_the_launchers_world():
    base = {"RANK": "3", "TORCHELASTIC_RUN_ID": "x", "MASTER_PORT": "1", "PATH": "/bin", "PYTHONPATH": "/a"}
    env = server_environment(None, "/pkg", base)
    assert env == {"PATH": "/bin", "PYTHONPATH": f"/pkg{os.pathsep}/a"}
    assert server_environment([0, 1], None, {})["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert server_environment([2], None, {"CUDA_VISIBLE_DEVICES": "5,6,7"})["CUDA_VISIBLE_DEVICES"] == "7"
    with pytest.raises(ValueError, match=r"engine devices \[3\] are not among the 3 visible"):
        server_environment([3], None, {"CUDA_VISIBLE_DEVICES": "5,6,7"})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def _server_pids(log: Path, *, alive: bool) -> list[int]:
    pids = [
        int(line.split()[3].rstrip(":"))
        for line in log.read_text().splitlines()
        if line.startswith("fake engine pid")
    ]
    return [pid for pid in pids if _alive(pid) == alive]
