"""Advantage estimators against naive per-group Python loops (statistics module, float64)."""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_quagmire.algorithms import advantages
from nemo_quagmire.algorithms.advantages import (
    available_advantage_estimators,
    compute_advantages,
    group_has_signal,
    register_advantage_estimator,
)

EPS = 1e-6


def _members(group_ids: list[int], i: int) -> list[int]:
    return [j for j, g in enumerate(group_ids) if g == group_ids[i]]


def naive_advantages(rewards: list[float], group_ids: list[int], estimator: str) -> list[float]:
    """Independent reference: one sample at a time, from the definitions."""
    out = []
    for i, r in enumerate(rewards):
        group = [rewards[j] for j in _members(group_ids, i)]
        if len(set(group)) == 1:  # no signal, including groups of one
            out.append(0.0)
        elif estimator == "grpo":
            out.append((r - statistics.mean(group)) / (statistics.stdev(group) + EPS))
        elif estimator == "dr_grpo":
            out.append(r - statistics.mean(group))
        else:  # rloo: compare with the mean of the other members
            others = [rewards[j] for j in _members(group_ids, i) if j != i]
            out.append(r - statistics.mean(others))
    return out


# Non-contiguous, unsorted ids; -1 is a group of one, 5 a group whose rewards are all equal.
REWARDS = [1.0, 0.0, 0.5, 2.0, 0.0, 1.0, 3.0, 0.7, 0.7, -1.0, 0.25]
GROUP_IDS = [7, 100, 7, 100, 42, 7, -1, 5, 5, 42, 100]


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_matches_naive_loop_on_noncontiguous_ids(estimator):
    got = compute_advantages(
        torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUP_IDS), estimator, eps=EPS
    )
    expected = torch.tensor(naive_advantages(REWARDS, GROUP_IDS, estimator), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_grpo_hand_worked_group():
    # Group {1, 0, 0.5}: mean 0.5, sample variance ((0.5^2 + 0.5^2 + 0) / 2) = 0.25, std 0.5,
    # so A = (+0.5, -0.5, 0) / (0.5 + eps) ~= (+1, -1, 0).
    got = compute_advantages(torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), torch.tensor([3, 3, 3]))
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) * 0.5 / (0.5 + EPS))


def test_rloo_hand_worked_group():
    # Group {1, 0, 0.5}: A_0 = 1 - mean(0, 0.5) = 0.75, A_1 = 0 - 0.75 = -0.75, A_2 = 0.5 - 0.5 = 0.
    got = compute_advantages(
        torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), torch.tensor([0, 0, 0]), "rloo"
    )
    torch.testing.assert_close(got, torch.tensor([0.75, -0.75, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_groups_without_signal_get_exactly_zero(estimator):
    # In float32 the mean of seven 0.7s is not 0.7: r - mean is ~6e-8 and so is the std, so plain GRPO would
    # give these identical completions advantages of ~0.06. The last group is a group of one.
    rewards = torch.tensor([0.7] * 7 + [1.0, 2.0, 5.0], dtype=torch.float32)
    got = compute_advantages(rewards, torch.tensor([9] * 7 + [8, 8, 4]), estimator)
    assert got[:7].tolist() == [0.0] * 7
    assert got[-1].item() == 0.0
    assert (got[7:9] != 0).all()


def test_permuting_samples_permutes_advantages():
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    ids = torch.tensor(GROUP_IDS)
    perm = torch.randperm(len(REWARDS), generator=torch.Generator().manual_seed(0))
    for estimator in available_advantage_estimators():
        torch.testing.assert_close(
            compute_advantages(rewards[perm], ids[perm], estimator),
            compute_advantages(rewards, ids, estimator)[perm],
        )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-3, 3), st.sampled_from([0.0, 0.5, 1.0, -2.0, 3.25])), min_size=1, max_size=20
    ),
    st.sampled_from(["grpo", "dr_grpo", "rloo"]),
)
def test_property_matches_naive_loop(samples, estimator):
    group_ids = [g for g, _ in samples]
    rewards = [r for _, r in samples]
    got = compute_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(group_ids), estimator)
    expected = naive_advantages(rewards, group_ids, estimator)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_group_has_signal():
    got = group_has_signal(torch.tensor(REWARDS), torch.tensor(GROUP_IDS))
    expected = [len({REWARDS[j] for j in _members(GROUP_IDS, i)}) > 1 for i in range(len(REWARDS))]
    assert got.tolist() == expected
    assert got.dtype == torch.bool
    assert not got[GROUP_IDS.index(-1)] and not got[GROUP_IDS.index(5)]  # the cases the loop must catch


def test_dtype_is_preserved():
    got = compute_advantages(torch.tensor([1.0, 0.0], dtype=torch.float32), torch.tensor([0, 0]))
    assert got.dtype == torch.float32


def test_registry_rejects_duplicates_and_lists_known_names(monkeypatch):
    monkeypatch.setattr(advantages, "_ESTIMATORS", dict(advantages._ESTIMATORS))
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(lambda rewards, groups, *, eps: rewards)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; known: dr_grpo, grpo, rloo"):
        compute_advantages(torch.tensor([1.0]), torch.tensor([0]), "ppo")


def test_registered_estimator_is_used_by_compute_advantages(monkeypatch):
    monkeypatch.setattr(advantages, "_ESTIMATORS", dict(advantages._ESTIMATORS))

    @register_advantage_estimator("sum_baseline")
    def sum_baseline(rewards, groups, *, eps):
        return rewards - groups.sum(rewards)

    got = compute_advantages(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 0, 1]), "sum_baseline")
    assert got.tolist() == [1.0 - 3.0, 2.0 - 3.0, 0.0]  # the group of one is zeroed by compute_advantages
    assert "sum_baseline" in available_advantage_estimators()


@pytest.mark.parametrize(
    ("rewards", "group_ids", "kwargs", "match"),
    [
        (torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 1]), {}, "group_ids must be an integer tensor shaped"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), {}, "group_ids must be an integer tensor"),
        (torch.tensor([[1.0, 2.0]]), torch.tensor([[0, 1]]), {}, r"rewards must be a 1-D float tensor"),
        (torch.tensor([1, 2]), torch.tensor([0, 1]), {}, r"convert with \.float\(\)"),
        (torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), {}, r"non-finite values at samples \[1\]"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), {"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_invalid_inputs_raise(rewards, group_ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages(rewards, group_ids, **kwargs)
