"""scripts/evaluate.py: a checkpoint evaluated in a subprocess gives the held-out loss computed in-process on
the same weights and saves re-gradable samples; a run killed after some shards resumes to the uninterrupted
result; a sweep on (stand-in) vLLM engines shares them and writes the predictor's table; bad input exits 2
before any model is built and writes nothing. The real vLLM run is tests/rollout/test_evaluate_vllm.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_quagmire.callbacks.heldout_loss import HeldOutLossCallback
from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_splits
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.eval.samples import read_samples
from tests.tiny_model import TEST_MODEL as MODEL

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "evaluate.py"

_spec = importlib.util.spec_from_file_location("evaluate", SCRIPT)
evaluate = importlib.util.module_from_spec(_spec)
sys.modules["evaluate"] = evaluate  # its dataclasses look their module up
_spec.loader.exec_module(evaluate)

HELDOUT = generate_splits(
    SyntheticTaskConfig(), seed=1234, num_sft=0, num_rl=0, num_heldout=8
).heldout_records()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, megatron_world1) -> tuple[Path, float]:
    """A step-5 checkpoint in a run dir holding its tokenizer (and an HF export of the same weights in
    `<run_dir>/hf`), and its held-out loss computed in-process."""
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.checkpoint import save_checkpoint
    from nemo_quagmire.megatron.hf import export_hf
    from nemo_quagmire.megatron.policy import MegatronPolicy

    run_dir = tmp_path_factory.mktemp("run")
    policy = MegatronPolicy(MODEL, ParallelConfig(), seed=5)
    path = save_checkpoint(run_dir / "checkpoints", 5, policy.chunks, model_cfg=MODEL)
    export_hf(policy.chunks, run_dir / "hf", MODEL)
    tokenizer = CharTokenizer()
    tokenizer.save(run_dir)
    handle = policy.handle(step=5, run_dir=run_dir, tokenizer=tokenizer, generate=None, micro_batch_size=4)
    loss = HeldOutLossCallback(HELDOUT, tokenizer).on_validation(handle)["val/heldout_loss/token_mean"]
    return path, loss


def test_a_checkpoint_is_evaluated_and_its_samples_regraded(checkpoint, tmp_path):
    path, expected_loss = checkpoint
    out = tmp_path / "eval"
    args = ["--checkpoint", str(path), "--benchmarks", "synthetic", "--n", "4", "--num-problems", "3"]
    args += ["--max-new-tokens", "16", "--heldout", "synthetic", "--synthetic-heldout", "8"]
    args += ["--grader-workers", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["step"] == 5
    metrics = saved["metrics"]
    assert metrics["val/heldout_loss/token_mean"] == pytest.approx(expected_loss, rel=1e-6)
    assert "val/synthetic_arith/pass@4" in metrics and "val/macro/maj@2" in metrics
    assert "val/heldout_loss/token_mean" in result.stdout  # the summary
    assert "synthetic_arith: 12/12 samples (100%)" in result.stderr  # progress (stderr is not a terminal)
    records = read_samples(out / "samples.parquet")
    assert len(records) == 3 * 4 and {r.sample_index for r in records} == {0, 1, 2, 3}

    regraded = tmp_path / "regraded"
    assert evaluate.main(["--regrade", str(out / "samples.parquet"), "--out", str(regraded)]) == 0
    again = json.loads((regraded / "metrics.json").read_text())
    assert again["step"] == 5
    assert again["metrics"] == {k: v for k, v in metrics.items() if k.startswith("val/synthetic_arith/")} | {
        k: v for k, v in metrics.items() if k.startswith("val/macro/")
    }


def test_bad_input_exits_2_before_any_model_is_built(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    row = {"id": "a-1", "problem": "1+1=", "answer": "2", "solution": "", "source": "test"}
    (tmp_path / "alpha.jsonl").write_text(json.dumps(row) + "\n")
    bad_heldout = tmp_path / "heldout.jsonl"
    bad_heldout.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2="}\n')
    base = ["--checkpoint", str(path), "--out", str(tmp_path / "out")]
    cases = [
        (["--benchmarks", "alpha,nope", "--benchmarks-dir", str(tmp_path)], r"unknown benchmark(s) ['nope']"),
        (["--benchmarks", "synthetic", "--n", "4", "--k", "1,8"], "--k 1,8: every k must be in 1..n"),
        (["--benchmarks", "synthetic", "--n", "300"], "--n 300: samples per problem must be in 1..256"),
        (["--heldout", str(bad_heldout)], "heldout.jsonl:2: missing field(s) ['response']"),
        ([], "nothing to evaluate"),
    ]
    for extra, message in cases:
        assert evaluate.main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    missing = ["--checkpoint", str(tmp_path / "nope"), "--heldout", "synthetic", "--out", str(tmp_path)]
    assert evaluate.main(missing) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_hf_directories_and_checkpoints_give_the_same_model_and_tokenizer(checkpoint):
    path, _ = checkpoint
    hf_dir = path.parent.parent / "hf"
    from_checkpoint, step = evaluate.model_config_of(path)
    from_hf, hf_step = evaluate.model_config_of(hf_dir)
    assert (step, hf_step) == (5, 0) and from_hf.architecture_mismatches(from_checkpoint) == {}
    args = evaluate.parse_args(
        ["--checkpoint", str(hf_dir), "--out", "x", "--tokenizer", str(path.parent.parent)]
    )
    assert evaluate.load_tokenizer(args, hf_dir) == CharTokenizer()  # --tokenizer wins over the HF dir
    args = evaluate.parse_args(["--checkpoint", str(path), "--out", "x"])
    assert evaluate.load_tokenizer(args, path) == CharTokenizer()  # found in <run_dir>/tokenizer.json


# Runs evaluate.main in a fresh process; with a shard count k > 0 the process is killed (os._exit, no
# cleanup at all) right after its k-th shard is on disk.
_DRIVER = """
import json, os, sys
sys.path.insert(0, {repo!r})
from nemo_quagmire.eval.shards import ShardStore
argv, kill_after = json.loads(sys.argv[1]), int(sys.argv[2])
if kill_after:
    write, written = ShardStore.write, []
    def write_then_die(self, key, records):
        write(self, key, records)
        written.append(key)
        if len(written) == kill_after:
            os._exit(137)
    ShardStore.write = write_then_die
import importlib.util
spec = importlib.util.spec_from_file_location("evaluate", {script!r})
evaluate = importlib.util.module_from_spec(spec)
sys.modules["evaluate"] = evaluate
spec.loader.exec_module(evaluate)
sys.exit(evaluate.main(argv))
"""


def _run(argv: list[str], kill_after: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    code = _DRIVER.format(repo=str(REPO), script=str(SCRIPT))
    return subprocess.run(
        [sys.executable, "-c", code, json.dumps(argv), str(kill_after)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_a_killed_evaluation_continues_from_its_shards_and_equals_an_uninterrupted_one(
    checkpoint, tmp_path, capsys
):
    path, _ = checkpoint
    # 6 problems x 4 samples; 2 problems per generation call, 2 per shard: 3 shards of one call each.
    args = ["--checkpoint", str(path), "--benchmarks", "synthetic", "--n", "4", "--num-problems", "6"]
    args += ["--max-new-tokens", "16", "--rows-per-batch", "8", "--shard-size", "2", "--grader-workers", "1"]
    whole = _run([*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert re.search(
        r"synthetic_arith: 24/24 samples \(100%\), [\d.]+ samples/s, \d+ tok/s, ETA", whole.stderr
    )

    out = tmp_path / "resumed"
    killed = _run([*args, "--out", str(out)], kill_after=2)
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert len(list((out / "shards").rglob("shard-*.parquet"))) == 2 and not (out / "metrics.json").exists()
    resumed = _run([*args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed 2 finished shard(s)" in resumed.stderr
    assert "synthetic_arith: 24/24 samples (100%)" in resumed.stderr  # 16 of them were there before
    assert read_samples(out / "samples.parquet") == read_samples(tmp_path / "whole" / "samples.parquet")
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())["metrics"]
    got = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {k: v for k, v in got.items() if not k.startswith("timing/")} == {
        k: v for k, v in expected.items() if not k.startswith("timing/")
    }

    # Other sample-deciding arguments are refused, naming them, and nothing is written.
    before = _files(out)
    assert evaluate.main([*args, "--out", str(out), "--seed", "1", "--temperature", "0.5"]) == 2
    error = capsys.readouterr().err
    assert "holds a resumable evaluation with other arguments" in error and "seed: stored 0, now 1" in error
    assert "'temperature': 1.0" in error and "'temperature': 0.5" in error
    assert before == _files(out)


def test_argument_errors_exit_2_and_write_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    path, _ = checkpoint
    out = tmp_path / "out"
    base = ["--checkpoint", str(path), "--benchmarks", "synthetic", "--n", "4", "--out", str(out)]
    sweep = ["--benchmarks", "synthetic", "--n", "4", "--out", str(out)]
    cases = [
        ([*base, "--engines", "0"], "--engines 0 --tensor-parallel-size 1: both must be >= 1"),
        ([*base, "--engines", "2"], "--engines apply to vLLM engines only; add --engine vllm"),
        ([*base, "--engine", "vllm", "--vllm-arg", "dtype"], "--vllm-arg 'dtype': expected KEY=VALUE"),
        ([*base, "--engine", "vllm", "--vllm-arg", "seed=3"], "--vllm-arg seed: set by evaluate.py itself"),
        ([*base, "--shard-size", "0"], "--shard-size 0: problems per shard must be >= 1"),
        (["--checkpoints", str(tmp_path / "nope-*"), *sweep], "matches no directory"),
        (["--checkpoints", str(path), str(path), *sweep], "named more than once"),
    ]
    for argv, message in cases:
        assert evaluate.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    if importlib.util.find_spec("vllm") is None:  # the base venv
        assert evaluate.main([*base, "--engine", "vllm"]) == 2
        assert f"vLLM is not installed for {sys.executable}; pass --vllm-python" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert evaluate.main([*base, "--engine", "vllm"]) == 2
    assert "start it without torchrun" in capsys.readouterr().err
    assert not out.exists()


def test_sweep_run_ids_name_each_checkpoint_once(tmp_path):
    paths = [
        tmp_path / "sft-a" / "checkpoints" / "step_00000100",
        tmp_path / "sft-a" / "checkpoints" / "step_00000200",
        tmp_path / "x" / "sft-b" / "checkpoints" / "step_00000100",
        tmp_path / "y" / "sft-b" / "checkpoints" / "step_00000100",
        tmp_path / "hf" / "qwen-sft",
    ]
    assert evaluate.run_ids(paths) == [
        "sft-a/step_00000100",
        "sft-a/step_00000200",
        "x/sft-b/step_00000100",
        "y/sft-b/step_00000100",
        "qwen-sft",
    ]


# A stand-in for nemo_quagmire.rollout.vllm_server (the real engines run in the vLLM stage): engines that
# log what is done to them and generate the scripted completions of tests/callbacks/scripted.py. The first
# call of each waits until the other engine is in a call too: the run completes only if they generate at
# the same time.
_FAKE_SERVER = """
import importlib.machinery, json, os, sys, threading, types
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.callbacks.scripted import scripted_generate
EVENTS = Path(os.environ["FAKE_ENGINE_EVENTS"])
lock = threading.Lock()
both_engines = threading.Barrier(2, timeout=120)  # each engine's first call waits for the other's

def log(**event):
    with lock, open(EVENTS, "a") as f:
        f.write(json.dumps(event) + "\\n")

class VLLMServerEngine:
    def __init__(self, hf_dir, *, python=None, devices=None, log_file=None, **kwargs):
        assert (Path(hf_dir) / "config.json").is_file() and list(Path(hf_dir).glob("*.safetensors"))
        self.index = devices[0]
        log(event="start", engine=self.index, hf_dir=str(hf_dir), devices=devices, log_file=str(log_file),
            kwargs=kwargs)
    def generate(self, prompts, group_size, sampling):
        log(event="generate", engine=self.index, thread=threading.current_thread().name)
        if not getattr(self, "called", False):
            self.called = True
            both_engines.wait()
        return scripted_generate(prompts, group_size, sampling)
    def load_checkpoint(self, hf_dir):
        log(event="load_checkpoint", engine=self.index, hf_dir=str(hf_dir))
    def close(self):
        log(event="close", engine=self.index)

module = types.ModuleType("nemo_quagmire.rollout.vllm_server")
module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
module.VLLMServerEngine = VLLMServerEngine
module.server_python = lambda python=None: python or sys.executable
sys.modules[module.__name__] = module
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, megatron_world1) -> list[Path]:
    """Two checkpoints (steps 5 and 7, different weights) of one run holding its tokenizer."""
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.checkpoint import save_checkpoint
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import set_random_seed

    run_dir = tmp_path_factory.mktemp("sweep") / "sft-a"
    CharTokenizer().save(run_dir)
    paths = []
    for step in (5, 7):
        set_random_seed(step)
        paths.append(
            save_checkpoint(
                run_dir / "checkpoints", step, build_model(MODEL, ParallelConfig()), model_cfg=MODEL
            )
        )
    return paths


def test_a_sweep_on_vllm_engines_shares_them_and_writes_the_predictor_table(sweep, tmp_path):
    from nemo_quagmire.predict.table import read_table

    out = tmp_path / "out"
    argv = ["--checkpoints", str(sweep[0].parent / "step_*"), "--engine", "vllm", "--engines", "2"]
    argv += ["--vllm-arg", "dtype=float32", "--benchmarks", "synthetic", "--n", "4", "--num-problems", "6"]
    argv += ["--rows-per-batch", "4", "--max-new-tokens", "16", "--heldout", "synthetic"]
    argv += ["--synthetic-heldout", "8", "--grader-workers", "1", "--out", str(out)]
    fake_vllm = tmp_path / "site" / "vllm" / "__init__.py"  # evaluate.py only asks whether vllm is importable
    fake_vllm.parent.mkdir(parents=True)
    fake_vllm.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAKE_ENGINE_EVENTS": str(tmp_path / "ev")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(fake_vllm.parent.parent)])
    code = _FAKE_SERVER.format(repo=str(REPO)) + _DRIVER.format(repo=str(REPO), script=str(SCRIPT))
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argv), "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    ids = ["sft-a/step_00000005", "sft-a/step_00000007"]
    events = [json.loads(line) for line in (tmp_path / "ev").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert [(e["engine"], e["devices"], e["hf_dir"]) for e in sorted(starts, key=lambda e: e["engine"])] == [
        (i, [i], str(out / ids[0] / "hf"))
        for i in range(2)  # engine i on device i, the export of step 5
    ]
    for start in starts:  # engines start concurrently: in either order
        assert start["log_file"] == str(out / "logs" / f"vllm-engine-{start['engine']}.log")
        assert start["kwargs"] == {"dtype": "float32", "tensor_parallel_size": 1, "seed": 0}
    loads = sorted((e["engine"], e["hf_dir"]) for e in events if e["event"] == "load_checkpoint")
    assert loads == [(i, str(out / ids[1] / "hf")) for i in range(2)]  # step 7 loaded into both engines
    assert sorted(e["engine"] for e in events if e["event"] == "close") == [0, 1]
    generating = [e for e in events if e["event"] == "generate"]
    assert len(generating) == 2 * 6 and {e["engine"] for e in generating} == {0, 1}  # 1 problem per call
    assert len({e["thread"] for e in generating}) == 2  # each engine's calls from a thread of its own

    table = read_table(out / "table.csv", target="post_rl_pass@1")  # as scripts/predict_report.py reads it
    assert (
        table.ids == tuple(ids) and not table.labelled.any()
    )  # every checkpoint a candidate until filled in
    assert list(table.columns) == [
        *(f"maj@{k}" for k in (2, 4)),  # maj@1 is pass@1
        *(f"pass@{k}" for k in (1, 2, 4)),
        "heldout_loss",
        "heldout_loss_seq",
    ]
    for row, run_id in enumerate(ids):
        metrics = json.loads((out / run_id / "metrics.json").read_text())["metrics"]
        assert table.columns["pass@4"][row] == metrics["val/macro/pass@4"]
        assert table.columns["maj@2"][row] == metrics["val/macro/maj@2"]
        assert table.columns["heldout_loss"][row] == metrics["val/heldout_loss/token_mean"]
    assert table.columns["heldout_loss"][0] != table.columns["heldout_loss"][1]  # each its own weights
    assert result.stdout == (out / "table.csv").read_text()
