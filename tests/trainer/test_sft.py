"""The SFT trainer end to end on the tiny model in one process: metrics, validation (held-out loss and
Pass@k), checkpoints, exact resume; a GRPO run starting from its checkpoint; and every logged metric
documented in nemo_quagmire/METRICS.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nemo_quagmire.config.sft import SFTRunConfig
from nemo_quagmire.data.batching import EncodedExample, encode_example
from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_splits
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.eval.samples import read_samples
from nemo_quagmire.trainer.build import build_grpo_trainer, build_sft_trainer
from nemo_quagmire.trainer.metrics import read_metrics
from nemo_quagmire.trainer.sft import sft_step
from tests.tiny_model import TEST_MODEL, TEST_MODEL_SECTION
from tests.trainer.test_grpo import Recorder, tiny_run

METRICS_DOC = Path(__file__).resolve().parents[2] / "nemo_quagmire" / "METRICS.md"
NON_DETERMINISTIC = ("time",)


def sft_run(run_dir, **sections) -> SFTRunConfig:
    """4 steps of 16 examples on 2 layers, validating and checkpointing every 2 steps."""
    config = {
        "run_dir": str(run_dir),
        "model": TEST_MODEL_SECTION,
        "optim": {"lr": 2e-3, "weight_decay": 0.0, "use_distributed_optimizer": False},
        "sft": {"global_batch_size": 16, "micro_batch_size": 8, "epochs": 1, "seq_length": 128},
        "data": {"num_sft": 64, "num_heldout": 8},
        "validation": {"interval": 2, "num_problems": 4, "num_samples": 2, "max_new_tokens": 24},
        "checkpoint": {"interval": 2, "keep_last": 2},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return SFTRunConfig.model_validate(config)


def _deterministic(records: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in NON_DETERMINISTIC and not k.startswith("timing/")}
        for r in records
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, megatron_world1):
    """An uninterrupted 4-step run: (run dir, hook events, metrics records)."""
    run_dir = tmp_path_factory.mktemp("sft")
    recorder = Recorder()
    build_sft_trainer(sft_run(run_dir), extra_callbacks=[recorder]).fit()
    return run_dir, recorder.events, read_metrics(run_dir / "metrics.jsonl")


def test_a_run_logs_training_and_both_predictors_and_saves_checkpoints(straight):
    run_dir, events, records = straight
    assert events == [
        "start@0",
        "validation@0",
        "step@1",
        "step@2",
        "validation@2",
        "checkpoint:step_00000002",
        "step@3",
        "step@4",
        "validation@4",
        "checkpoint:step_00000004",
        "end@4",
    ]
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/heldout_loss/token_mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in val] == [0, 2, 4]
    assert [r["train/epoch"] for r in train] == [0.25, 0.5, 0.75, 1.0]  # 64 examples, batches of 16
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert val[-1]["val/heldout_loss/token_mean"] < val[0]["val/heldout_loss/token_mean"]  # it learns
    for record in train:
        assert 0 < record["train/packing_efficiency"] <= 1 and record["train/num_tokens"] > 0
    for record in val:
        assert 0.0 <= record["val/synthetic_arith/pass@1"] <= record["val/synthetic_arith/pass@2"] <= 1.0
        assert record["val/heldout_loss/num_sequences"] == 8
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    samples = read_samples(run_dir / "eval" / "step_00000004" / "samples.parquet")
    assert len(samples) == 4 * 2 and {s.benchmark for s in samples} == {"synthetic_arith"}
    assert {"tokenizer.json", "config.json", "generation_config.json"} <= {
        p.name for p in (run_dir / "model").iterdir()
    }


def test_a_resumed_run_repeats_the_uninterrupted_one(straight, tmp_path):
    _, _, expected = straight
    build_sft_trainer(sft_run(tmp_path, sft={"max_steps": 2})).fit()  # stops after step 2 (checkpointed)
    build_sft_trainer(sft_run(tmp_path)).fit()  # resumes from step 2, runs steps 3 and 4
    assert _deterministic(read_metrics(tmp_path / "metrics.jsonl")) == _deterministic(expected)


def test_validation_at_start_can_be_skipped(tmp_path, megatron_world1):
    recorder = Recorder()
    cfg = sft_run(tmp_path, sft={"max_steps": 2}, validation={"at_start": False})
    build_sft_trainer(cfg, extra_callbacks=[recorder]).fit()
    assert recorder.events[:3] == ["start@0", "step@1", "step@2"] and "validation@2" in recorder.events
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val/macro/pass@1" in r] == [2]


def test_grpo_starts_from_the_sft_checkpoint(straight, tmp_path):
    """The GRPO run's first validation sees the SFT run's last weights: the same held-out loss."""
    run_dir, _, sft_records = straight
    cfg = tiny_run(
        tmp_path,
        max_steps=1,
        sft_warmup={"steps": 0},
        data={"num_heldout": 8},
        checkpoint={"load_from": str(run_dir / "checkpoints" / "step_00000004")},
    )
    build_grpo_trainer(cfg).fit()
    grpo_records = read_metrics(tmp_path / "metrics.jsonl")
    sft_final = sft_records[-1]["val/heldout_loss/token_mean"]
    assert grpo_records[0]["step"] == 0
    assert grpo_records[0]["val/heldout_loss/token_mean"] == pytest.approx(sft_final, rel=1e-6)
    assert "train/reward_mean" in grpo_records[1]
    _assert_documented(sft_records + grpo_records)
    # The predictor report follows run_info.json from the GRPO run back to the SFT checkpoint it started from.
    from nemo_quagmire.predict.runs import table_from_runs

    table = table_from_runs([run_dir], [tmp_path], rl_metric="val/macro/pass@1")
    assert list(table.ids) == [f"{run_dir.name}@4"]
    final_pass1 = [r for r in grpo_records if "val/macro/pass@1" in r][-1]["val/macro/pass@1"]
    assert table.target[0] == pytest.approx(final_pass1)


def _assert_documented(records: list[dict]) -> None:
    """Every metric name the runs logged appears in METRICS.md (benchmarks as <bench>, ks as <k>)."""
    documented = set(re.findall(r"`([a-z_]+/[^`]+)`", METRICS_DOC.read_text()))
    logged = {name for record in records for name in record if name not in ("step", "time")}
    generic = {
        re.sub(r"@\d+", "@<k>", re.sub(r"^val/(?!macro/|heldout_loss/)[^/]+/", "val/<bench>/", name))
        for name in logged
    }
    assert "val/<bench>/pass@<k>" in generic and "train/reward_mean" in generic and "train/epoch" in generic
    assert not generic - documented, f"not in {METRICS_DOC.name}: {sorted(generic - documented)}"


def test_too_few_examples_and_unmaskable_packing_are_refused(tmp_path, megatron_world1, monkeypatch):
    with pytest.raises(ValueError, match="64 usable SFT examples are fewer than one global batch"):
        build_sft_trainer(sft_run(tmp_path, sft={"global_batch_size": 128}))
    from nemo_quagmire.megatron.policy import MegatronPolicy

    monkeypatch.setattr(MegatronPolicy, "honours_attention_masks", False)  # as with TE attention
    with pytest.raises(ValueError, match="Transformer Engine.*use sft.packing=buckets"):
        build_sft_trainer(sft_run(tmp_path, validation={"benchmarks": []})).fit()


# ---------------------------------------------------------------- one SFT step, whatever the packing
TOKENIZER = CharTokenizer()


@pytest.fixture(scope="module")
def examples() -> list[EncodedExample]:
    splits = generate_splits(SyntheticTaskConfig(), seed=0, num_sft=12, num_rl=0, num_heldout=0)
    return [encode_example(r, TOKENIZER) for r in splits.sft_records()]


def _step(examples, packing, drop_segments=False):
    from nemo_quagmire.config.optim import OptimConfig
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.policy import MegatronPolicy

    policy = MegatronPolicy(TEST_MODEL, ParallelConfig(), seed=1234)  # the same initial weights every time
    # A clip norm that never clips: grad_norm is reported, the gradient left as it is.
    policy.attach_optimizer(OptimConfig(lr=1e-3, clip_grad=1e9))
    if drop_segments:  # what packing without the attention mask would compute
        import nemo_quagmire.trainer.sft as sft_module

        original = sft_module.row_micro_batches

        def without_segments(*args, **kwargs):
            return [{k: v for k, v in mb.items() if k != "segment_ids"} for mb in original(*args, **kwargs)]

        sft_module.row_micro_batches = without_segments
        try:
            metrics = sft_step(policy, examples, packing=packing, capacity=128, micro_batch_size=4, pad_id=0)
        finally:
            sft_module.row_micro_batches = original
    else:
        metrics = sft_step(
            policy,
            examples,
            packing=packing,
            capacity=128,
            micro_batch_size=4,
            pad_id=0,
            uniform_width=False,
        )
    gradient = torch.cat([p.main_grad.flatten() for p in policy.chunks[0].parameters()])  # megatron DDP's
    return metrics, gradient


def test_packed_buckets_and_padded_steps_are_the_same_step(megatron_world1, examples):
    padded, padded_gradient = _step(examples, "none")
    for packing in ("packed", "buckets"):
        metrics, gradient = _step(examples, packing)
        assert metrics["loss"] == pytest.approx(padded["loss"], rel=2e-6)
        assert metrics["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)
        assert (
            metrics["num_tokens"] == padded["num_tokens"] == sum(len(e) - e.prompt_length for e in examples)
        )
        torch.testing.assert_close(gradient, padded_gradient, atol=1e-6, rtol=1e-4)
    packed, _ = _step(examples, "packed")
    assert packed["slots"] >= packed["tokens"]
    assert packed["tokens"] == padded["tokens"] == sum(len(e) for e in examples)
    # Without the per-example mask, later examples of a row would attend to earlier ones: another loss.
    leaky, _ = _step(examples, "packed", drop_segments=True)
    assert abs(leaky["loss"] - padded["loss"]) > 1e-3
