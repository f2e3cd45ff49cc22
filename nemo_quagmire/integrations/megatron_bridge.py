"""Megatron-Bridge callbacks for the held-out loss and the Pass@k evaluator.

Megatron-Bridge (NVIDIA-NeMo/Megatron-Bridge, NVIDIA's home of LLM SFT and pretraining after NeMo 2) runs
its own training loop and calls `Callback.on_eval_end(context)` after every validation
(src/megatron/bridge/training/eval.py `evaluate`), with `context.model` the list of megatron model chunks
(DDP / Float16Module wrapped `GPTModel`s, in eval mode) and `context.state` its `GlobalState`
(`train_state.step`, `tensorboard_logger`, `wandb_logger`). These adapters turn that into the project's
`PolicyHandle` (log-probs through megatron's forward-only schedule at any TP/PP, generation among the
tokenizer's ids only: Bridge pads the vocabulary to `make_vocab_size_divisible_by` x TP like NeMo) and log
what the callback returns:

- to Bridge's TensorBoard and W&B loggers, at the training step (on the rank Bridge gives them to);
- to `<run_dir>/metrics.jsonl` on global rank 0, the file the predictor report reads
  (`scripts/predict_report.py --sft-runs <run_dir>`), with graded samples in `<run_dir>/eval/step_N/`.

Attach them like any Bridge callback::

    from megatron.bridge.training.finetune import finetune
    from megatron.bridge.training.gpt_step import forward_step
    from nemo_quagmire.integrations.megatron_bridge import HeldOutLossBridgeCallback, PassAtKBridgeCallback

    finetune(config, forward_step, callbacks=[
        HeldOutLossBridgeCallback(heldout, tokenizer, run_dir=config.checkpoint.save),
        PassAtKBridgeCallback(passk, tokenizer, run_dir=config.checkpoint.save),
    ])

Bridge is not imported here: its `CallbackManager.add` registers every `on_<event>` method of any object
(it compares each to the base class's, so a duck-typed callback registers the same way). Its wheels need
Python 3.12 and Transformer Engine, so on CPU the adapters are tested against a fake of its context built
from its source (tests/integrations/test_megatron_bridge.py), and for real in a `gpu` test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_quagmire.callbacks.heldout_loss import HeldOutLossCallback
from nemo_quagmire.callbacks.passk import PassAtKCallback
from nemo_quagmire.integrations.megatron_policy import MegatronChunksPolicy, policy_handle
from nemo_quagmire.integrations.run_metrics import acquire_metrics_logger, release_metrics_logger
from nemo_quagmire.trainer.callbacks import Callback, Tokenizer
from nemo_quagmire.trainer.metrics import MetricsLogger

__all__ = ["HeldOutLossBridgeCallback", "PassAtKBridgeCallback"]


class _BridgeAdapter:
    """Runs a project callback in Megatron-Bridge's `on_eval_end` and logs its metrics (module docstring)."""

    def __init__(
        self,
        callback: Callback,
        tokenizer: Tokenizer,
        *,
        run_dir: str | Path,
        micro_batch_size: int = 8,
        max_batch_size: int = 256,
    ) -> None:
        vocab_size = getattr(tokenizer, "vocab_size", None)
        if not isinstance(vocab_size, int):
            raise TypeError(
                f"{type(tokenizer).__name__} has no integer vocab_size; generation samples only the "
                "tokenizer's ids (the model's vocabulary is padded), so the tokenizer must say how many"
            )
        self.callback = callback
        self.tokenizer = tokenizer
        self.run_dir = Path(run_dir)
        self.micro_batch_size = micro_batch_size
        self.max_batch_size = max_batch_size
        self._metrics: MetricsLogger | None = None

    def on_eval_end(self, context: Any) -> None:
        """After each Bridge validation: evaluate `context.model` at `context.state.train_state.step`."""
        step = int(context.state.train_state.step)
        policy = MegatronChunksPolicy(
            context.model,
            vocab_size=self.tokenizer.vocab_size,  # type: ignore[attr-defined]
            pad_id=self.tokenizer.pad_id,
            eos_id=self.tokenizer.eos_id,
            micro_batch_size=self.micro_batch_size,
            max_batch_size=self.max_batch_size,
        )
        handle = policy_handle(
            step=step,
            run_dir=self.run_dir,
            tokenizer=self.tokenizer,
            logprobs=policy.logprobs,
            generate=policy.generate,
            group=policy.data_parallel_group(),
        )
        metrics = self.callback.on_validation(handle)
        if self._metrics is None:
            self._metrics = acquire_metrics_logger(self.run_dir, first_step=step)
        self._metrics.log(step, metrics)
        _log_to_bridge(context.state, step, metrics)

    def on_train_end(self, context: Any) -> None:
        """Stop the callback's workers and close the metrics file."""
        close = getattr(self.callback, "close", None)
        if close is not None:
            close()
        if self._metrics is not None:
            release_metrics_logger(self.run_dir)
            self._metrics = None


def _log_to_bridge(state: Any, step: int, metrics: dict[str, float]) -> None:
    """Bridge's own loggers (each exists on one rank only, None elsewhere or when not configured)."""
    tensorboard = state.tensorboard_logger
    if tensorboard is not None:
        for name, value in metrics.items():
            tensorboard.add_scalar(name, value, step)
    wandb = state.wandb_logger
    if wandb is not None:
        wandb.log(dict(metrics), step=step)


class HeldOutLossBridgeCallback(_BridgeAdapter):
    """Logs `val/heldout_loss/token_mean` and `val/heldout_loss/seq_mean` after every Bridge validation.

    Args:
        callback: the configured `HeldOutLossCallback`.
        tokenizer: the checkpoint's tokenizer (the project's interface, e.g. `HFTokenizer`; needs
            `vocab_size`).
        run_dir: where metrics.jsonl goes (e.g. the run's checkpoint directory).
        micro_batch_size: held-out sequences per forward pass.
    """

    def __init__(
        self,
        callback: HeldOutLossCallback,
        tokenizer: Tokenizer,
        *,
        run_dir: str | Path,
        micro_batch_size: int = 8,
    ) -> None:
        super().__init__(callback, tokenizer, run_dir=run_dir, micro_batch_size=micro_batch_size)


class PassAtKBridgeCallback(_BridgeAdapter):
    """Logs `val/<bench>/pass@<k>`, maj@k, mean@n, no-answer rate and completion length after every Bridge
    validation; graded samples go to `<run_dir>/eval/step_N/`. Generation needs pipeline parallelism 1.

    Args:
        callback: the configured `PassAtKCallback`.
        tokenizer: the checkpoint's tokenizer (decodes completions; its EOS stops them; needs `vocab_size`).
        run_dir: where metrics.jsonl and the samples go.
        max_batch_size: completions per generation pass (KV-cache rows).
    """

    def __init__(
        self,
        callback: PassAtKCallback,
        tokenizer: Tokenizer,
        *,
        run_dir: str | Path,
        max_batch_size: int = 256,
    ) -> None:
        super().__init__(callback, tokenizer, run_dir=run_dir, max_batch_size=max_batch_size)
