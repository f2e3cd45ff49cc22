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
- the step's bookkeeping (`fit`): the step counter, `timing/*` of the step and `timing/tokens_per_s`,
  logging every metric, `on_step_end` callbacks, and the non-finite guard (a step whose updates were all
  skipped for a NaN/Inf loss or gradient is counted; `optim.max_consecutive_nonfinite` of them in a row stop
  the run with `NonFiniteLossError`, in SFT and GRPO alike);
- callbacks see the policy through a `PolicyHandle` (log-probs, generation, data-parallel reductions).

The model itself is a `megatron.policy.MegatronPolicy` (`self.policy`): this module schedules, the adapter
computes. Subclasses implement `train_one_step` and `_logprob_micro_batch_size`, and may override the hooks
below.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from nemo_quagmire.config.model import ModelConfig
from nemo_quagmire.config.run import CheckpointConfig, LoggingConfig, ValidationConfig
from nemo_quagmire.megatron.checkpoint import resumable_checkpoint
from nemo_quagmire.megatron.policy import MegatronPolicy
from nemo_quagmire.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from nemo_quagmire.trainer.callbacks import Callback, CallbackList, PolicyHandle, Tokenizer
from nemo_quagmire.trainer.checkpoint_source import write_model_dir
from nemo_quagmire.trainer.metrics import MetricsLogger, StageTimer
from nemo_quagmire.trainer.signals import Preempted, stop_on_sigterm
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import get_logger, global_rank

__all__ = [
    "CHECKPOINT_SUBDIR",
    "NonFiniteLossError",
    "RunConfig",
    "RunLoop",
    "StepResult",
    "update_skipped",
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


class NonFiniteLossError(RuntimeError):
    """Raised after `optim.max_consecutive_nonfinite` steps in a row whose updates were all skipped."""


@dataclass(frozen=True)
class StepResult:
    """What a training step hands `fit`.

    Attributes:
        metrics: the step's `train/*` metrics (deterministic: a resumed run logs the same values).
        tokens: tokens the step processed over all ranks (SFT: real tokens of the rows; GRPO: completion
            tokens generated), for `timing/tokens_per_s`.
        updates: optimizer updates the step attempted (0: nothing to train on, e.g. equal rewards).
        skipped_updates: how many of them were skipped for a NaN/Inf loss or gradient.
    """

    metrics: dict[str, float]
    tokens: float
    updates: int = 1
    skipped_updates: int = 0


def update_skipped(update: Mapping[str, float]) -> bool:
    """Whether an optimizer update (`MegatronPolicy.train`'s metrics) was skipped or its loss is NaN/Inf."""
    return not math.isfinite(update["loss"]) or not update["update_successful"]


class RunLoop:
    """Set-up, resume, the step's bookkeeping, validation and checkpoint schedule, teardown of a run (see the
    module docstring).

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
        self.nonfinite_in_a_row = 0
        self.policy: MegatronPolicy = None  # type: ignore[assignment]  # built by _setup
        self.engine: RolloutEngine | None = None

    # ------------------------------------------------------------------ hooks for subclasses
    def train_one_step(self, timer: StageTimer) -> StepResult:
        """One optimizer step (collective) at `self.step`, its stages timed with `timer`; `fit` counts,
        logs and calls callbacks."""
        raise NotImplementedError

    def _logprob_micro_batch_size(self) -> int:
        """Rows per forward pass when callbacks ask for log-probs."""
        raise NotImplementedError

    def _initial_weights(self, policy: MegatronPolicy) -> None:
        """Weights of a fresh run (not called on resume): `checkpoint.load_from`, else the random init."""
        if self.cfg.checkpoint.load_from is not None:
            policy.load_weights(self.cfg.checkpoint.load_from)

    def _after_setup(self) -> None:
        """Build what the step needs besides model and optimizer (engines, graders, reference models)."""

    def _make_engine(self) -> RolloutEngine:
        """The generation engine (built on first use unless `_after_setup` built it): in-process."""
        return self.policy.rollout_engine(self.tokenizer, seed=self.cfg.seed)

    def _progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {}

    def _close(self) -> None:
        """Release what `_after_setup` built (also after an error)."""
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> int | None:
        """Build model and optimizer, load initial weights or resume; returns the resumed step or None."""
        cfg = self.cfg
        resume_from = resumable_checkpoint(self.checkpoint_dir) if cfg.checkpoint.resume == "auto" else None
        self.policy = MegatronPolicy(cfg.model, cfg.parallel, seed=cfg.seed)
        if resume_from is None:
            self._initial_weights(self.policy)
        self.policy.attach_optimizer(cfg.optim)
        resumed_step = None
        if resume_from is not None:
            state = self.policy.resume(resume_from)
            resumed_step = self.step = int(state["step"])
            self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
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
        return self.policy.handle(
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
            progress = _progress_bar(
                self.max_steps, self.progress_label, cfg.logging.progress_bar, initial=self.step
            )
            with stop_on_sigterm() as stop:
                while self.step < self.max_steps:
                    last = self._step()
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

    def _step(self) -> dict[str, float]:
        """One step with its bookkeeping: count, time, log, call back, guard against non-finite updates."""
        timer = StageTimer()
        result = self.train_one_step(timer)
        self.step += 1
        metrics = result.metrics | timer.metrics()
        metrics["timing/tokens_per_s"] = result.tokens / max(metrics["timing/step"], 1e-9)
        self.metrics_logger.log(self.step, metrics)
        self.callbacks.on_step_end(self.policy_handle(), metrics)
        self._guard_nonfinite(result)
        return metrics

    def _guard_nonfinite(self, result: StepResult) -> None:
        """Count the steps in a row whose updates were all skipped; stop the run at the limit."""
        if result.updates == 0:  # nothing to train on (e.g. equal rewards): neither a failure nor a success
            return
        all_skipped = result.skipped_updates == result.updates
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if all_skipped else 0
        if result.skipped_updates:
            logger.warning(
                "step %d: non-finite loss or gradient in %d of %d updates, skipped (%d steps in a row "
                "without an applied update)",
                self.step,
                result.skipped_updates,
                result.updates,
                self.nonfinite_in_a_row,
            )
        limit = self.cfg.optim.max_consecutive_nonfinite
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} steps in a row had a NaN/Inf loss or gradient (limit "
                f"optim.max_consecutive_nonfinite={limit}); lower optim.lr, check the data, or resume from "
                "an earlier checkpoint"
            )

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
        client_state = {"step": self.step, "nonfinite_in_a_row": self.nonfinite_in_a_row}
        path = self.policy.save(self.checkpoint_dir, self.step, client_state, self.cfg.checkpoint.keep_last)
        self.callbacks.on_checkpoint(self.policy_handle(), path)
        return path


def _progress_bar(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    """A tqdm bar on rank 0 when enabled, else None."""
    if not enabled or global_rank() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
