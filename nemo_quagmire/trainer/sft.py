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
length buckets, or padded; see `nemo_quagmire.trainer.sft_steps`). The loss is the token mean over the
response tokens of the whole global batch, whatever the packing and the number of ranks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from nemo_quagmire.config.sft import SFTRunConfig
from nemo_quagmire.megatron.parallel import data_parallel_rank_and_size
from nemo_quagmire.rollout.base import RolloutEngine
from nemo_quagmire.trainer.callbacks import Callback, Tokenizer
from nemo_quagmire.trainer.metrics import StageTimer
from nemo_quagmire.trainer.run import RunLoop, megatron_rollout_engine
from nemo_quagmire.trainer.sft_steps import EncodedExample, encode_example, sft_step
from nemo_quagmire.utils.logging import get_logger

__all__ = ["SFTTrainer"]

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
        from nemo_quagmire.megatron.logprobs import honours_attention_masks, sequence_pad_multiple

        if self.cfg.sft.packing == "packed" and not honours_attention_masks(self.trainer.model):
            raise ValueError(
                "sft.packing=packed keeps packed examples apart with an attention mask, which this model's "
                "attention (Transformer Engine) ignores; use sft.packing=buckets"
            )
        self._width_multiple = sequence_pad_multiple(self.trainer.model)
        pipeline = self.cfg.parallel.pipeline_model_parallel_size > 1  # stages exchange fixed shapes
        self._uniform_width = pipeline or self.cfg.sft.packing == "none"

    def _make_engine(self) -> RolloutEngine:
        return megatron_rollout_engine(
            self.trainer.model,
            self.cfg.model,
            self.tokenizer,
            seed=self.cfg.seed,
            max_batch_size=self.cfg.validation.rows_per_batch,
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

    def train_one_step(self) -> dict[str, float]:
        """One SFT step (collective); returns its metrics (also logged and passed to callbacks)."""
        sft = self.cfg.sft
        timer = StageTimer()
        with timer.stage("data"):
            dp_rank, dp_size = data_parallel_rank_and_size()
            mine = [self.examples[i] for i in self.batch_indices(self.step)[dp_rank::dp_size]]
        with timer.stage("train"):
            result = sft_step(
                self.trainer,
                mine,
                packing=sft.packing,
                capacity=sft.seq_length,
                micro_batch_size=sft.micro_batch_size,
                pad_id=self.tokenizer.pad_id,
                width_multiple=self._width_multiple,
                uniform_width=self._uniform_width,
            )
        if not math.isfinite(result["loss"]) or not result["update_successful"]:
            logger.warning("step %d: non-finite loss or gradient; the update was skipped", self.step + 1)
        self.step += 1
        metrics = {
            "train/loss": result["loss"],
            "train/grad_norm": result["grad_norm"],
            "train/lr": result["lr"],
            "train/update_successful": result["update_successful"],
            "train/num_tokens": result["num_tokens"],
            "train/epoch": self.step / self.steps_per_epoch,
            "train/packing_efficiency": result["tokens"] / max(result["slots"], 1.0),
            **timer.metrics(),
        }
        metrics["train/tokens_per_s"] = result["tokens"] / max(metrics["timing/step"], 1e-9)
        self.metrics_logger.log(self.step, metrics)
        self.callbacks.on_step_end(self.policy_handle(), metrics)
        return metrics
