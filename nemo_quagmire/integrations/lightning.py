"""Lightning callbacks for the held-out loss and the Pass@k evaluator, so a NeMo 2 run can log both.

Why adapters and not new callbacks: `HeldOutLossCallback` and `PassAtKCallback` see the policy only through
a `PolicyHandle` (log-probs, generation, data-parallel reductions), never through a trainer. A Lightning
run - a NeMo 2 SFT run (`nemo.collections.llm.finetune`, nemo-toolkit 2.7.x on Lightning 2.4+) or any
`LightningModule` - attaches them by providing those functions as methods of its module. The numbers are
then exactly those the project's own SFT and GRPO trainers log, under the same names
(nemo_quagmire/METRICS.md), at the end of every Lightning validation epoch.

Hooks the LightningModule provides:

- `quagmire_logprobs(tokens, lengths) -> logprobs` (held-out loss): `tokens` Long[B, T] right-padded,
  `lengths` Long[B]; returns Float[B, T] with `[b, t] = log p(tokens[b, t] | tokens[b, :t])`, 0 at t = 0 and
  at padding. Collective: every rank of a model replica calls it with the same batch.
- `quagmire_generate(prompts, group_size, sampling) -> RolloutBatch` (Pass@k): `group_size` completions of
  each prompt (token-id lists), sampled with `nemo_quagmire.rollout.base.SamplingParams`, rows grouped by
  prompt, as `nemo_quagmire.rollout.base.RolloutBatch`.
- optional `quagmire_data_parallel_group() -> torch.distributed.ProcessGroup | None`: the group of ranks that
  hold different data (None or absent: every rank of the world is a data-parallel replica, as under DDP).
  Work is split over it and sums are all-reduced over it.

Attaching to NeMo 2 (`llm.finetune`): pass the adapters in the `nl.Trainer`'s callbacks; the full example
is docs/frameworks/nemo2.md.

`llm.GPTModel` has none of the hooks: `QuagmireGPTModel` (nemo_quagmire.integrations.nemo) is NeMo's model
with them, and `QuagmireHooks` is the mixin for any `llm.GPTModel` subclass (Llama, Mistral, Qwen...). They
run megatron's forward-only schedule for log-probs and sample among the tokenizer's ids only (NeMo pads the
vocabulary). CI's NeMo stage runs a real `llm.finetune` on CPU with both adapters (tests/integrations/
test_nemo.py); any other LightningModule is covered by tests/integrations/test_lightning.py.

Where the numbers go: Lightning's loggers (`pl_module.log`, so TensorBoard / W&B / the progress bar of the
run), and `<default_root_dir>/metrics.jsonl` on global rank 0, the file the predictor report reads
(`scripts/predict_report.py --sft-runs <default_root_dir>`); graded samples go to
`<default_root_dir>/eval/step_N/`. The first validation of a run replaces the file's records from its step
on (a resumed run rewrites what it redoes).

Lightning runs a sanity-check validation before training; the adapters skip it unless
`run_on_sanity_check=True` (Pass@k at n = 256 would double the first validation's cost for no record).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from nemo_quagmire.callbacks.heldout_loss import HeldOutLossCallback
from nemo_quagmire.callbacks.passk import PassAtKCallback
from nemo_quagmire.integrations.megatron_policy import policy_handle
from nemo_quagmire.integrations.run_metrics import acquire_metrics_logger, release_metrics_logger
from nemo_quagmire.trainer.callbacks import Callback, PolicyHandle, Tokenizer
from nemo_quagmire.trainer.metrics import MetricsLogger

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nemo_quagmire.integrations.lightning needs Lightning: pip install lightning (NeMo 2 brings it: the "
        "[nemo] extra)"
    ) from err

__all__ = [
    "GENERATE_HOOK",
    "GROUP_HOOK",
    "LOGPROBS_HOOK",
    "HeldOutLossLightningCallback",
    "PassAtKLightningCallback",
    "lightning_policy_handle",
]

LOGPROBS_HOOK = "quagmire_logprobs"
GENERATE_HOOK = "quagmire_generate"
GROUP_HOOK = "quagmire_data_parallel_group"


def lightning_policy_handle(
    trainer: pl.Trainer, module: pl.LightningModule, tokenizer: Tokenizer
) -> PolicyHandle:
    """The `PolicyHandle` of a LightningModule at the trainer's current step (hooks: module docstring)."""
    return policy_handle(
        step=trainer.global_step,
        run_dir=trainer.default_root_dir,
        tokenizer=tokenizer,
        logprobs=getattr(module, LOGPROBS_HOOK, _missing(LOGPROBS_HOOK)),
        generate=getattr(module, GENERATE_HOOK, _missing(GENERATE_HOOK)),
        group=getattr(module, GROUP_HOOK, lambda: None)(),
    )


def _missing(name: str) -> Callable[..., Any]:
    def hook(*args: Any) -> Any:
        raise TypeError(f"the LightningModule has no {name}() hook")

    return hook


class _LightningAdapter(pl.Callback):
    """Runs a project callback at the end of every Lightning validation epoch and logs its metrics."""

    required_hooks: tuple[str, ...] = ()

    def __init__(
        self, callback: Callback, tokenizer: Tokenizer, *, run_on_sanity_check: bool = False
    ) -> None:
        super().__init__()
        self.callback = callback
        self.tokenizer = tokenizer
        self.run_on_sanity_check = run_on_sanity_check
        self._metrics: MetricsLogger | None = None
        self._run_dir: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail before training if the module lacks a hook this callback needs."""
        if missing := [hook for hook in self.required_hooks if not callable(getattr(pl_module, hook, None))]:
            raise TypeError(
                f"{type(self).__name__} needs the LightningModule to define {missing}; "
                f"{type(pl_module).__name__} does not (see nemo_quagmire.integrations.lightning)"
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking and not self.run_on_sanity_check:
            return
        handle = lightning_policy_handle(trainer, pl_module, self.tokenizer)
        metrics = self.callback.on_validation(handle)
        for name, value in metrics.items():
            # Every rank holds the same, already reduced value; sync_dist (a mean of equal values) only keeps
            # Lightning from warning that epoch-level metrics are not synchronised.
            pl_module.log(name, float(value), on_step=False, on_epoch=True, sync_dist=True)
        if self._metrics is None:
            self._run_dir = handle.run_dir
            self._metrics = acquire_metrics_logger(handle.run_dir, first_step=handle.step)
        self._metrics.log(handle.step, metrics)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        close = getattr(self.callback, "close", None)
        if close is not None:
            close()
        if self._run_dir is not None:
            release_metrics_logger(self._run_dir)
            self._metrics = self._run_dir = None


class HeldOutLossLightningCallback(_LightningAdapter):
    """Logs `val/heldout_loss/token_mean` and `val/heldout_loss/seq_mean` at every validation epoch end.

    Args:
        callback: the configured `HeldOutLossCallback`.
        tokenizer: the module's tokenizer (the project's `Tokenizer` interface, e.g. `HFTokenizer`).
        run_on_sanity_check: also run during Lightning's sanity-check validation.
    """

    required_hooks = (LOGPROBS_HOOK,)

    def __init__(
        self, callback: HeldOutLossCallback, tokenizer: Tokenizer, *, run_on_sanity_check: bool = False
    ) -> None:
        super().__init__(callback, tokenizer, run_on_sanity_check=run_on_sanity_check)


class PassAtKLightningCallback(_LightningAdapter):
    """Logs `val/<bench>/pass@<k>`, maj@k, mean@n, no-answer rate and completion length, per benchmark and
    macro, at every validation epoch end; graded samples go to `<default_root_dir>/eval/step_N/`.

    Args:
        callback: the configured `PassAtKCallback`.
        tokenizer: the module's tokenizer (decodes completions; its EOS stops them).
        run_on_sanity_check: also run during Lightning's sanity-check validation.
    """

    required_hooks = (GENERATE_HOOK,)

    def __init__(
        self, callback: PassAtKCallback, tokenizer: Tokenizer, *, run_on_sanity_check: bool = False
    ) -> None:
        super().__init__(callback, tokenizer, run_on_sanity_check=run_on_sanity_check)
