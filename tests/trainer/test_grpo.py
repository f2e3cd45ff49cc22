"""The GRPO loop end to end on the tiny model in one process: stages, metrics, checkpoints, callbacks,
non-finite handling. (Exact resume after SIGKILL is tested on the real entry point in
tests/scripts/test_train_grpo.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.trainer.build import build_grpo_trainer
from nemo_quagmire.trainer.callbacks import Callback
from nemo_quagmire.trainer.grpo import NonFiniteLossError
from nemo_quagmire.trainer.metrics import read_metrics
from tests.tiny_model import TEST_MODEL_SECTION


def tiny_run(run_dir, **sections) -> GRPORunConfig:
    """A run small enough for a unit test: 2 layers, 4 prompts x 4 samples, short completions."""
    config = {
        "run_dir": str(run_dir),
        "max_steps": 2,
        "model": TEST_MODEL_SECTION,
        "optim": {"lr": 5e-5, "use_distributed_optimizer": False},
        "grpo": {"prompts_per_step": 4, "group_size": 4, "micro_batch_size": 16},
        "rollout": {"max_new_tokens": 24, "max_prompt_tokens": 16},
        "data": {"num_sft": 64, "num_rl": 16, "num_heldout": 8},
        "sft_warmup": {"steps": 2, "batch_size": 8},
        "validation": {"interval": 1, "num_problems": 4, "num_samples": 2},
        "checkpoint": {"interval": 1, "keep_last": 1},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return GRPORunConfig.model_validate(config)


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_train_start(self, handle):
        self.events.append(f"start@{handle.step}")

    def on_validation(self, handle):
        self.events.append(f"validation@{handle.step}")
        return {}

    def on_step_end(self, handle, metrics):
        self.events.append(f"step@{handle.step}")

    def on_checkpoint(self, handle, path):
        self.events.append(f"checkpoint:{path.name}")

    def on_train_end(self, handle):
        self.events.append(f"end@{handle.step}")


def test_two_steps_log_bounded_metrics_save_checkpoints_and_call_every_hook(tmp_path, megatron_world1):
    recorder = Recorder()
    trainer = build_grpo_trainer(tiny_run(tmp_path), extra_callbacks=[recorder])
    last = trainer.fit()

    assert recorder.events == [
        "start@0",
        "validation@0",
        "step@1",
        "validation@1",
        "checkpoint:step_00000001",
        "step@2",
        "validation@2",
        "checkpoint:step_00000002",
        "end@2",
    ]
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if "train/reward_mean" in r]
    val = [r for r in records if "val/macro/pass@1" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in val] == [0, 1, 2]
    for record in train:
        assert 0.0 <= record["train/reward_mean"] <= 1.0
        assert 0 < record["train/response_length"] <= 24
        assert record["train/num_tokens"] > 0 and record["train/update_successful"] == 1.0
        assert record["train/ratio_mean"] == pytest.approx(1.0)  # on-policy: one update per rollout
        stages = {k for k in record if k.startswith("timing/")}
        assert {"timing/generate", "timing/reward", "timing/train", "timing/step"} <= stages
    for record in val:
        assert 0.0 <= record["val/synthetic_arith/pass@1"] <= record["val/synthetic_arith/pass@2"] <= 1.0
        assert record["val/macro/pass@2"] == record["val/synthetic_arith/pass@2"]
    assert last["train/lr"] == pytest.approx(5e-5)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002"]  # keep_last=1 pruned step 1
    assert (tmp_path / "sft_warmup" / "step_00000002").is_dir()


def test_non_finite_steps_are_skipped_then_abort(tmp_path, megatron_world1, monkeypatch, caplog):
    import nemo_quagmire.megatron.train_step as train_step_module

    def nan_step(trainer, micro_batches, loss_fn, *, temperature=1.0, variable_shapes=False):
        return {"loss": math.nan, "grad_norm": math.nan, "lr": 0.0, "update_successful": 0.0}

    monkeypatch.setattr(train_step_module, "train_step", nan_step)
    cfg = tiny_run(
        tmp_path,
        max_steps=5,
        sft_warmup={"steps": 0},
        grpo={"max_consecutive_nonfinite": 2},
        validation={"interval": 100},
    )
    trainer = build_grpo_trainer(cfg)
    with pytest.raises(NonFiniteLossError, match="2 steps in a row.*max_consecutive_nonfinite=2"):
        trainer.fit()
    assert "non-finite loss or gradient (1 in a row); the update was skipped" in caplog.text
    assert trainer.step == 1  # step 1 was skipped and counted; step 2 aborted


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    cfg = tiny_run(tmp_path, model={"preset": "tiny", "vocab_size": 16, "max_position_embeddings": 128})
    with pytest.raises(ValueError, match="model.vocab_size=16 .* set model.vocab_size=28"):
        build_grpo_trainer(cfg)


def _one_policy_update(run_dir, packing: str, loss_agg: str, batch: dict):
    """One GRPO policy update of a fresh tiny model (same seed, same initial weights) on a fixed batch;
    the update's metrics and the gradient it applied."""
    from nemo_quagmire.megatron.train_step import train_step

    cfg = tiny_run(
        run_dir,
        sft_warmup={"steps": 0},
        grpo={"packing": packing, "micro_batch_size": 2, "loss_agg": loss_agg},
        optim={"clip_grad": 1e9},  # never clips: the reported gradient is the computed one
    )
    trainer = build_grpo_trainer(cfg)
    trainer._setup()
    try:
        metrics = trainer._policy_updates(
            batch["tokens"],
            batch["lengths"],
            batch["mask"],
            batch["advantages"],
            batch["truncated"],
            {},
            train_step,
        )
        gradient = torch.cat([p.main_grad.flatten() for p in trainer.trainer.model[0].parameters()])
    finally:
        trainer._close()
    return metrics, gradient


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_packed_policy_update_is_the_padded_update(tmp_path, megatron_world1, loss_agg):
    # Lengths 30 | 30 | 20 + 9 | 18 + 12 | 7 + 5 at row capacity 30, two rows per micro-batch: one micro-batch
    # of single-sequence rows (no mask) and two with packed rows (masked). Prompts are 4 tokens.
    lengths = torch.tensor([20, 7, 30, 9, 12, 30, 5, 18])
    positions = torch.arange(30)
    tokens = torch.randint(3, 28, (8, 30), generator=torch.Generator().manual_seed(0))
    tokens[positions >= lengths[:, None]] = 0
    batch = {
        "tokens": tokens,
        "lengths": lengths,
        "mask": (positions >= 4) & (positions < lengths[:, None]),
        "advantages": torch.randn(8, generator=torch.Generator().manual_seed(1)),
        "truncated": torch.zeros(8, dtype=torch.bool),
    }
    padded, padded_gradient = _one_policy_update(tmp_path / "none", "none", loss_agg, batch)
    packed, packed_gradient = _one_policy_update(tmp_path / "packed", "packed", loss_agg, batch)

    # 131 real tokens: padded in 8 rows of 30 = 240 slots; packed in micro-batches of 2 x 30 + 2 x 30 + 1 x 12
    assert padded["train/packing_efficiency"] == pytest.approx(131 / 240)
    assert packed["train/packing_efficiency"] == pytest.approx(131 / 132)
    assert packed["train/loss"] == pytest.approx(padded["train/loss"], rel=1e-5, abs=1e-7)
    assert packed["train/grad_norm"] == pytest.approx(padded["train/grad_norm"], rel=1e-5)
    assert padded_gradient.abs().max() > 1e-3  # a real update, not two zero gradients
    torch.testing.assert_close(packed_gradient, padded_gradient, atol=1e-6, rtol=1e-4)


def test_packed_micro_batches_put_single_sequence_rows_first_without_a_mask():
    from nemo_quagmire.trainer.grpo import _packed_micro_batches

    lengths = torch.tensor([20, 7, 30, 9, 12, 30, 5, 18])
    tokens = torch.arange(8)[:, None].expand(8, 30) + 1  # row i holds token i + 1
    fields = {"tokens": tokens, "mask": torch.ones(8, 30, dtype=torch.bool), "advantages": torch.arange(8.0)}
    micro = _packed_micro_batches(fields, lengths, 2, pad_id=0)

    assert [mb["tokens"].shape for mb in micro] == [(2, 30), (2, 30), (1, 12)]
    assert ["segment_ids" in mb for mb in micro] == [False, True, True]
    # Sequences 2 and 5 (length 30) alone; then 0 + 3 and 7 + 4 (20 + 9, 18 + 12); then 1 + 6 (7 + 5).
    assert [mb["advantages"].tolist() for mb in micro] == [[2.0, 5.0], [0.0, 3.0, 7.0, 4.0], [1.0, 6.0]]
    for mb in micro:
        unpacked = mb["tokens"].flatten()[mb["unpack"]]  # one sequence per row again
        assert torch.equal(unpacked[:, 0] - 1, mb["advantages"].long())
        assert mb["mask"].shape == mb["unpack"].shape
