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
from nemo_quagmire.trainer.metrics import read_metrics
from nemo_quagmire.trainer.run import NonFiniteLossError
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
        assert record["train/ratio_max"] == 1.0  # a max over the tokens, not a sum over micro-batches
        assert 0 < record["train/entropy"] < math.log(28)  # below the uniform distribution's over 28 tokens
        stages = {k for k in record if k.startswith("timing/")}
        assert {"timing/generate", "timing/reward", "timing/train", "timing/step"} <= stages
    for record in val:
        assert 0.0 <= record["val/synthetic_arith/pass@1"] <= record["val/synthetic_arith/pass@2"] <= 1.0
        assert record["val/macro/pass@2"] == record["val/synthetic_arith/pass@2"]
    assert last["train/lr"] == pytest.approx(5e-5)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002"]  # keep_last=1 pruned step 1
    # The warm-up is an SFT run of its own, with its checkpoint and metrics.
    assert (tmp_path / "sft_warmup" / "checkpoints" / "step_00000002").is_dir()
    warmup = read_metrics(tmp_path / "sft_warmup" / "metrics.jsonl")
    assert [r["step"] for r in warmup] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in warmup)


def test_non_finite_steps_are_skipped_then_abort(tmp_path, megatron_world1, monkeypatch, caplog):
    from nemo_quagmire.megatron.policy import MegatronPolicy

    def nan_update(
        self, micro_batches, loss_fn, *, temperature=1.0, variable_shapes=False, with_entropy=False
    ):
        return {"loss": math.nan, "grad_norm": math.nan, "lr": 0.0, "update_successful": 0.0}

    monkeypatch.setattr(MegatronPolicy, "train", nan_update)
    cfg = tiny_run(
        tmp_path,
        max_steps=5,
        sft_warmup={"steps": 0},
        optim={"max_consecutive_nonfinite": 2},
        validation={"interval": 100},
    )
    trainer = build_grpo_trainer(cfg)
    with pytest.raises(NonFiniteLossError, match="2 steps in a row.*max_consecutive_nonfinite=2"):
        trainer.fit()
    assert "non-finite loss or gradient in 1 of 1 updates, skipped (1 steps in a row" in caplog.text
    assert trainer.step == 2  # both steps were skipped, counted and logged; the second one stopped the run
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/update_successful" in r]
    assert [(r["step"], r["train/update_successful"]) for r in logged] == [(1, 0.0), (2, 0.0)]


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    cfg = tiny_run(tmp_path, model={"preset": "tiny", "vocab_size": 16, "max_position_embeddings": 128})
    with pytest.raises(ValueError, match="model.vocab_size=16 .* set model.vocab_size=28"):
        build_grpo_trainer(cfg)


def _one_policy_update(run_dir, packing: str, loss_agg: str, batch: dict):
    """One GRPO policy update of a fresh tiny model (same seed, same initial weights) on a fixed batch;
    the update's metrics and the gradient it applied."""
    cfg = tiny_run(
        run_dir,
        sft_warmup={"steps": 0},
        grpo={"packing": packing, "micro_batch_size": 2, "loss_agg": loss_agg},
        optim={"clip_grad": 1e9},  # never clips: the reported gradient is the computed one
    )
    trainer = build_grpo_trainer(cfg)
    trainer._setup()
    try:
        metrics, _, _ = trainer._policy_updates(
            batch["tokens"],
            batch["lengths"],
            batch["mask"],
            batch["advantages"],
            batch["truncated"],
            {},
        )
        gradient = torch.cat([p.main_grad.flatten() for p in trainer.policy.chunks[0].parameters()])
    finally:
        trainer._close()
    return metrics, gradient


def _fixed_batch() -> dict:
    """8 rollout rows of lengths 20, 7, 30, 9, 12, 30, 5, 18 (prompts of 4 tokens), random advantages."""
    lengths = torch.tensor([20, 7, 30, 9, 12, 30, 5, 18])
    positions = torch.arange(30)
    tokens = torch.randint(3, 28, (8, 30), generator=torch.Generator().manual_seed(0))
    tokens[positions >= lengths[:, None]] = 0
    return {
        "tokens": tokens,
        "lengths": lengths,
        "mask": (positions >= 4) & (positions < lengths[:, None]),
        "advantages": torch.randn(8, generator=torch.Generator().manual_seed(1)),
        "truncated": torch.zeros(8, dtype=torch.bool),
    }


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_packed_policy_update_is_the_padded_update(tmp_path, megatron_world1, loss_agg):
    # Lengths 30 | 30 | 20 + 9 | 18 + 12 | 7 + 5 at row capacity 30, two rows per micro-batch: one micro-batch
    # of single-sequence rows (no mask) and two with packed rows (masked).
    batch = _fixed_batch()
    padded, padded_gradient = _one_policy_update(tmp_path / "none", "none", loss_agg, batch)
    packed, packed_gradient = _one_policy_update(tmp_path / "packed", "packed", loss_agg, batch)

    # 131 real tokens: padded in 8 rows of 30 = 240 slots; packed in micro-batches of 2 x 30 + 2 x 30 + 1 x 12
    assert padded["train/packing_efficiency"] == pytest.approx(131 / 240)
    assert packed["train/packing_efficiency"] == pytest.approx(131 / 132)
    assert packed["train/loss"] == pytest.approx(padded["train/loss"], rel=1e-5, abs=1e-7)
    assert packed["train/grad_norm"] == pytest.approx(padded["train/grad_norm"], rel=1e-5)
    # The entropy the loss gets is unpacked like the log-probs: the same token mean either way.
    assert 0 < packed["train/entropy"] == pytest.approx(padded["train/entropy"], rel=1e-5)
    assert padded_gradient.abs().max() > 1e-3  # a real update, not two zero gradients
    torch.testing.assert_close(packed_gradient, padded_gradient, atol=1e-6, rtol=1e-4)


def test_minibatch_updates_average_their_means_and_max_their_maxima(tmp_path, megatron_world1):
    import nemo_quagmire.megatron.policy as policy_module

    cfg = tiny_run(
        tmp_path,
        sft_warmup={"steps": 0},
        grpo={"num_minibatches": 2, "micro_batch_size": 2},
        optim={"lr": 1e-2},
    )
    trainer = build_grpo_trainer(cfg)
    trainer._setup()
    per_update: list[dict[str, float]] = []

    real_train_step = policy_module.train_step

    def recording_train_step(*args, **kwargs):
        per_update.append(real_train_step(*args, **kwargs))
        return per_update[-1]

    batch = _fixed_batch()
    try:
        old = trainer._logprobs(trainer.policy, batch["tokens"], batch["lengths"])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(policy_module, "train_step", recording_train_step)
            metrics, attempted, skipped = trainer._policy_updates(
                *(batch[k] for k in ("tokens", "lengths", "mask", "advantages", "truncated")),
                {"old_logprobs": old},
            )
    finally:
        trainer._close()
    assert (attempted, skipped) == (2, 0) and metrics["train/update_successful"] == 1.0

    first, second = per_update
    assert first["ratio_max"] == pytest.approx(1.0, abs=1e-5)  # nothing has changed the policy yet
    assert second["ratio_max"] > 1.01 and second["approx_kl"] > 0  # the first update moved it
    assert metrics["train/ratio_max"] == second["ratio_max"]  # the step's max, not a sum or a mean
    for name in ("approx_kl", "ratio_mean", "entropy", "clip_frac_high", "loss", "num_tokens"):
        assert metrics[f"train/{name}"] == (first[name] + second[name]) / 2, name


def test_a_warm_up_with_too_few_examples_is_refused_when_the_trainer_is_built(tmp_path):
    """Before any model exists: the warm-up's SFT trainer checks its examples in the GRPO trainer's build."""
    cfg = tiny_run(tmp_path, sft_warmup={"steps": 2, "batch_size": 128})  # data.num_sft is 64
    with pytest.raises(ValueError, match="64 usable SFT examples are fewer than one global batch"):
        build_grpo_trainer(cfg)
    assert not (tmp_path / "sft_warmup").exists()
