"""Group-relative advantage estimators for GRPO-family training.

GRPO drops PPO's learned value function: the baseline for a completion is computed from the other completions
sampled for the same prompt (its *group*). The estimators differ only in how a reward is compared with its
group: GRPO standardises it, Dr.GRPO only centres it (the std division biases towards easy and hard
prompts), RLOO subtracts the mean of the *other* members, which keeps the baseline independent of the sample.

Groups come from explicit ``group_ids`` (like verl's ``uid``), never from comparing prompt tokens: the same
prompt can appear twice in a batch as two groups, and token comparison costs a sort over whole sequences.
Every group statistic is a scatter over a dense group index, so there is no Python loop over groups.

Estimators sit in a small registry so a config string selects one and a new one plugs in with a decorator;
``compute_advantages`` is the only lookup path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "AdvantageEstimator",
    "Groups",
    "available_advantage_estimators",
    "compute_advantages",
    "get_advantage_estimator",
    "group_has_signal",
    "register_advantage_estimator",
]


@dataclass(frozen=True)
class Groups:
    """Dense view of group membership: sample ``i`` belongs to group ``index[i]`` in ``[0, num_groups)``.

    Build it with :meth:`from_ids`; the per-group reductions return per-*sample* tensors (each sample gets
    its group's value), which is what every estimator needs.
    """

    index: torch.Tensor  # [N] long, dense group index
    num_groups: int
    size: torch.Tensor  # [N] long, number of members of each sample's group

    @classmethod
    def from_ids(cls, group_ids: torch.Tensor) -> Groups:
        """Map arbitrary (unsorted, non-contiguous, possibly negative) ids to a dense index."""
        unique_ids, index = torch.unique(group_ids, return_inverse=True)
        counts = torch.bincount(index, minlength=unique_ids.numel())  # [G]
        return cls(index=index, num_groups=unique_ids.numel(), size=counts[index])

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """[N] -> [N]: the sum of ``values`` over each sample's group."""
        totals = values.new_zeros(self.num_groups).index_add_(0, self.index, values)  # [G]
        return totals[self.index]

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """[N] -> [N]: the group mean of ``values``."""
        return self.sum(values) / self.size

    def std(self, values: torch.Tensor) -> torch.Tensor:
        """[N] -> [N]: the Bessel-corrected (n - 1) group std, as torch.std, verl and TRL; 0 for a group of
        one."""
        centered = values - self.mean(values)
        return (self.sum(centered.square()) / (self.size - 1).clamp_min(1)).sqrt()

    def has_signal(self, values: torch.Tensor) -> torch.Tensor:
        """[N] -> Bool[N]: False where every member of the sample's group has the same value."""
        inf = torch.full((self.num_groups,), float("inf"), dtype=values.dtype, device=values.device)
        high = (-inf).scatter_reduce(0, self.index, values, "amax", include_self=False)  # [G]
        low = inf.scatter_reduce(0, self.index, values, "amin", include_self=False)  # [G]
        return (high > low)[self.index]


class AdvantageEstimator(Protocol):
    """``(rewards [N], groups, *, eps) -> advantages [N]``.

    Groups without signal (all rewards equal, including groups of one) are set to exactly 0 by
    :func:`compute_advantages`, so an estimator need not special-case them.
    """

    def __call__(self, rewards: torch.Tensor, groups: Groups, *, eps: float) -> torch.Tensor: ...


_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator adding an estimator under ``name``.

    Raises:
        ValueError: if ``name`` is already registered (pick another name; estimators are never replaced).
    """

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in _ESTIMATORS:
            raise ValueError(
                f"advantage estimator {name!r} is already registered (by {_ESTIMATORS[name].__qualname__}); "
                "register the new one under a different name"
            )
        _ESTIMATORS[name] = fn
        return fn

    return decorator


def available_advantage_estimators() -> tuple[str, ...]:
    """Registered estimator names, sorted."""
    return tuple(sorted(_ESTIMATORS))


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered under ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        return _ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; known: {', '.join(available_advantage_estimators())}"
        ) from None


@register_advantage_estimator("grpo")
def grpo_advantages(rewards: torch.Tensor, groups: Groups, *, eps: float) -> torch.Tensor:
    """``A_i = (r_i - mean_g r) / (std_g r + eps)`` with the Bessel-corrected std (GRPO, arXiv 2402.03300)."""
    return (rewards - groups.mean(rewards)) / (groups.std(rewards) + eps)


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, groups: Groups, *, eps: float) -> torch.Tensor:
    """``A_i = r_i - mean_g r``: Dr.GRPO (arXiv 2503.20783) drops the std division, which up-weights prompts
    whose rewards barely vary. ``eps`` is unused."""
    return rewards - groups.mean(rewards)


@register_advantage_estimator("rloo")
def rloo_advantages(rewards: torch.Tensor, groups: Groups, *, eps: float) -> torch.Tensor:
    """``A_i = r_i - mean_{j != i} r_j`` (REINFORCE leave-one-out, Ahmadian et al. 2024, arXiv 2402.14740).
    ``eps`` is unused."""
    others_mean = (groups.sum(rewards) - rewards) / (groups.size - 1).clamp_min(1)
    return rewards - others_mean


def _validate(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if rewards.ndim != 1 or not rewards.is_floating_point():
        raise ValueError(
            f"rewards must be a 1-D float tensor [N], got shape {tuple(rewards.shape)} "
            f"dtype {rewards.dtype}; flatten per-sample rewards and convert with .float()"
        )
    if group_ids.shape != rewards.shape or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(
            f"group_ids must be an integer tensor shaped like rewards {tuple(rewards.shape)}, got shape "
            f"{tuple(group_ids.shape)} dtype {group_ids.dtype}; pass one group id per sample (torch.long)"
        )
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"rewards hold non-finite values at samples {bad[:10].tolist()}; drop or score those samples "
            "before computing advantages"
        )


def compute_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Per-sample advantages from group-relative baselines.

    Args:
        rewards: Float[N], one scalar reward per completion.
        group_ids: Long[N], the group (prompt) of each completion; any integers, in any order.
        estimator: Registered estimator name: ``grpo``, ``dr_grpo``, ``rloo`` or a custom one.
        eps: Added to the group std by ``grpo`` (must be > 0).

    Returns:
        Float[N] advantages, same dtype as ``rewards``. Groups whose rewards are all equal (including groups
        of one) get exactly 0, not float round-off from ``r - mean``. (verl gives a group of one ``A = r``.)

    Raises:
        ValueError: for an unknown estimator, a non-positive ``eps``, mismatched shapes, non-float rewards,
            non-integer group ids or non-finite rewards.
    """
    estimate = get_advantage_estimator(estimator)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it guards the std division), got {eps}; the usual value is 1e-6")
    _validate(rewards, group_ids)
    groups = Groups.from_ids(group_ids)
    advantages = estimate(rewards, groups, eps=eps)
    return torch.where(groups.has_signal(rewards), advantages, torch.zeros_like(advantages))


def group_has_signal(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Bool[N]: False where all rewards of the sample's group are equal (groups of one included).

    Such groups have zero advantage and contribute no gradient; DAPO's dynamic sampling (arXiv 2503.14476)
    drops them and samples more prompts instead.

    Args:
        rewards: Float[N].
        group_ids: Long[N].
    """
    _validate(rewards, group_ids)
    return Groups.from_ids(group_ids).has_signal(rewards)
