"""The GRPO loop: prompts -> G completions each -> rewards -> advantages -> policy updates -> metrics.

Each step is a short sequence of named, timed stages (`generate`, `reward`, `logprobs`, `train`,
`weight_sync`); the math lives in `nemo_quagmire.algorithms` and the engine in `nemo_quagmire.megatron`, so
this file only orchestrates. Rollouts come from a `RolloutEngine` (in-process on the policy by default, vLLM
in production), rewards from the project's grader, and validation from callbacks that see the policy through
a `PolicyHandle`.

Exact resume: everything random in a step is seeded from (seed, step) — the prompts drawn, the sampling
generator — and model, optimizer, scheduler and RNG states are checkpointed, so a run resumed from step s
repeats steps s+1, s+2, ... of the uninterrupted run bit for bit on CPU, and metrics.jsonl ends up the same.

Data parallel: prompts are split over data-parallel ranks by whole groups (advantages need a complete group on
one rank); token and sequence counts for the loss normalizers are summed over all ranks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_quagmire.algorithms.advantages import compute_advantages, group_has_signal
from nemo_quagmire.algorithms.losses import count_valid, policy_loss
from nemo_quagmire.config.grpo import GRPOConfig, GRPORunConfig
from nemo_quagmire.megatron.parallel import (
    all_gather_objects_data_parallel,
    all_reduce_sum_data_parallel,
    data_parallel_rank_and_size,
)
from nemo_quagmire.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, CallbackList, PolicyHandle, Tokenizer
from nemo_quagmire.trainer.metrics import MetricsLogger, StageTimer
from nemo_quagmire.trainer.sft_steps import encode_examples, nll_loss, sft_micro_batches
from nemo_quagmire.utils.logging import get_logger, global_rank

logger = get_logger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
# Metrics of policy_loss that are means over valid tokens (combined across micro-batches by token weight).
_TOKEN_MEAN_METRICS = frozenset(
    {
        "clip_frac_low",
        "clip_frac_high",
        "dual_clip_frac",
        "approx_kl",
        "ratio_mean",
        "kl",
        "entropy",
        "tis_weight_mean",
    }
)
SFT_WARMUP_SUBDIR = "sft_warmup"


@dataclass(frozen=True)
class Prompt:
    """One RL prompt: its id, token ids and gold answer."""

    id: str
    token_ids: tuple[int, ...]
    answer: str


class NonFiniteLossError(RuntimeError):
    """Raised after `grpo.max_consecutive_nonfinite` steps in a row with a NaN/Inf loss."""


class GRPOTrainer:
    """GRPO on the Megatron engine. Build with `GRPOTrainer(cfg, ...)`, run with `fit()`.

    Args:
        cfg: the validated run config.
        prompts: the RL prompts (all of them; each DP rank draws its share per step).
        tokenizer: encodes prompts, decodes completions.
        sft_examples: `{"prompt", "response"}` pairs for the SFT warm-up (used when
            `cfg.sft_warmup.steps > 0` and no warm-up checkpoint exists yet).
        callbacks: validation and monitoring hooks.
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
        if tokenizer.pad_id >= cfg.model.vocab_size or tokenizer.eos_id >= cfg.model.vocab_size:
            raise ValueError(
                f"the tokenizer's special ids (pad {tokenizer.pad_id}, eos {tokenizer.eos_id}) do not fit "
                f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size to the tokenizer's vocab size"
            )
        self.cfg = cfg
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.sft_examples = list(sft_examples)
        self.callbacks = CallbackList(callbacks)
        self.run_dir = Path(cfg.run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINT_SUBDIR
        self.step = 0
        self._nonfinite_in_a_row = 0

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> int | None:
        """Build model, optimizer, engine, grader and logger; returns the step resumed from (or None)."""
        from nemo_quagmire.megatron.checkpoint import latest_checkpoint, load_checkpoint
        from nemo_quagmire.megatron.model import build_model
        from nemo_quagmire.megatron.train_step import setup_training
        from nemo_quagmire.rewards.math_grader import MathGrader

        cfg = self.cfg
        resume_from = latest_checkpoint(self.checkpoint_dir) if cfg.checkpoint.resume == "auto" else None
        model = build_model(cfg.model, cfg.parallel)
        if resume_from is None:
            self._initial_weights(model)
        self.trainer = setup_training(model, cfg.optim)
        resumed_step = None
        if resume_from is not None:
            state = load_checkpoint(
                resume_from,
                self.trainer.model,
                model_cfg=cfg.model,
                optimizer=self.trainer.optimizer,
                scheduler=self.trainer.scheduler,
            )
            resumed_step = self.step = int(state["step"])
            self._nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
            logger.info("resumed from %s (step %d)", resume_from, self.step)
        self.reference = self._reference_model() if cfg.grpo.kl_coef > 0 else None
        self.engine = self._rollout_engine()
        self.grader = MathGrader(num_workers=1)
        return resumed_step

    def _initial_weights(self, model: list[torch.nn.Module]) -> None:
        """SFT warm-up result, an HF checkpoint, or the random initialisation (in that order)."""
        from nemo_quagmire.megatron.checkpoint import load_checkpoint

        if self.cfg.checkpoint.load_from is not None:
            from nemo_quagmire.megatron.hf import load_hf_weights

            load_hf_weights(model, self.cfg.checkpoint.load_from, self.cfg.model)
            logger.info("initial weights from %s", self.cfg.checkpoint.load_from)
        if self.cfg.sft_warmup.steps > 0:
            warmup = self._sft_warmup(model)
            load_checkpoint(warmup, model, model_cfg=self.cfg.model, restore_rng=False)

    def _sft_warmup(self, model: list[torch.nn.Module]) -> Path:
        """Run the SFT warm-up once (its checkpoint is reused by later runs and resumes)."""
        from nemo_quagmire.megatron.checkpoint import latest_checkpoint, save_checkpoint
        from nemo_quagmire.megatron.model import build_model
        from nemo_quagmire.megatron.train_step import OptimConfig, setup_training, train_step

        directory = self.run_dir / SFT_WARMUP_SUBDIR
        done = latest_checkpoint(directory)
        if done is not None:
            return done
        warm = self.cfg.sft_warmup
        if not self.sft_examples:
            raise ValueError("sft_warmup.steps > 0 but there are no SFT examples (data.num_sft)")
        warm_model = build_model(self.cfg.model, self.cfg.parallel)
        for target, source in zip(warm_model, model, strict=True):
            target.load_state_dict(source.state_dict())
        trainer = setup_training(warm_model, OptimConfig(lr=warm.lr, weight_decay=0.0, lr_warmup_steps=10))
        rng = random.Random(self.cfg.seed)
        dp_rank, dp_size = data_parallel_rank_and_size()
        progress = _progress(warm.steps, "SFT warm-up", self.cfg.logging.progress_bar)
        for step in range(warm.steps):
            batch = rng.sample(self.sft_examples, warm.batch_size)[dp_rank::dp_size]
            tokens, _, loss_mask = encode_examples(batch, self.tokenizer)
            global_tokens = all_reduce_sum_data_parallel(loss_mask.sum())
            micro = sft_micro_batches(tokens, loss_mask, self.cfg.grpo.micro_batch_size, global_tokens)
            metrics = train_step(trainer, micro, nll_loss)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            if step % 50 == 0 or step == warm.steps - 1:
                logger.info("SFT warm-up step %d/%d: loss %.4f", step + 1, warm.steps, metrics["loss"])
        if progress is not None:
            progress.close()
        return save_checkpoint(directory, warm.steps, trainer.model, model_cfg=self.cfg.model)

    def _reference_model(self) -> list[torch.nn.Module]:
        """A frozen copy of the initial policy for the KL penalty."""
        from nemo_quagmire.megatron.model import build_model

        reference = build_model(self.cfg.model, self.cfg.parallel)
        for target, source in zip(reference, self.trainer.model, strict=True):
            target.load_state_dict(source.module.state_dict())
            target.requires_grad_(False)
        return reference

    def _rollout_engine(self) -> RolloutEngine:
        rollout = self.cfg.rollout
        if rollout.engine == "megatron":
            from nemo_quagmire.megatron.rollout_engine import MegatronRolloutEngine

            return MegatronRolloutEngine(
                self.trainer.model,
                self.cfg.model,
                pad_id=self.tokenizer.pad_id,
                eos_id=self.tokenizer.eos_id,
                seed=self.cfg.seed,
            )
        from nemo_quagmire.megatron.hf import export_hf
        from nemo_quagmire.rollout.vllm_engine import VLLMRolloutEngine

        hf_dir = self.run_dir / "rollout_weights"
        export_hf(self.trainer.model, hf_dir, self.cfg.model)
        vllm = rollout.vllm
        return VLLMRolloutEngine(
            hf_dir,
            tensor_parallel_size=vllm.tensor_parallel_size,
            gpu_memory_utilization=vllm.gpu_memory_utilization,
            dtype=vllm.dtype,
            seed=self.cfg.seed,
            enforce_eager=vllm.enforce_eager,
            colocated=vllm.colocated,
        )

    # ------------------------------------------------------------------ policy view for callbacks
    def policy_handle(self) -> PolicyHandle:
        from nemo_quagmire.megatron.logprobs import compute_logprobs

        dp_rank, dp_size = data_parallel_rank_and_size()

        def logprobs(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return compute_logprobs(
                self.trainer.model, tokens, lengths, micro_batch_size=self.cfg.grpo.micro_batch_size
            ).logprobs

        return PolicyHandle(
            step=self.step,
            run_dir=self.run_dir,
            tokenizer=self.tokenizer,
            logprobs=logprobs,
            generate=self.engine.generate,
            all_reduce_sum=all_reduce_sum_data_parallel,
            all_gather_objects=all_gather_objects_data_parallel,
            data_parallel_rank=dp_rank,
            data_parallel_size=dp_size,
        )

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, float]:
        """Train to `max_steps` (resuming if a checkpoint exists); returns the last step's metrics."""
        resumed_step = self._setup()
        cfg = self.cfg
        self.metrics_logger = MetricsLogger(
            self.run_dir,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            mlflow=cfg.logging.mlflow,
            resume_step=resumed_step,
        )
        last: dict[str, float] = {}
        try:
            self.callbacks.on_train_start(self.policy_handle())
            if resumed_step is None:
                self._validate()
            progress = _progress(cfg.max_steps, "GRPO", cfg.logging.progress_bar, initial=self.step)
            while self.step < cfg.max_steps:
                last = self.train_one_step()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        reward=f"{last['train/reward_mean']:.3f}",
                        step_s=f"{last['timing/step']:.2f}",
                        tok_s=f"{last['train/tokens_per_s']:.0f}",
                    )
                final = self.step == cfg.max_steps
                if self.step % cfg.validation.interval == 0 or final:
                    self._validate()
                if self.step % cfg.checkpoint.interval == 0 or final:
                    self._save()
            if progress is not None:
                progress.close()
        finally:
            self.callbacks.on_train_end(self.policy_handle())
            self.metrics_logger.close()
            self.grader.close()
            self.engine.close()
        return last

    def _validate(self) -> None:
        metrics = self.callbacks.on_validation(self.policy_handle())
        if metrics:
            self.metrics_logger.log(self.step, metrics)
            headline = {k: v for k, v in metrics.items() if k.startswith("val/macro/") or "heldout" in k}
            logger.info(
                "validation at step %d: %s",
                self.step,
                ", ".join(f"{k.removeprefix('val/')}={v:.4f}" for k, v in sorted(headline.items())),
            )

    def _save(self) -> None:
        from nemo_quagmire.megatron.checkpoint import save_checkpoint

        path = save_checkpoint(
            self.checkpoint_dir,
            self.step,
            self.trainer.model,
            model_cfg=self.cfg.model,
            optimizer=self.trainer.optimizer,
            scheduler=self.trainer.scheduler,
            client_state={"step": self.step, "nonfinite_in_a_row": self._nonfinite_in_a_row},
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.callbacks.on_checkpoint(self.policy_handle(), path)

    def _step_prompts(self) -> list[Prompt]:
        """This DP rank's prompts for the step: a draw seeded by (seed, step), whole groups per rank."""
        per_step = self.cfg.grpo.prompts_per_step
        dp_rank, dp_size = data_parallel_rank_and_size()
        if per_step % dp_size:
            raise ValueError(
                f"grpo.prompts_per_step={per_step} must be divisible by the data-parallel size {dp_size}"
            )
        rng = random.Random(f"{self.cfg.seed}/prompts/{self.step}")
        chosen = rng.sample(range(len(self.prompts)), min(per_step, len(self.prompts)))
        return [self.prompts[i] for i in chosen[dp_rank::dp_size]]

    def train_one_step(self) -> dict[str, float]:
        """One GRPO step (collective); returns its metrics (also logged and passed to callbacks)."""
        from nemo_quagmire.megatron.train_step import train_step
        from nemo_quagmire.rewards.reward import math_reward

        cfg, grpo = self.cfg, self.cfg.grpo
        timer = StageTimer()
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

        metrics = self._rollout_metrics(batch, rewards, correct)
        rows_kept = torch.arange(len(rows)) if keep is None else keep.nonzero().flatten()
        metrics["train/kept_fraction"] = rows_kept.numel() / max(len(rows), 1)

        update: dict[str, float] = {}
        if all_reduce_sum_data_parallel(torch.tensor(float(rows_kept.numel()))).item() > 0:
            tokens, lengths = batch.tokens[rows_kept], batch.lengths[rows_kept]
            mask = batch.completion_mask[rows_kept]
            extra: dict[str, torch.Tensor] = {}
            with timer.stage("logprobs"):
                if grpo.num_minibatches > 1 or not self.engine.shares_policy_weights:
                    extra["old_logprobs"] = self._logprobs(self.trainer.model, tokens, lengths)
                if self.reference is not None:
                    extra["ref_logprobs"] = self._logprobs(self.reference, tokens, lengths)
                if grpo.tis_cap is not None:
                    extra["rollout_logprobs"] = batch.logprobs[rows_kept]
            with timer.stage("train"):
                update = self._policy_updates(
                    tokens, mask, advantages[rows_kept], batch.truncated[rows_kept], extra, train_step
                )
        else:
            logger.warning("step %d: every group has equal rewards; no update", self.step + 1)

        if not self.engine.shares_policy_weights:
            with timer.stage("weight_sync"):
                from nemo_quagmire.megatron.hf import iter_hf_weights

                self.engine.update_weights(iter_hf_weights(self.trainer.model, cfg.model))

        self.step += 1
        metrics |= update
        metrics |= timer.metrics()
        generated = int(batch.completion_mask.sum())
        metrics["train/tokens_per_s"] = generated / max(metrics["timing/step"], 1e-9)
        self.metrics_logger.log(self.step, metrics)
        self.callbacks.on_step_end(self.policy_handle(), metrics)
        return metrics

    def _logprobs(self, model: Sequence[torch.nn.Module], tokens: torch.Tensor, lengths: torch.Tensor):
        from nemo_quagmire.megatron.logprobs import compute_logprobs

        return compute_logprobs(
            model,
            tokens,
            lengths,
            micro_batch_size=self.cfg.grpo.micro_batch_size,
            temperature=self.cfg.rollout.temperature,
        ).logprobs

    def _policy_updates(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        truncated: torch.Tensor,
        extra: dict[str, torch.Tensor],
        train_step: Any,
    ) -> dict[str, float]:
        """`num_minibatches` optimizer steps over the rollout rows; skips non-finite steps."""
        grpo = self.cfg.grpo
        rows = torch.arange(tokens.shape[0])
        summed: dict[str, float] = {}
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
            micro = _split_micro_batches(fields, grpo.micro_batch_size)

            loss_fn = _grpo_loss_fn(grpo, global_tokens, global_seqs)
            result = train_step(self.trainer, micro, loss_fn, temperature=self.cfg.rollout.temperature)
            if not math.isfinite(result["loss"]) or not result["update_successful"]:
                self._nonfinite_in_a_row += 1
                logger.warning(
                    "step %d: non-finite loss or gradient (%d in a row); the update was skipped",
                    self.step + 1,
                    self._nonfinite_in_a_row,
                )
                if self._nonfinite_in_a_row >= grpo.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{self._nonfinite_in_a_row} steps in a row had a NaN/Inf loss or gradient (limit "
                        f"grpo.max_consecutive_nonfinite={grpo.max_consecutive_nonfinite}); lower optim.lr, "
                        "check the data, or resume from an earlier checkpoint"
                    )
                continue
            self._nonfinite_in_a_row = 0
            tokens_in_update = max(result["num_tokens"], 1.0)
            for name, value in result.items():
                value = value / tokens_in_update if name in _TOKEN_MEAN_METRICS else value
                summed[name] = summed.get(name, 0.0) + value
        updates = max(grpo.num_minibatches, 1)
        return {f"train/{k}": v / updates for k, v in summed.items()}

    def _rollout_metrics(
        self, batch: RolloutBatch, rewards: torch.Tensor, correct: torch.Tensor
    ) -> dict[str, float]:
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
        return {
            "train/reward_mean": reward_sum / count,
            "train/accuracy": correct_sum / count,
            "train/response_length": length_sum / count,
            "train/truncated_fraction": truncated_sum / count,
        }


def _grpo_loss_fn(grpo: GRPOConfig, global_tokens: torch.Tensor, global_seqs: torch.Tensor) -> Any:
    """The per-micro-batch loss of one policy update, normalized by the update's global counts."""

    def loss_fn(logprobs: torch.Tensor, mb: dict[str, torch.Tensor]):
        loss, metrics = policy_loss(
            logprobs,
            mb.get("old_logprobs", logprobs.detach()),  # on-policy: ratio exactly 1, no extra forward pass
            mb["advantages"],
            mb["mask"],
            clip_low=grpo.clip_low,
            clip_high=grpo.clip_high,
            dual_clip=grpo.dual_clip,
            agg=grpo.loss_agg,
            ref_logprobs=mb.get("ref_logprobs"),
            kl_coef=grpo.kl_coef,
            kl_estimator=grpo.kl_estimator,
            global_num_tokens=global_tokens,
            global_num_seqs=global_seqs,
            token_sum_normalizer=grpo.token_sum_normalizer,
            truncated=mb["truncated"],
            mask_truncated=grpo.mask_truncated,
            rollout_logprobs=mb.get("rollout_logprobs"),
            tis_cap=grpo.tis_cap,
        )
        # policy_loss's metrics are means over this micro-batch's tokens: weight them by its tokens so that
        # train_step's sums over micro-batches and ranks divide into step-level means.
        num = metrics["num_tokens"]
        weighted = {k: v * num for k, v in metrics.items() if k in _TOKEN_MEAN_METRICS}
        return loss, {**weighted, "num_tokens": num}

    return loss_fn


def _split_micro_batches(
    fields: dict[str, torch.Tensor], micro_batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Equal-shape micro-batches (the last one padded with fully masked rows)."""
    rows = fields["tokens"].shape[0]
    pad = -rows % micro_batch_size
    if pad:
        fields = {
            name: torch.cat([value, torch.zeros_like(value[:1]).expand(pad, *value.shape[1:])])
            for name, value in fields.items()
        }
    chunks = {name: value.split(micro_batch_size) for name, value in fields.items()}
    return [{name: parts[i] for name, parts in chunks.items()} for i in range(len(chunks["tokens"]))]


def _progress(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    """A tqdm bar on rank 0 when enabled, else None."""
    if not enabled or global_rank() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
