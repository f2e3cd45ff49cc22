"""scripts/evaluate.py: a checkpoint evaluated in a subprocess gives the held-out loss computed in-process on
the same weights and saves re-gradable samples; bad input exits 2 before any model is built."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_quagmire.callbacks.heldout_loss import HeldOutLossCallback
from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_splits
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.eval.samples import read_samples

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "evaluate.py"

_spec = importlib.util.spec_from_file_location("evaluate", SCRIPT)
evaluate = importlib.util.module_from_spec(_spec)
sys.modules["evaluate"] = evaluate  # its dataclasses look their module up
_spec.loader.exec_module(evaluate)

MODEL = get_model_preset("tiny").replace(vocab_size=28, max_position_embeddings=128, num_layers=2)
HELDOUT = generate_splits(
    SyntheticTaskConfig(), seed=1234, num_sft=0, num_rl=0, num_heldout=8
).heldout_records()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, megatron_world1) -> tuple[Path, float]:
    """A step-5 checkpoint in a run dir holding its tokenizer (and an HF export of the same weights in
    `<run_dir>/hf`), and its held-out loss computed in-process."""
    from nemo_quagmire.megatron.checkpoint import save_checkpoint
    from nemo_quagmire.megatron.hf import export_hf
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.megatron.parallel import ParallelConfig, set_random_seed
    from nemo_quagmire.trainer.run import megatron_policy_handle

    run_dir = tmp_path_factory.mktemp("run")
    set_random_seed(5)
    model = build_model(MODEL, ParallelConfig())
    path = save_checkpoint(run_dir / "checkpoints", 5, model, model_cfg=MODEL)
    export_hf(model, run_dir / "hf", MODEL)
    tokenizer = CharTokenizer()
    tokenizer.save(run_dir)
    handle = megatron_policy_handle(
        model, step=5, run_dir=run_dir, tokenizer=tokenizer, generate=None, micro_batch_size=4
    )
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
