"""The policy as the trainers and evaluate.py see it: megatron model chunks behind a few verbs.

Why: the loops (`trainer/`) orchestrate steps, and should read as such; how weights are built, loaded,
saved, exported, scored and trained on megatron-core is this adapter's business. The SFT and GRPO trainers,
the GRPO reference model and evaluate.py all hold a `MegatronPolicy`, so each of those verbs has one home:

- build (seeded), load initial weights (an HF directory or a run checkpoint), attach an optimizer;
- `logprobs`, `train` (one optimizer step over micro-batches with a loss), `save` / `resume`;
- `export_hf` / `hf_weights` (vLLM weight sync), `rollout_engine` (in-process generation);
- `handle`: the `PolicyHandle` callbacks see (log-probs, generation, data-parallel reductions).

Collective verbs (everything but the properties) are called by every rank of the model's parallel groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nemo_quagmire.config.model import ModelConfig
from nemo_quagmire.config.optim import OptimConfig
from nemo_quagmire.config.parallel import ParallelConfig
from nemo_quagmire.megatron.checkpoint import META_FILE, load_checkpoint, save_checkpoint
from nemo_quagmire.megatron.hf import export_hf, iter_hf_weights, load_hf_weights
from nemo_quagmire.megatron.logprobs import compute_logprobs, honours_attention_masks, sequence_pad_multiple
from nemo_quagmire.megatron.model import build_model
from nemo_quagmire.megatron.parallel import (
    all_gather_objects_data_parallel,
    all_reduce_sum_data_parallel,
    data_parallel_rank_and_size,
    set_random_seed,
)
from nemo_quagmire.megatron.train_step import (
    LossFn,
    MicroBatch,
    Trainer,
    setup_training,
    train_step,
)
from nemo_quagmire.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from nemo_quagmire.trainer.callbacks import PolicyHandle, Tokenizer
from nemo_quagmire.utils.logging import get_logger

__all__ = ["MegatronPolicy"]

logger = get_logger(__name__)

Generate = Callable[[Sequence[Sequence[int]], int, SamplingParams], RolloutBatch]


class MegatronPolicy:
    """This rank's model chunks of one model, with an optimizer once `attach_optimizer` ran.

    Args:
        model_cfg: the architecture.
        parallel_cfg: the layout megatron's parallel state was initialised with.
        seed: seeds the random initial weights (`set_random_seed`), so they depend on the seed alone; None
            leaves the RNGs alone (a copy whose weights are loaded next).
    """

    def __init__(self, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, seed: int | None) -> None:
        if seed is not None:
            set_random_seed(seed)
        self.model_cfg = model_cfg
        self.parallel_cfg = parallel_cfg
        self.chunks: list[torch.nn.Module] = build_model(model_cfg, parallel_cfg)
        self.trainer: Trainer | None = None

    # ------------------------------------------------------------------ weights and optimizer
    def load_weights(self, path: str | Path) -> None:
        """Weights only, from an HF directory or a checkpoint of this project (`checkpoint_meta.json`)."""
        if (Path(path) / META_FILE).is_file():
            load_checkpoint(path, self.chunks, model_cfg=self.model_cfg, restore_rng=False)
        else:
            load_hf_weights(self.chunks, path, self.model_cfg)
        logger.info("initial weights from %s", path)

    def copy_weights_from(self, other: MegatronPolicy) -> None:
        """Take `other`'s weights (same architecture and layout)."""
        for target, source in zip(self.modules(), other.modules(), strict=True):
            target.load_state_dict(source.state_dict())

    def freeze(self) -> MegatronPolicy:
        """No gradients from now on (a reference model); returns self."""
        for chunk in self.chunks:
            chunk.requires_grad_(False)
        return self

    def attach_optimizer(self, optim_cfg: OptimConfig) -> None:
        """Wrap the chunks in megatron DDP and create the optimizer and LR scheduler."""
        self.trainer = setup_training(self.chunks, optim_cfg)
        self.chunks = list(self.trainer.model)

    def modules(self) -> list[torch.nn.Module]:
        """The bare model chunks (DDP unwrapped)."""
        return [getattr(chunk, "module", chunk) for chunk in self.chunks]

    def save(
        self, directory: Path, step: int, client_state: Mapping[str, Any], keep_last: int | None
    ) -> Path:
        """Checkpoint weights, optimizer, scheduler, RNG states and `client_state` as `step_<step>`."""
        trainer = self._trainer()
        return save_checkpoint(
            directory,
            step,
            self.chunks,
            model_cfg=self.model_cfg,
            optimizer=trainer.optimizer,
            scheduler=trainer.scheduler,
            client_state=dict(client_state),
            keep_last=keep_last,
        )

    def resume(self, path: Path) -> dict[str, Any]:
        """Load everything `save` wrote; returns its client state."""
        trainer = self._trainer()
        return load_checkpoint(
            path,
            self.chunks,
            model_cfg=self.model_cfg,
            optimizer=trainer.optimizer,
            scheduler=trainer.scheduler,
        )

    # ------------------------------------------------------------------ compute
    @property
    def honours_attention_masks(self) -> bool:
        """Whether packed rows can be kept apart with a mask (megatron's local attention; not TE's)."""
        return honours_attention_masks(self.chunks)

    @property
    def sequence_pad_multiple(self) -> int:
        """Sequence lengths must be multiples of this (sequence parallelism, FP8)."""
        return sequence_pad_multiple(self.chunks)

    def logprobs(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        *,
        micro_batch_size: int,
        temperature: float = 1.0,
        packed: bool = False,
    ) -> torch.Tensor:
        """Aligned per-token log-probs Float[B, T] of right-padded `tokens` [B, T] (no gradients)."""
        return compute_logprobs(
            self.chunks,
            tokens,
            lengths,
            micro_batch_size=micro_batch_size,
            temperature=temperature,
            packed=packed,
        ).logprobs

    def train(
        self,
        micro_batches: Sequence[MicroBatch],
        loss_fn: LossFn,
        *,
        temperature: float = 1.0,
        variable_shapes: bool = False,
        with_entropy: bool = False,
    ) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (`megatron.train_step.train_step`; with
        `with_entropy`, the loss also gets the per-token entropy)."""
        device = next(self.chunks[0].parameters()).device
        on_device = [{name: value.to(device) for name, value in mb.items()} for mb in micro_batches]
        return train_step(
            self._trainer(),
            on_device,
            loss_fn,
            temperature=temperature,
            variable_shapes=variable_shapes,
            with_entropy=with_entropy,
        )

    # ------------------------------------------------------------------ generation and export
    def rollout_engine(self, tokenizer: Tokenizer, *, seed: int, max_batch_size: int = 256) -> RolloutEngine:
        """KV-cached generation on these very parameters (no weight sync needed)."""
        from nemo_quagmire.megatron.rollout_engine import MegatronRolloutEngine

        return MegatronRolloutEngine(
            self.chunks,
            self.model_cfg,
            pad_id=tokenizer.pad_id,
            eos_id=tokenizer.eos_id,
            max_batch_size=max_batch_size,
            seed=seed,
        )

    def export_hf(
        self, directory: Path, hf_config: Mapping[str, Any] | None = None, *, dtype: torch.dtype | None = None
    ) -> None:
        """An HF directory transformers and vLLM load (written by global rank 0; dtype: the model's)."""
        export_hf(self.chunks, directory, self.model_cfg, hf_config, dtype=dtype)

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full model as (HF name, tensor) pairs on every rank (vLLM weight sync)."""
        return iter_hf_weights(self.chunks, self.model_cfg)

    def handle(
        self,
        *,
        step: int,
        run_dir: Path,
        tokenizer: Tokenizer,
        generate: Generate | None,
        micro_batch_size: int,
    ) -> PolicyHandle:
        """What callbacks see: log-probs through `logprobs`, reductions over the data-parallel group."""
        dp_rank, dp_size = data_parallel_rank_and_size()
        return PolicyHandle(
            step=step,
            run_dir=run_dir,
            tokenizer=tokenizer,
            logprobs=lambda tokens, lengths: self.logprobs(
                tokens, lengths, micro_batch_size=micro_batch_size
            ),
            generate=generate,
            all_reduce_sum=all_reduce_sum_data_parallel,
            all_gather_objects=all_gather_objects_data_parallel,
            data_parallel_rank=dp_rank,
            data_parallel_size=dp_size,
        )

    def _trainer(self) -> Trainer:
        if self.trainer is None:
            raise RuntimeError("this policy has no optimizer: call attach_optimizer first")
        return self.trainer
