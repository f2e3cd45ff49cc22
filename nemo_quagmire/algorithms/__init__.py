"""GRPO math: advantage estimators and policy losses (pure torch, no framework imports).

``advantages`` turns per-completion rewards and explicit group ids into advantages (registry of estimators);
``losses`` holds the clipped policy-gradient loss (an object built once from the run's settings) whose
reductions take explicit global normalizers, so micro-batch and data-parallel splits sum to the full-batch
loss and gradient, and whose metrics say how they combine over such splits.
"""

from nemo_quagmire.algorithms.advantages import (
    available_advantage_estimators,
    compute_advantages,
    group_has_signal,
    register_advantage_estimator,
)
from nemo_quagmire.algorithms.losses import (
    AGG_MODES,
    KL_ESTIMATORS,
    ClippedPolicyLoss,
    Metric,
    aggregate_loss,
    count_valid,
    kl_penalty,
    pool_metrics,
)

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "ClippedPolicyLoss",
    "Metric",
    "aggregate_loss",
    "available_advantage_estimators",
    "compute_advantages",
    "count_valid",
    "group_has_signal",
    "kl_penalty",
    "pool_metrics",
    "register_advantage_estimator",
]
