"""The run machinery the SFT and GRPO trainers share: set-up, resume, the step loop's schedule, saving.

Both trainers are "a training step, repeated": what differs is the step (`train_one_step`) and a few set-up
details; everything around it is here, once, so the two runs behave the same where they should:

- set-up: seed from the run's seed (the initial weights do not depend on what ran before in the
  process), build the model, load initial weights (an HF directory or a checkpoint of another run, e.g. SFT
  for GRPO) unless resuming, create optimizer and LR scheduler, and resume from the newest intact
  checkpoint of `<run_dir>/checkpoints` (weights, optimizer, scheduler, RNG states and the trainer's own
  state; a damaged newer one is named and skipped), so a resumed run repeats the uninterrupted one exactly;
- the loop (`fit`): validate at the start (unless `validation.at_start` is off, and not after a resume: that
  validation is already logged), then
  train, validating every `validation.interval` steps and at the end and checkpointing every
  `checkpoint.interval` steps and at the end (keeping the newest `checkpoint.keep_last`), with a progress
  bar on rank 0 and every metric in metrics.jsonl (`MetricsLogger`); on SIGTERM, a checkpoint after the
  current step, then `Preempted` (`trainer.signals`);
- callbacks see the policy through a `PolicyHandle` (log-probs, generation, data-parallel reductions).

Subclasses implement `train_one_step` and `_logprob_micro_batch_size`, and may override the hooks below.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from nemo_quagmire.config.model import ModelConfig
from nemo_quagmire.config.run import CheckpointConfig, LoggingConfig, ValidationConfig
from nemo_quagmire.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, CallbackList, PolicyHandle, Tokenizer
from nemo_quagmire.trainer.checkpoint_source import write_model_dir
from nemo_quagmire.trainer.metrics import MetricsLogger
from nemo_quagmire.trainer.signals import Preempted, stop_on_sigterm
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import get_logger, global_rank

__all__ = [
    "CHECKPOINT_SUBDIR",
    "RunConfig",
    "RunLoop",
    "load_initial_weights",
    "megatron_policy_handle",
    "megatron_rollout_engine",
    "progress_bar",
]

logger = get_logger(__name__)

RUN_INFO_FILE = "run_info.json"  # {"init_from": <checkpoint.load_from>}, read by nemo_quagmire.predict.runs

CHECKPOINT_SUBDIR = "checkpoints"


class RunConfig(Protocol):
    """The sections of a run config the shared machinery reads (`SFTRunConfig`, `GRPORunConfig`)."""

    run_dir: str
    seed: int
    model: ModelConfig
    parallel: Any
    optim: Any
    checkpoint: CheckpointConfig
    validation: ValidationConfig
    logging: LoggingConfig


class RunLoop:
    """Set-up, resume, validation and checkpoint schedule, teardown of a run (see the module docstring).

    Args:
        cfg: the validated run config.
        tokenizer: encodes prompts, decodes completions (saved with the HF model config to `<run_dir>/model`,
            see `trainer.checkpoint_source.write_model_dir`).
        callbacks: validation and monitoring hooks.
        max_steps: optimizer steps of the whole run.

    Raises:
        ValueError: the tokenizer's pad or EOS id is outside the model's vocabulary.
    """

    progress_label: ClassVar[str] = "train"

    def __init__(
        self, cfg: RunConfig, *, tokenizer: Tokenizer, callbacks: Sequence[Callback], max_steps: int
    ) -> None:
        if max(tokenizer.pad_id, tokenizer.eos_id) >= cfg.model.vocab_size:
            raise ValueError(
                f"the tokenizer's special ids (pad {tokenizer.pad_id}, eos {tokenizer.eos_id}) do not fit "
                f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size to the tokenizer's vocab size"
            )
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.callbacks = CallbackList(callbacks)
        self.run_dir = Path(cfg.run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINT_SUBDIR
        self.max_steps = max_steps
        self.step = 0
        self.trainer: Any = None  # megatron's Trainer (model, optimizer, scheduler), built by _setup
        self.engine: RolloutEngine | None = None

    # ------------------------------------------------------------------ hooks for subclasses
    def train_one_step(self) -> dict[str, float]:
        """One optimizer step (collective); returns its metrics, after logging them and calling callbacks."""
        raise NotImplementedError

    def _logprob_micro_batch_size(self) -> int:
        """Rows per forward pass when callbacks ask for log-probs."""
        raise NotImplementedError

    def _initial_weights(self, model: list[torch.nn.Module]) -> None:
        """Weights of a fresh run (not called on resume): `checkpoint.load_from`, else the random init."""
        if self.cfg.checkpoint.load_from is not None:
            load_initial_weights(model, self.cfg.checkpoint.load_from, self.cfg.model)

    def _after_setup(self) -> None:
        """Build what the step needs besides model and optimizer (engines, graders, reference models)."""

    def _make_engine(self) -> RolloutEngine:
        """The generation engine (built on first use unless `_after_setup` built it): in-process."""
        return megatron_rollout_engine(self.trainer.model, self.cfg.model, self.tokenizer, seed=self.cfg.seed)

    def _client_state(self) -> dict[str, Any]:
        """The trainer's own state saved with each checkpoint (besides the step)."""
        return {}

    def _restore(self, client_state: Mapping[str, Any]) -> None:
        """Restore `_client_state` after a resume."""

    def _progress_postfix(self, metrics: Mapping[str, float]) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {}

    def _close(self) -> None:
        """Release what `_after_setup` built (also after an error)."""
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> int | None:
        """Build model and optimizer, load initial weights or resume; returns the resumed step or None."""
        from nemo_quagmire.megatron.checkpoint import load_checkpoint, resumable_checkpoint
        from nemo_quagmire.megatron.model import build_model
        from nemo_quagmire.megatron.parallel import set_random_seed
        from nemo_quagmire.megatron.train_step import setup_training

        cfg = self.cfg
        resume_from = resumable_checkpoint(self.checkpoint_dir) if cfg.checkpoint.resume == "auto" else None
        set_random_seed(cfg.seed)  # the initial weights depend on the seed alone, not on what ran before
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
            self._restore(state)
            logger.info("resumed from %s (step %d)", resume_from, self.step)
        if global_rank() == 0:  # what evaluate.py and export_hf.py read beside the checkpoints
            write_model_dir(self.run_dir, cfg.model, self.tokenizer, cfg.checkpoint.load_from)
        if global_rank() == 0 and cfg.checkpoint.load_from is not None:
            # The link the predictor report follows from this run back to the checkpoint it started from.
            with atomic_write(self.run_dir / RUN_INFO_FILE) as handle:
                json.dump({"init_from": str(cfg.checkpoint.load_from)}, handle)
        self._after_setup()
        return resumed_step

    # ------------------------------------------------------------------ policy view for callbacks
    def _generate(
        self, prompts: Sequence[Sequence[int]], group_size: int, sampling: SamplingParams
    ) -> RolloutBatch:
        if self.engine is None:
            self.engine = self._make_engine()
        return self.engine.generate(prompts, group_size, sampling)

    def policy_handle(self) -> PolicyHandle:
        return megatron_policy_handle(
            self.trainer.model,
            step=self.step,
            run_dir=self.run_dir,
            tokenizer=self.tokenizer,
            generate=self._generate,
            micro_batch_size=self._logprob_micro_batch_size(),
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
            if resumed_step is None and cfg.validation.at_start:
                self._validate()
            progress = progress_bar(
                self.max_steps, self.progress_label, cfg.logging.progress_bar, initial=self.step
            )
            with stop_on_sigterm() as stop:
                while self.step < self.max_steps:
                    last = self.train_one_step()
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(self._progress_postfix(last))
                    final = self.step == self.max_steps
                    if self.step % cfg.validation.interval == 0 or final:
                        self._validate()
                    saved = self._save() if self.step % cfg.checkpoint.interval == 0 or final else None
                    if stop.requested() and not final:
                        saved = saved or self._save()
                        raise Preempted(
                            f"SIGTERM: stopped after step {self.step} of {self.max_steps} with checkpoint "
                            f"{saved}; run the same command to resume"
                        )
            if progress is not None:
                progress.close()
        finally:
            self.callbacks.on_train_end(self.policy_handle())
            self.metrics_logger.close()
            self._close()
        return last

    def _validate(self) -> None:
        metrics = self.callbacks.on_validation(self.policy_handle())
        if metrics:
            self.metrics_logger.log(self.step, metrics)
            headline = {k: v for k, v in metrics.items() if k.startswith(("val/macro/", "val/heldout_loss/"))}
            logger.info(
                "validation at step %d: %s",
                self.step,
                ", ".join(f"{k.removeprefix('val/')}={v:.4f}" for k, v in sorted(headline.items())),
            )

    def _save(self) -> Path:
        from nemo_quagmire.megatron.checkpoint import save_checkpoint

        path = save_checkpoint(
            self.checkpoint_dir,
            self.step,
            self.trainer.model,
            model_cfg=self.cfg.model,
            optimizer=self.trainer.optimizer,
            scheduler=self.trainer.scheduler,
            client_state={"step": self.step, **self._client_state()},
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.callbacks.on_checkpoint(self.policy_handle(), path)
        return path


def load_initial_weights(model: list[torch.nn.Module], path: str | Path, model_cfg: ModelConfig) -> None:
    """Load weights (only) from an HF directory or from a checkpoint of this project (`checkpoint_meta.json`
    inside), into this rank's model chunks; collective."""
    from nemo_quagmire.megatron.checkpoint import META_FILE, load_checkpoint

    if (Path(path) / META_FILE).is_file():
        load_checkpoint(path, model, model_cfg=model_cfg, restore_rng=False)
    else:
        from nemo_quagmire.megatron.hf import load_hf_weights

        load_hf_weights(model, path, model_cfg)
    logger.info("initial weights from %s", path)


def megatron_rollout_engine(
    model: Sequence[torch.nn.Module],
    model_cfg: ModelConfig,
    tokenizer: Tokenizer,
    *,
    seed: int,
    max_batch_size: int = 256,
) -> RolloutEngine:
    """KV-cached generation on the trainer's own parameters (no weight sync needed)."""
    from nemo_quagmire.megatron.rollout_engine import MegatronRolloutEngine

    return MegatronRolloutEngine(
        model,
        model_cfg,
        pad_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        max_batch_size=max_batch_size,
        seed=seed,
    )


def megatron_policy_handle(
    model: Sequence[torch.nn.Module],
    *,
    step: int,
    run_dir: Path,
    tokenizer: Tokenizer,
    generate: Any,
    micro_batch_size: int,
) -> PolicyHandle:
    """The `PolicyHandle` of megatron model chunks: log-probs through `compute_logprobs`, reductions over the
    data-parallel group."""
    from nemo_quagmire.megatron.logprobs import compute_logprobs
    from nemo_quagmire.megatron.parallel import (
        all_gather_objects_data_parallel,
        all_reduce_sum_data_parallel,
        data_parallel_rank_and_size,
    )

    dp_rank, dp_size = data_parallel_rank_and_size()

    def logprobs(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return compute_logprobs(model, tokens, lengths, micro_batch_size=micro_batch_size).logprobs

    return PolicyHandle(
        step=step,
        run_dir=run_dir,
        tokenizer=tokenizer,
        logprobs=logprobs,
        generate=generate,
        all_reduce_sum=all_reduce_sum_data_parallel,
        all_gather_objects=all_gather_objects_data_parallel,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
    )


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    """A tqdm bar on rank 0 when enabled, else None."""
    if not enabled or global_rank() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
