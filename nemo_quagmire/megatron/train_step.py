"""One optimizer step on megatron-core: any per-token loss through megatron's forward/backward schedule.

The trainer knows nothing about RL. It takes a loss callable ``loss_fn(logprobs, micro_batch) -> (loss,
metrics)`` where ``logprobs`` are the aligned ``[b, T]`` log-probs of the micro-batch's ``tokens`` (computed
by the same code as ``logprobs.compute_logprobs``, so importance ratios are exactly 1 before an update).

Normalisation contract: the loss of each micro-batch is already divided by *global* counts (tokens or
sequences of the whole step, over all micro-batches and data-parallel ranks), so the step's loss is the SUM of
the micro-batch losses over micro-batches and DP ranks. Megatron by default divides each micro-batch loss by
the number of micro-batches and averages gradients over DP, which would shrink the gradient by ``M x DP``.
The model is built with ``calculate_per_token_loss=True``, which stops both; the loss function hands the
schedule a 3-tuple (so no per-micro-batch division happens) and the gradient finaliser is given no token
count (so no per-token division happens either). The gradient is therefore exactly that of the summed loss.

Metrics combine as each declares (``algorithms.losses.Metric``: weighted means, sums, maxes; a plain value
is a sum) over micro-batches and DP ranks, so a token mean is the mean over all the step's tokens and a max
the step's max, whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nemo_quagmire.algorithms.losses import Metric, pool_metrics
from nemo_quagmire.config.optim import OptimConfig
from nemo_quagmire.megatron.logprobs import (
    run_schedule,
    token_entropy_from_logits,
    token_logprobs_from_logits,
)

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

__all__ = ["LossFn", "Trainer", "setup_training", "train_step"]

MicroBatch = Mapping[str, torch.Tensor]
# loss_fn(logprobs, micro_batch) -> (loss, metrics); with train_step(with_entropy=True) also entropy=...
LossFn = Callable[..., tuple[torch.Tensor, Mapping[str, Metric | float | torch.Tensor]]]


@dataclass
class Trainer:
    """What a training step needs: the DDP-wrapped chunks, megatron's optimizer and LR scheduler."""

    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler

    @property
    def step(self) -> int:
        """Optimizer steps taken (the scheduler's count; restored with a checkpoint)."""
        return self.scheduler.num_steps


def setup_training(model: Sequence[torch.nn.Module], optim_cfg: OptimConfig) -> Trainer:
    """Wrap ``build_model``'s chunks in megatron DDP and create the optimizer and LR scheduler.

    Gradients accumulate in fp32 buffers and are reduced once per step (no overlap: CPU/gloo-safe and simple).
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    if not config.calculate_per_token_loss:
        raise ValueError(
            "the model must be built by nemo_quagmire.megatron.model.build_model "
            "(calculate_per_token_loss=True), or losses would be rescaled by megatron"
        )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
    )
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk) for chunk in model]

    def finalize_grads(chunks: list[torch.nn.Module], num_tokens: torch.Tensor | None, **kwargs: Any) -> None:
        finalize_model_grads(chunks, None, **kwargs)  # losses are globally normalised: no per-token division

    config.finalize_model_grads_func = finalize_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim_cfg.lr,
            min_lr=optim_cfg.min_lr,
            weight_decay=optim_cfg.weight_decay,
            adam_beta1=optim_cfg.adam_beta1,
            adam_beta2=optim_cfg.adam_beta2,
            adam_eps=optim_cfg.adam_eps,
            clip_grad=optim_cfg.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
        ),
        wrapped,
    )
    decay_steps = optim_cfg.lr_decay_steps or optim_cfg.lr_warmup_steps + 1
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        lr_warmup_steps=optim_cfg.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, optim_cfg.lr_warmup_steps + 1),
        lr_decay_style=optim_cfg.lr_decay_style,
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    return Trainer(model=wrapped, optimizer=optimizer, scheduler=scheduler)


def train_step(
    trainer: Trainer,
    micro_batches: Sequence[MicroBatch],
    loss_fn: LossFn,
    *,
    temperature: float = 1.0,
    variable_shapes: bool = False,
    with_entropy: bool = False,
) -> dict[str, float]:
    """Forward/backward over this rank's micro-batches, then one optimizer and LR-scheduler step.

    Args:
        trainer: from :func:`setup_training`.
        micro_batches: this data-parallel rank's micro-batches; each a mapping with ``tokens`` (LongTensor
            ``[b, T]``, right-padded, one shape for all micro-batches unless ``variable_shapes``), optional
            ``segment_ids`` (packed rows, see ``logprobs``) plus whatever ``loss_fn`` reads (on the model's
            device). Every rank of a TP/PP group passes the same micro-batches.
        loss_fn: ``loss_fn(logprobs [b, T], micro_batch) -> (scalar loss, metrics)``, the loss normalised by
            global counts (module docstring); each metric a ``Metric`` or a plain value (a sum). Padding
            positions of ``logprobs`` are not masked: the loss's own mask must exclude them.
        temperature: logits are divided by it before the log-softmax (the sampling temperature).
        variable_shapes: allow micro-batches of different shapes (only without pipeline parallelism).
        with_entropy: also pass ``loss_fn`` the per-token entropy of the policy, ``entropy=[b, T]`` (aligned
            like ``logprobs``), computed without gradient from the same logits: it costs a bounded transient
            and one pass over the logits, never activations, and leaves the loss and gradient unchanged.

    Returns:
        On every rank: ``loss`` (summed over micro-batches and DP ranks) and each ``loss_fn`` metric combined
        as it declares; ``grad_norm`` before clipping (not computed when clip_grad is 0: then NaN or 0);
        ``lr`` used by this step; ``update_successful`` (1.0 or 0.0: megatron skips a step whose gradient is
        not finite).
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()

    def loss_func_for(micro_batch: MicroBatch) -> Callable[[torch.Tensor], tuple]:
        def loss_func(logits: torch.Tensor) -> tuple:
            extra = {}
            if with_entropy:  # before the log-probs: their cross-entropy may overwrite the logits in place
                extra["entropy"] = token_entropy_from_logits(logits, temperature=temperature)
            logprobs, _ = token_logprobs_from_logits(logits, micro_batch["tokens"], temperature=temperature)
            loss, metrics = loss_fn(logprobs, micro_batch, **extra)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar tensor loss, got {loss!r:.80}")
            # Clone what we report: the schedule may rescale the loss tensor in place.
            reported = {"loss": Metric(loss.detach().clone().float())}
            reported |= {name: _float32(value) for name, value in metrics.items()}
            no_tokens = torch.zeros((), dtype=torch.int, device=logits.device)
            return loss, no_tokens, reported

        return loss_func

    reported = run_schedule(
        trainer.model, micro_batches, loss_func_for, forward_only=False, variable_shapes=variable_shapes
    )
    lr = trainer.optimizer.param_groups[0]["lr"]
    update_successful, grad_norm, _ = trainer.optimizer.step()
    if update_successful:
        trainer.scheduler.step(increment=1)
    metrics = _reduce_over_microbatches_and_ranks(reported)
    metrics |= {
        "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
        "lr": float(lr),
        "update_successful": float(bool(update_successful)),
    }
    return metrics


def _float32(value: Metric | float | torch.Tensor) -> Metric:
    """A reported metric as a float32 ``Metric`` (a plain value is a sum) of its own, detached storage."""
    if not isinstance(value, Metric):
        return Metric(torch.as_tensor(value).detach().clone().float())
    weight = None if value.weight is None else value.weight.detach().clone().float()
    return Metric(value.value.detach().clone().float(), value.reduction, weight)


def _reduce_over_microbatches_and_ranks(reported: list[dict[str, Metric]]) -> dict[str, float]:
    """Combine per-micro-batch metrics on the last pipeline stage, all-reduce over DP (SUM for sums and
    means, MAX for maxes), share with all stages."""
    from megatron.core import parallel_state as ps

    def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        dist.all_reduce(tensor, op=reduce_op, group=ps.get_data_parallel_group())
        return tensor

    summed: dict[str, float] = {}
    if ps.is_pipeline_last_stage():
        summed = pool_metrics(reported, all_reduce)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        shared = [summed]
        dist.broadcast_object_list(
            shared,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
        summed = shared[0]
    return summed
