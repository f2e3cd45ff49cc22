"""Supervised fine-tuning on the Megatron engine: the SFT stage whose checkpoints the paper ranks.

The method compares SFT checkpoints (other epochs, example counts, learning rates) by two proxies of their
post-RL score: the loss on held-out examples and pass@large-k. So this trainer does plain SFT well and makes
both proxies cheap to log: the held-out-loss and Pass@k callbacks run at every validation, exactly as in a
GRPO run (the run machinery, `nemo_quagmire.trainer.run`, is shared).

A step takes `sft.global_batch_size` examples: epoch e visits the examples in an order shuffled from
(seed, e), and step s reads the s-th batch of that order (the last partial batch of an epoch is dropped).
The order is a function of the step alone, so a resumed run (model, optimizer, scheduler and RNG states come
from the checkpoint) repeats the uninterrupted run exactly. Each data-parallel rank takes every DP-size-th
example of the batch and turns its share into rows (`sft.packing`: packed with per-example attention,
length buckets, or padded; see `nemo_quagmire.data.batching`). The loss is the token-mean NLL over the
response tokens (and EOS) of the whole global batch, normalized by the step's *global* response-token count,
so micro-batches and ranks sum to the whole batch's loss (the contract of `nemo_quagmire.megatron.train_step`)
whatever the packing and the number of ranks.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from nemo_quagmire.algorithms.losses import aggregate_loss
from nemo_quagmire.config.sft import SFTRunConfig
from nemo_quagmire.data.batching import EncodedExample, Packing, build_rows, encode_example, row_micro_batches
from nemo_quagmire.megatron.parallel import all_reduce_sum_data_parallel, data_parallel_rank_and_size
from nemo_quagmire.megatron.policy import MegatronPolicy
from nemo_quagmire.rollout.base import RolloutEngine
from nemo_quagmire.trainer.callbacks import Callback, Tokenizer
from nemo_quagmire.trainer.metrics import StageTimer
from nemo_quagmire.trainer.run import RunLoop, StepResult, update_skipped
from nemo_quagmire.utils.logging import get_logger

__all__ = ["SFTTrainer", "nll_loss", "sft_step"]

logger = get_logger(__name__)


class SFTTrainer(RunLoop):
    """SFT on the Megatron engine. Build with `SFTTrainer(cfg, ...)` (or `trainer.build.build_sft_trainer`),
    run with `fit()`.

    Args:
        cfg: the validated run config.
        examples: `{"prompt", "response"}` training examples (every rank passes all of them).
        tokenizer: encodes them (`cfg.data.prompt_template`) and decodes completions for callbacks.
        callbacks: validation and monitoring hooks.

    Raises:
        ValueError: too few examples for one global batch, tokenizer ids outside the model's vocabulary, or
            a global batch that data-parallel ranks cannot share evenly.
    """

    progress_label = "SFT"

    def __init__(
        self,
        cfg: SFTRunConfig,
        *,
        examples: Sequence[Mapping[str, str]],
        tokenizer: Tokenizer,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        sft = cfg.sft
        encoded = [encode_example(example, tokenizer, cfg.data.prompt_template) for example in examples]
        self.examples: list[EncodedExample] = [e for e in encoded if len(e) <= sft.seq_length]
        if dropped := len(encoded) - len(self.examples):
            logger.warning(
                "%d of %d SFT examples are longer than sft.seq_length=%d tokens and are dropped",
                dropped,
                len(encoded),
                sft.seq_length,
            )
        self.steps_per_epoch = len(self.examples) // sft.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.examples)} usable SFT examples are fewer than one global batch "
                f"(sft.global_batch_size={sft.global_batch_size}); add data or lower the batch size"
            )
        max_steps = sft.max_steps or sft.epochs * self.steps_per_epoch
        super().__init__(cfg, tokenizer=tokenizer, callbacks=callbacks, max_steps=max_steps)
        self.cfg: SFTRunConfig = cfg
        self._epoch_order: tuple[int, list[int]] | None = None
        logger.info(
            "SFT: %d examples, %d steps per epoch of %d, %d steps (%.2f epochs)",
            len(self.examples),
            self.steps_per_epoch,
            sft.global_batch_size,
            max_steps,
            max_steps / self.steps_per_epoch,
        )

    # ------------------------------------------------------------------ RunLoop hooks
    def _after_setup(self) -> None:
        if self.cfg.sft.packing == "packed" and not self.policy.honours_attention_masks:
            raise ValueError(
                "sft.packing=packed keeps packed examples apart with an attention mask, which this model's "
                "attention (Transformer Engine) ignores; use sft.packing=buckets"
            )
        self._width_multiple = self.policy.sequence_pad_multiple
        pipeline = self.cfg.parallel.pipeline_model_parallel_size > 1  # stages exchange fixed shapes
        self._uniform_width = pipeline or self.cfg.sft.packing == "none"

    def _make_engine(self) -> RolloutEngine:
        return self.policy.rollout_engine(
            self.tokenizer, seed=self.cfg.seed, max_batch_size=self.cfg.validation.rows_per_batch
        )

    def _logprob_micro_batch_size(self) -> int:
        return self.cfg.sft.micro_batch_size

    def _progress_postfix(self, metrics: Mapping[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.4f}", "lr": f"{metrics['train/lr']:.2e}"}

    # ------------------------------------------------------------------ the step
    def batch_indices(self, step: int) -> list[int]:
        """Indices (into the usable examples) of the global batch of step `step` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(f"{self.cfg.seed}/sft/epoch/{epoch}").shuffle(order)
            self._epoch_order = (epoch, order)
        size = self.cfg.sft.global_batch_size
        return self._epoch_order[1][position * size : (position + 1) * size]

    def train_one_step(self, timer: StageTimer) -> StepResult:
        """One SFT step (collective) on the global batch of `self.step`."""
        sft = self.cfg.sft
        with timer.stage("data"):
            dp_rank, dp_size = data_parallel_rank_and_size()
            mine = [self.examples[i] for i in self.batch_indices(self.step)[dp_rank::dp_size]]
        with timer.stage("train"):
            result = sft_step(
                self.policy,
                mine,
                packing=sft.packing,
                capacity=sft.seq_length,
                micro_batch_size=sft.micro_batch_size,
                pad_id=self.tokenizer.pad_id,
                width_multiple=self._width_multiple,
                uniform_width=self._uniform_width,
            )
        metrics = {
            "train/loss": result["loss"],
            "train/grad_norm": result["grad_norm"],
            "train/lr": result["lr"],
            "train/update_successful": result["update_successful"],
            "train/num_tokens": result["num_tokens"],
            "train/epoch": (self.step + 1) / self.steps_per_epoch,
            "train/packing_efficiency": result["tokens"] / max(result["slots"], 1.0),
        }
        return StepResult(metrics, tokens=result["tokens"], skipped_updates=int(update_skipped(result)))


def nll_loss(
    logprobs: torch.Tensor, micro_batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean NLL of the masked tokens, normalized by `micro_batch["global_num_tokens"]`.

    Args:
        logprobs: Float[b, T] aligned log-probs of `micro_batch["tokens"]`.
        micro_batch: `loss_mask` Bool[b, T] and `global_num_tokens` (0-dim) besides the tokens.
    """
    mask = micro_batch["loss_mask"]
    loss = aggregate_loss(
        -logprobs,
        mask,
        "token-mean",
        global_num_tokens=micro_batch["global_num_tokens"],
        global_num_seqs=None,
        token_sum_normalizer=None,
    )
    return loss, {"num_tokens": mask.sum()}


def sft_step(
    policy: MegatronPolicy,
    examples: Sequence[EncodedExample],
    *,
    packing: Packing,
    capacity: int,
    micro_batch_size: int,
    pad_id: int,
    width_multiple: int = 1,
    uniform_width: bool = True,
) -> dict[str, float]:
    """One optimizer step on this data-parallel rank's share of a batch (collective over DP ranks).

    Returns:
        `MegatronPolicy.train`'s metrics (loss, num_tokens, grad_norm, lr, update_successful)
        plus, summed over ranks, `tokens` (real tokens processed) and `slots` (row positions computed), whose
        ratio is the packing efficiency.
    """
    rows = build_rows(examples, packing, capacity)
    micro = row_micro_batches(
        rows, micro_batch_size, pad_id=pad_id, width_multiple=width_multiple, uniform_width=uniform_width
    )
    counts = torch.stack(
        [
            sum(mb["loss_mask"].sum() for mb in micro),
            torch.tensor(sum(len(row.tokens) for row in rows)),
            torch.tensor(sum(mb["tokens"].numel() for mb in micro)),
        ]
    )
    global_counts = all_reduce_sum_data_parallel(counts)  # [3]: loss tokens, real tokens, slots
    micro = [mb | {"global_num_tokens": global_counts[0]} for mb in micro]
    metrics = policy.train(micro, nll_loss, variable_shapes=not uniform_width)
    metrics["tokens"] = float(global_counts[1])
    metrics["slots"] = float(global_counts[2])
    return metrics
