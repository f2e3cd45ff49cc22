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

Attaching to NeMo 2 (`llm.finetune`): pass the adapters in the `nl.Trainer`'s callbacks::

    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo_quagmire.callbacks.heldout_loss import HeldOutLossCallback
    from nemo_quagmire.callbacks.passk import PassAtKCallback, select_benchmarks
    from nemo_quagmire.data.hf_tokenizer import HFTokenizer
    from nemo_quagmire.integrations.lightning import HeldOutLossLightningCallback, PassAtKLightningCallback
    from nemo_quagmire.rollout.base import SamplingParams
    from nemo_quagmire.trainer.build import math_prompt_fn

    tokenizer = HFTokenizer("/ckpt/base-hf")
    heldout = HeldOutLossCallback("data/sft/heldout.jsonl", tokenizer, prompt_template="chat")
    passk = PassAtKCallback(
        select_benchmarks(["math500", "aime24"], benchmarks_dir="data/benchmarks"),
        math_prompt_fn("chat", tokenizer),
        num_samples=16,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=2048),
    )
    trainer = nl.Trainer(
        devices=8,
        strategy=nl.MegatronStrategy(tensor_model_parallel_size=4),
        val_check_interval=100,
        callbacks=[
            HeldOutLossLightningCallback(heldout, tokenizer),
            PassAtKLightningCallback(passk, tokenizer),
        ],
    )
    llm.finetune(model=QuagmireGPTModel(config, tokenizer=...), data=..., trainer=trainer, ...)

`llm.GPTModel` has none of the hooks: `QuagmireGPTModel` above is a subclass that adds them. Under NeMo's
`MegatronStrategy` the module holds megatron-core `GPTModel` chunks, the model replica spans the
tensor/pipeline-parallel ranks, and so:

- `quagmire_data_parallel_group` returns `megatron.core.parallel_state.get_data_parallel_group()`;
- `quagmire_logprobs` runs the chunks through megatron's forward-only schedule on every TP/PP rank:
  `nemo_quagmire.megatron.logprobs.compute_logprobs(chunks, tokens, lengths, micro_batch_size=...)` does it
  for chunks whose forward is megatron's `(tokens, position_ids, attention_mask)`;
- `quagmire_generate` can use `nemo_quagmire.megatron.rollout_engine.MegatronRolloutEngine(chunks,
  model_cfg, pad_id=..., eos_id=...)` (pipeline parallelism 1; with Transformer Engine attention pass
  `equal_length_batches=True` to `PassAtKCallback`), or a vLLM server fed with exported weights.

This adapter is tested with a real Lightning Trainer on CPU (tests/integrations/test_lightning.py); NeMo
itself is not installed in the test environment (nemo-toolkit 2.7.3 needs numpy < 2 and transformers 4.57,
see the `[nemo]` extra), so the NeMo subclass above is a recipe, not tested code.

Lightning runs a sanity-check validation before training; the adapters skip it unless
`run_on_sanity_check=True` (Pass@k at n = 256 would double the first validation's cost for no record).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_quagmire.callbacks.heldout_loss import HeldOutLossCallback
from nemo_quagmire.callbacks.passk import PassAtKCallback
from nemo_quagmire.trainer.callbacks import Callback, PolicyHandle, Tokenizer

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
    group = getattr(module, GROUP_HOOK, lambda: None)()
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    size = dist.get_world_size(group) if distributed else 1

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor.clone()
        if size > 1:
            on_gpu = dist.get_backend(group) == "nccl" and result.device.type == "cpu"
            reduced = result.cuda() if on_gpu else result
            dist.all_reduce(reduced, group=group)
            result = reduced.to(tensor.device)
        return result

    def all_gather_objects(obj: Any) -> list[Any]:
        if size == 1:
            return [obj]
        gathered: list[Any] = [None] * size
        dist.all_gather_object(gathered, obj, group=group)
        return gathered

    return PolicyHandle(
        step=trainer.global_step,
        run_dir=Path(trainer.default_root_dir),
        tokenizer=tokenizer,
        logprobs=getattr(module, LOGPROBS_HOOK, _missing(LOGPROBS_HOOK)),
        generate=getattr(module, GENERATE_HOOK, _missing(GENERATE_HOOK)),
        all_reduce_sum=all_reduce_sum,
        all_gather_objects=all_gather_objects,
        data_parallel_rank=rank,
        data_parallel_size=size,
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
        for name, value in self.callback.on_validation(handle).items():
            # Every rank holds the same, already reduced value; sync_dist (a mean of equal values) only keeps
            # Lightning from warning that epoch-level metrics are not synchronised.
            pl_module.log(name, float(value), on_step=False, on_epoch=True, sync_dist=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        close = getattr(self.callback, "close", None)
        if close is not None:
            close()


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
