"""Clipped policy-gradient loss for GRPO-family training, with explicit global normalizers.

A training step splits one batch into micro-batches and data-parallel ranks, and neither the gradient nor the
logged metrics may depend on the split. Two rules make that hold:

- **Losses divide by global counts.** Mean-style reductions computed per micro-batch would give a micro-batch
  with few tokens the same weight as one with many, so every reduction divides by a *global* count passed in
  by the caller (``global_num_tokens``, ``global_num_seqs``), and the losses of all micro-batches on all
  ranks SUM to the full-batch loss. The trainer computes the counts with :func:`count_valid` per
  micro-batch and sums them (all-reduce SUM across data-parallel ranks).
- **Metrics say how they combine.** Each metric is a :class:`Metric`: a token or sequence mean with its
  count, a sum, or a max. :func:`pool_metrics` combines those of micro-batches and ranks into the values of
  the whole batch (weighted means, sums, maxes) without a table of names on the caller's side.

Gradients must then be SUMMED across ranks: if the data-parallel wrapper averages them (torch DDP does;
megatron-core DDP does unless ``calculate_per_token_loss`` is set), multiply the loss by the DP world size.

:class:`ClippedPolicyLoss` is built once from the run's settings, which it checks in its constructor, and is
then called per micro-batch with tensors only. Padding positions may hold anything (even values whose ``exp``
overflows): they are replaced by neutral values before any arithmetic, so they reach neither the loss, nor
the gradient, nor a metric.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from types import MappingProxyType
from typing import ClassVar, Literal, get_args

import torch

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "METRIC_REDUCTIONS",
    "AggMode",
    "ClippedPolicyLoss",
    "KLEstimator",
    "Metric",
    "MetricReduction",
    "aggregate_loss",
    "count_valid",
    "kl_penalty",
    "pool_metrics",
]

KLEstimator = Literal["k1", "k2", "k3"]
AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
MetricReduction = Literal["mean", "sum", "max"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
AGG_MODES: tuple[str, ...] = get_args(AggMode)
METRIC_REDUCTIONS: tuple[str, ...] = get_args(MetricReduction)

Normalizer = float | torch.Tensor


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _check_shape(name: str, tensor: torch.Tensor, shape: torch.Size, ref: str) -> None:
    if tensor.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but {ref} has {tuple(shape)}; pass it padded like {ref}"
        )


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman,
    http://joschu.net/blog/kl-approx.html). With ``x = log pi_ref - log pi``:

    - ``k1 = -x``: unbiased, high variance, can be negative;
    - ``k2 = x^2 / 2``: biased, low variance, >= 0;
    - ``k3 = exp(x) - x - 1``: unbiased, low variance, >= 0 (used by GRPO, arXiv 2402.03300).

    Args:
        logprobs: Float[...], log pi of the sampled tokens.
        ref_logprobs: Float[...], log pi_ref of the same tokens, same shape.
        estimator: ``k1``, ``k2`` or ``k3``.

    Returns:
        Float[...], elementwise; no masking.
    """
    _check_choice(estimator, KL_ESTIMATORS, "KL estimator")
    _check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs")
    return _kl_penalty(logprobs, ref_logprobs, estimator)


def _kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(log_ratio) - log_ratio  # expm1 keeps k3 accurate near x = 0


def count_valid(
    mask: torch.Tensor, truncated: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local normalizers of a (micro-)batch; summed over micro-batches and ranks they give the global ones.

    Args:
        mask: [B, T], nonzero at tokens that count in the loss.
        truncated: Bool[B] or None; sequences marked True are left out (pass it exactly when the loss
            masks truncated sequences, ``ClippedPolicyLoss(mask_truncated=True)``).

    Returns:
        ``(num_tokens, num_seqs)``: 0-dim long tensors; a sequence counts when it keeps at least one token.
    """
    valid = _effective_mask(mask, truncated)
    return valid.sum(), valid.any(dim=-1).sum()


def _check_truncated(truncated: torch.Tensor, batch_size: int) -> None:
    if truncated.shape != (batch_size,) or truncated.dtype != torch.bool:
        raise ValueError(
            f"truncated must be a bool tensor [B] = [{batch_size}], got shape {tuple(truncated.shape)} "
            f"dtype {truncated.dtype}; pass one flag per sequence"
        )


def _effective_mask(mask: torch.Tensor, truncated: torch.Tensor | None) -> torch.Tensor:
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    valid = mask.bool()
    if truncated is None:
        return valid
    _check_truncated(truncated, mask.shape[0])
    return valid & ~truncated[:, None]


def _check_normalizer(value: Normalizer | None, name: str) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    elif not isinstance(value, Real) or not value > 0:  # tensors are not checked: that would sync the device
        raise ValueError(
            f"{name} must be a positive number, got {value!r}; pass the count summed over all micro-batches "
            "and data-parallel ranks (see count_valid), and skip steps without any valid token"
        )


def _normalizer(value: Normalizer | None, local: torch.Tensor) -> Normalizer:
    if value is None:
        return local.clamp_min(1)  # an empty batch has a zero numerator, so its loss is 0
    return value.reshape(()) if isinstance(value, torch.Tensor) else value


def _check_agg(agg: str, token_sum_normalizer: float | None) -> None:
    _check_choice(agg, AGG_MODES, "loss aggregation mode")
    if (agg == "seq-mean-token-sum-norm") != (token_sum_normalizer is not None):
        raise ValueError(
            f"token_sum_normalizer={token_sum_normalizer!r} with agg={agg!r}: seq-mean-token-sum-norm needs "
            "it (e.g. the max response length) and the other modes do not take it"
        )
    if token_sum_normalizer is not None and not token_sum_normalizer > 0:
        raise ValueError(f"token_sum_normalizer must be > 0, got {token_sum_normalizer}")


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    agg: AggMode = "token-mean",
    *,
    global_num_tokens: Normalizer | None = None,
    global_num_seqs: Normalizer | None = None,
    token_sum_normalizer: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar that sums correctly over micro-batches and ranks.

    With ``l_it`` the loss of token t of sequence i, ``m_it`` the mask, ``|o_i| = sum_t m_it``:

    - ``token-mean`` (DAPO, arXiv 2503.14476): ``sum_it m_it l_it / global_num_tokens``. Each token weighs the
      same, so long completions are not down-weighted.
    - ``seq-mean-token-mean`` (original GRPO): ``sum_i (sum_t m_it l_it / |o_i|) / global_num_seqs``.
    - ``seq-mean-token-sum-norm`` (Dr.GRPO, arXiv 2503.20783): ``sum_i (sum_t m_it l_it / C) /
      global_num_seqs`` with a constant ``C = token_sum_normalizer`` (e.g. the max response length), which
      removes the length bias of the per-sequence mean.

    Args:
        per_token: Float[B, T]; values at masked positions are ignored (even inf/NaN).
        mask: [B, T], nonzero at valid tokens.
        agg: One of :data:`AGG_MODES`.
        global_num_tokens: Valid tokens in the whole step (all micro-batches, all ranks); default this
            call's count. Used by ``token-mean``.
        global_num_seqs: Sequences with at least one valid token in the whole step; default this call's
            count. Used by the ``seq-mean-*`` modes.
        token_sum_normalizer: The constant ``C``; required by, and only allowed with,
            ``seq-mean-token-sum-norm``.

    Returns:
        0-dim loss.

    Raises:
        ValueError: for an unknown mode, a missing or misplaced ``token_sum_normalizer``, a non-positive
            normalizer or mismatched shapes.
    """
    _check_agg(agg, token_sum_normalizer)
    _check_normalizer(global_num_tokens, "global_num_tokens")
    _check_normalizer(global_num_seqs, "global_num_seqs")
    _check_shape("per_token", per_token, mask.shape, "mask")
    return _aggregate(
        per_token, _effective_mask(mask, None), agg, global_num_tokens, global_num_seqs, token_sum_normalizer
    )


def _aggregate(
    per_token: torch.Tensor,
    valid: torch.Tensor,
    agg: AggMode,
    global_num_tokens: Normalizer | None,
    global_num_seqs: Normalizer | None,
    token_sum_normalizer: float | None,
) -> torch.Tensor:
    """:func:`aggregate_loss` on checked arguments; ``valid`` is Bool[B, T]."""
    masked = torch.where(valid, per_token, torch.zeros_like(per_token))
    if agg == "token-mean":
        return masked.sum() / _normalizer(global_num_tokens, valid.sum())
    seq_tokens = valid.sum(dim=-1)  # [B]
    if agg == "seq-mean-token-mean":
        seq_loss = masked.sum(dim=-1) / seq_tokens.clamp_min(1)  # [B]
    else:
        seq_loss = masked.sum(dim=-1) / token_sum_normalizer  # [B]
    return seq_loss.sum() / _normalizer(global_num_seqs, (seq_tokens > 0).sum())


# ---------------------------------------------------------------------------------------------------------
# Metrics that combine exactly over micro-batches and ranks
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One metric of a (micro-)batch, in the form that combines exactly over micro-batches and ranks.

    ``value`` reads on its own as this batch's figure; ``reduction`` says how the figures of several batches
    combine (:func:`pool_metrics`):

    - ``mean``: the mean over ``weight`` items (tokens or sequences); batches combine to
      ``sum(value * weight) / sum(weight)``, the mean over all their items (not a mean of batch means);
    - ``sum``: added (counts, the loss itself);
    - ``max``: the largest (an all-reduce MAX across data-parallel ranks).

    Attributes:
        value: 0-dim, detached.
        reduction: ``mean``, ``sum`` or ``max``.
        weight: 0-dim count behind a ``mean``; None for the other reductions.
    """

    value: torch.Tensor
    reduction: MetricReduction = "sum"
    weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_choice(self.reduction, METRIC_REDUCTIONS, "metric reduction")
        if (self.reduction == "mean") != (self.weight is not None):
            raise ValueError(
                f"a {self.reduction!r} metric {'needs' if self.reduction == 'mean' else 'takes no'} weight "
                "(the count of items a mean is over)"
            )


AllReduce = Callable[[torch.Tensor, Literal["sum", "max"]], torch.Tensor]


def pool_metrics(
    parts: Sequence[Mapping[str, Metric | torch.Tensor | float]], all_reduce: AllReduce | None = None
) -> dict[str, float]:
    """The metrics of a whole batch from those of its micro-batches (and, with ``all_reduce``, its ranks).

    Means are weighted by their counts, sums added, maxes maxed; a plain tensor or number is a sum. The sums
    (each mean's ``value * weight`` and ``weight`` included) travel in one stacked tensor, the maxes in
    another, so a data-parallel reduction is two all-reduces; a mean divides once, at the end (Python float).

    Args:
        parts: the metrics of each micro-batch; every part names the same metrics with the same reductions.
        all_reduce: ``all_reduce(tensor, "sum" | "max") -> tensor`` reducing over data-parallel ranks (every
            rank passes the same names in the same order), or None for a single rank.

    Returns:
        ``{name: value}`` of the whole batch; a mean over zero items is 0.
    """
    if not parts:
        raise ValueError("pool_metrics needs the metrics of at least one micro-batch")
    metrics = [{name: _as_metric(value) for name, value in part.items()} for part in parts]
    layout = {name: metric.reduction for name, metric in metrics[0].items()}
    for part in metrics[1:]:
        if {name: metric.reduction for name, metric in part.items()} != layout:
            raise ValueError(
                f"micro-batches report different metrics: {sorted(layout)} vs {sorted(part)}; every "
                "micro-batch must report the same names with the same reductions"
            )
    summed = [name for name, reduction in layout.items() if reduction != "max"]
    means = [name for name, reduction in layout.items() if reduction == "mean"]
    maxed = [name for name, reduction in layout.items() if reduction == "max"]

    def reduce(rows: list[list[torch.Tensor]], op: Literal["sum", "max"]) -> list[float]:
        if not rows[0]:
            return []
        stacked = torch.stack([torch.stack([x.reshape(()) for x in row]) for row in rows])  # [parts, K]
        total = stacked.sum(0) if op == "sum" else stacked.amax(0)
        return (total if all_reduce is None else all_reduce(total, op)).tolist()

    sums = reduce(
        [
            [part[n].value * part[n].weight if n in means else part[n].value for n in summed]
            + [part[n].weight for n in means]
            for part in metrics
        ],
        "sum",
    )
    maxes = reduce([[part[n].value for n in maxed] for part in metrics], "max")
    result = dict(zip(summed, sums[: len(summed)], strict=True)) | dict(zip(maxed, maxes, strict=True))
    for name, weight in zip(means, sums[len(summed) :], strict=True):
        result[name] /= max(weight, 1.0)
    return {name: result[name] for name in layout}


def _as_metric(value: Metric | torch.Tensor | float) -> Metric:
    return value if isinstance(value, Metric) else Metric(torch.as_tensor(value))


# ---------------------------------------------------------------------------------------------------------
# The clipped policy loss
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClippedPolicyLoss:
    """PPO clipped surrogate with asymmetric clipping, optional dual clip, KL penalty and TIS correction.

    Per valid token, with ``r = exp(log pi - log pi_old)`` and advantage ``A``:

    - PPO (arXiv 1707.06347) with DAPO clip-higher bounds (arXiv 2503.14476)::

          l = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))

    - dual clip (Ye et al., arXiv 1912.09729), for ``A < 0`` only, bounds the loss when ``r`` explodes::

          l = min(l, -A dual_clip)

    - truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
      off-policy RL training"; verl ``tis_imp_ratio_cap``), when the rollout engine's log-probs differ from
      the trainer's (e.g. FP8 rollouts)::

          l = l * min(exp(log pi_old - log pi_rollout), tis_cap)       # weight detached

    - KL penalty to a reference policy (not TIS-weighted)::

          l = l + kl_coef * kl_penalty(log pi, log pi_ref, kl_estimator)

    then ``l`` is reduced by :func:`aggregate_loss` with ``agg``. Gradients flow through ``logprobs`` only;
    the other inputs are detached.

    DAPO overlong filtering: with ``mask_truncated=True`` the sequences flagged ``truncated`` contribute
    nothing, and the default normalizers count only the kept sequences and tokens. A trainer splitting the
    batch must compute the global normalizers the same way: ``count_valid(mask, truncated)``.

    The settings are checked once, here; a call checks only its tensors. The defaults are those of
    ``GRPOConfig`` (a test keeps them equal).

    Attributes:
        clip_low: Lower clip range, in [0, 1): the ratio is clamped at ``1 - clip_low``.
        clip_high: Upper clip range, >= 0 (0.2 is PPO's; DAPO's clip-higher uses 0.28).
        dual_clip: The constant ``c > 1`` of dual clip (3.0 in the paper), or None to disable.
        agg: Loss aggregation mode, see :func:`aggregate_loss`.
        token_sum_normalizer: Dr.GRPO's constant, see :func:`aggregate_loss`.
        kl_coef: Weight of the KL penalty, >= 0; > 0 needs ``ref_logprobs`` at every call.
        kl_estimator: ``k1``, ``k2`` or ``k3``, see :func:`kl_penalty`.
        mask_truncated: Leave the ``truncated`` sequences out of the loss (every call then needs them).
        tis_cap: Cap of the TIS weight (> 0, e.g. 2.0), or None; set, every call needs ``rollout_logprobs``.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    agg: AggMode = "token-mean"
    token_sum_normalizer: float | None = None
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    mask_truncated: bool = False
    tis_cap: float | None = None

    #: How each metric a call may return combines over micro-batches and ranks (see :class:`Metric`).
    METRIC_REDUCTIONS: ClassVar[Mapping[str, MetricReduction]] = MappingProxyType(
        {
            "clip_frac_low": "mean",
            "clip_frac_high": "mean",
            "dual_clip_frac": "mean",
            "approx_kl": "mean",
            "ratio_mean": "mean",
            "ratio_max": "max",
            "num_tokens": "sum",
            "kl": "mean",
            "entropy": "mean",
            "tis_weight_mean": "mean",
            "truncated_frac": "mean",
        }
    )

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(
                f"clip_low must be in [0, 1) so that 1 - clip_low > 0, got {self.clip_low}; typical: 0.2"
            )
        if not self.clip_high >= 0:
            raise ValueError(
                f"clip_high must be >= 0, got {self.clip_high}; typical: 0.2 (DAPO clip-higher: 0.28)"
            )
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(
                f"dual_clip must be > 1 (3.0 in the paper) or None to disable, got {self.dual_clip}"
            )
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ValueError(
                f"tis_cap must be > 0 or None to disable, got {self.tis_cap}; verl's examples use 2.0"
            )
        _check_choice(self.kl_estimator, KL_ESTIMATORS, "KL estimator")
        _check_agg(self.agg, self.token_sum_normalizer)

    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        global_num_tokens: Normalizer | None = None,
        global_num_seqs: Normalizer | None = None,
        ref_logprobs: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
        truncated: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Metric]]:
        """The loss of one (micro-)batch and its metrics.

        Args:
            logprobs: Float[B, T], log pi of the sampled tokens under the policy being trained.
            old_logprobs: Float[B, T], log pi_old of the same tokens (the policy that owns the advantages).
            advantages: Float[B] (one per sequence, broadcast over tokens) or Float[B, T].
            mask: [B, T], nonzero at response tokens that count in the loss.
            global_num_tokens: See :func:`aggregate_loss`; None = this call is the whole batch.
            global_num_seqs: See :func:`aggregate_loss`; None = this call is the whole batch.
            ref_logprobs: Float[B, T] log pi_ref, or None. Required when ``kl_coef > 0``; with
                ``kl_coef == 0`` it only feeds the ``kl`` metric.
            rollout_logprobs: Float[B, T] log-probs reported by the rollout engine; exactly when ``tis_cap``.
            truncated: Bool[B], True for completions cut at the max length, or None (required with
                ``mask_truncated``).
            entropy: Float[B, T] per-token policy entropy, or None; only reported as a metric.

        Returns:
            ``(loss, metrics)``. ``loss`` is 0-dim. ``metrics`` maps names to :class:`Metric` (detached,
            float32 or float64 for float64 inputs; reductions as in :attr:`METRIC_REDUCTIONS`). Token means
            are over the tokens that count in the loss (``num_tokens`` of them):

            - ``clip_frac_low``: fraction of tokens with ``A < 0`` and ``r < 1 - clip_low`` (the clipped term
              is chosen; zero gradient). ``clip_frac_high``: ``A > 0`` and ``r > 1 + clip_high``.
            - ``dual_clip_frac``: ``A < 0`` and ``r > dual_clip`` (0 when dual clip is off).
            - ``approx_kl``: k3 estimate of KL(pi_old || pi), mean of ``r - 1 - log r``.
            - ``ratio_mean``; ``ratio_max`` (a max; 0 without tokens); ``num_tokens`` (a sum).
            - ``kl`` (if ``ref_logprobs``): mean ``kl_penalty`` before ``kl_coef``; ``entropy`` (if given);
              ``tis_weight_mean`` (if TIS); ``truncated_frac`` (if ``truncated``): fraction of the sequences
              with response tokens that are truncated, counted before masking (a mean over sequences).

        Raises:
            ValueError: for an input the settings need but which is missing (``ref_logprobs``,
                ``truncated``, ``rollout_logprobs``), ``rollout_logprobs`` without ``tis_cap``, mismatched
                shapes and non-positive normalizers.
        """
        if self.kl_coef > 0 and ref_logprobs is None:
            raise ValueError(f"kl_coef={self.kl_coef} needs ref_logprobs; pass them or set kl_coef=0")
        if self.mask_truncated and truncated is None:
            raise ValueError(
                "mask_truncated=True needs truncated (Bool[B]); pass it or set mask_truncated=False"
            )
        if (rollout_logprobs is None) != (self.tis_cap is None):
            raise ValueError(
                "the TIS correction needs both rollout_logprobs and tis_cap; pass rollout_logprobs exactly "
                f"when tis_cap is set (got rollout_logprobs={'set' if rollout_logprobs is not None else None}"
                f", tis_cap={self.tis_cap})"
            )
        if logprobs.ndim != 2 or logprobs.numel() == 0:
            raise ValueError(f"logprobs must be a non-empty [B, T] tensor, got shape {tuple(logprobs.shape)}")
        shape = logprobs.shape
        for name, tensor in [
            ("old_logprobs", old_logprobs),
            ("mask", mask),
            ("ref_logprobs", ref_logprobs),
            ("rollout_logprobs", rollout_logprobs),
            ("entropy", entropy),
        ]:
            if tensor is not None:
                _check_shape(name, tensor, shape, "logprobs")
        if truncated is not None:
            _check_truncated(truncated, shape[0])
        if advantages.shape not in (shape, shape[:1]):
            raise ValueError(
                f"advantages must be [B] = [{shape[0]}] or [B, T] = {list(shape)}, "
                f"got {tuple(advantages.shape)}"
            )
        _check_normalizer(global_num_tokens, "global_num_tokens")
        _check_normalizer(global_num_seqs, "global_num_seqs")

        valid = _effective_mask(mask, truncated if self.mask_truncated else None)  # [B, T]
        zeros = torch.zeros_like(logprobs)

        def valid_only(x: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, x, zeros)

        log_ratio = valid_only(logprobs - old_logprobs.detach())  # padding -> ratio 1, so exp cannot overflow
        ratio = torch.exp(log_ratio)  # [B, T]
        adv = advantages.detach().to(logprobs.dtype)
        adv = valid_only(adv[:, None].expand(shape) if adv.ndim == 1 else adv)  # [B, T]
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1 - self.clip_low, 1 + self.clip_high)
        per_token = torch.maximum(unclipped, clipped)
        if self.dual_clip is not None:
            per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * self.dual_clip), per_token)
        if self.tis_cap is not None:
            tis_weight = torch.exp(valid_only(old_logprobs - rollout_logprobs).detach()).clamp(
                max=self.tis_cap
            )
            per_token = per_token * tis_weight
        if ref_logprobs is not None:
            kl = _kl_penalty(
                valid_only(logprobs), valid_only(ref_logprobs.detach()), self.kl_estimator
            )  # [B, T]
            if self.kl_coef > 0:
                per_token = per_token + self.kl_coef * kl
        loss = _aggregate(
            per_token, valid, self.agg, global_num_tokens, global_num_seqs, self.token_sum_normalizer
        )

        num_tokens = valid.sum()
        metric_dtype = torch.promote_types(logprobs.dtype, torch.float32)  # bf16 cannot even count past 256
        token_count = num_tokens.to(metric_dtype)

        def token_mean(x: torch.Tensor) -> Metric:
            mean = (torch.where(valid, x, 0).to(metric_dtype).sum() / num_tokens.clamp_min(1)).detach()
            return Metric(mean, "mean", token_count)

        dual_clipped = (
            (adv < 0) & (ratio > self.dual_clip) if self.dual_clip is not None else torch.zeros_like(valid)
        )
        metrics = {
            "clip_frac_low": token_mean((adv < 0) & (ratio < 1 - self.clip_low)),
            "clip_frac_high": token_mean((adv > 0) & (ratio > 1 + self.clip_high)),
            "dual_clip_frac": token_mean(dual_clipped),
            "approx_kl": token_mean(ratio - 1 - log_ratio),
            "ratio_mean": token_mean(ratio),
            "ratio_max": Metric(torch.where(valid, ratio, 0).amax().detach().to(metric_dtype), "max"),
            "num_tokens": Metric(token_count),
        }
        if ref_logprobs is not None:
            metrics["kl"] = token_mean(kl)
        if entropy is not None:
            metrics["entropy"] = token_mean(entropy.detach())
        if self.tis_cap is not None:
            metrics["tis_weight_mean"] = token_mean(tis_weight)
        if truncated is not None:
            has_tokens = mask.bool().any(dim=-1)  # [B]
            num_seqs = has_tokens.sum()
            truncated_frac = (truncated & has_tokens).sum().to(metric_dtype) / num_seqs.clamp_min(1)
            metrics["truncated_frac"] = Metric(truncated_frac, "mean", num_seqs.to(metric_dtype))
        return loss, metrics
