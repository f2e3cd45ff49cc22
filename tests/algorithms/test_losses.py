"""Policy loss against hand-worked values; gradient and metric invariance under micro-batch and data-parallel
splits; settings checked when the loss is built."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_quagmire.algorithms.losses import (
    AGG_MODES,
    ClippedPolicyLoss,
    Metric,
    aggregate_loss,
    count_valid,
    kl_penalty,
    pool_metrics,
)

F64 = torch.float64

# ---------------------------------------------------------------------------------------------------------
# Hand-worked batch, clip_low = clip_high = 0.2. Per-token loss l = max(-A r, -A clamp(r, 0.8, 1.2)):
#   seq 0, A = +1: r = 1.5 -> max(-1.5, -1.2) = -1.2 (high clip)   r = 0.5 -> max(-0.5, -0.8) = -0.5
#                  third token is padding holding garbage (its ratio would be exp(2e4) = inf)
#   seq 1, A = -2: r = 1.0 -> 2.0   r = 0.5 -> max(1.0, 1.6) = 1.6 (low clip)   r = 4.0 -> max(8.0, 2.4) = 8.0
# Sum over the 5 valid tokens: -1.2 - 0.5 + 2 + 1.6 + 8 = 9.9.
# ---------------------------------------------------------------------------------------------------------
RATIOS = [[1.5, 0.5], [1.0, 0.5, 4.0]]
TOKEN_LOSSES = [[-1.2, -0.5], [2.0, 1.6, 8.0]]


def ppo(**settings) -> ClippedPolicyLoss:
    """The loss of the hand-worked values: symmetric clip 0.2, plus ``settings``."""
    return ClippedPolicyLoss(**{"clip_low": 0.2, "clip_high": 0.2} | settings)


def values(metrics: dict[str, Metric]) -> dict[str, float]:
    return {name: metric.value.item() for name, metric in metrics.items()}


def hand_batch() -> dict[str, torch.Tensor]:
    old = torch.tensor([[-1.0, -2.0, -1e4], [-0.5, -1.5, -3.0]], dtype=F64)
    log_ratio = torch.tensor(
        [[math.log(1.5), math.log(0.5), 2e4], [0.0, math.log(0.5), math.log(4.0)]], dtype=F64
    )
    return {
        "logprobs": (old + log_ratio).requires_grad_(),
        "old_logprobs": old,
        "advantages": torch.tensor([1.0, -2.0], dtype=F64),
        "mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
    }


@pytest.mark.parametrize(
    ("agg", "kwargs", "expected"),
    [
        ("token-mean", {}, 9.9 / 5),
        # per-sequence means: (-1.2 - 0.5) / 2 = -0.85 and (2 + 1.6 + 8) / 3 = 11.6 / 3, over 2 sequences
        ("seq-mean-token-mean", {}, (-0.85 + 11.6 / 3) / 2),
        # per-sequence sums over the constant 4: -1.7 / 4 and 11.6 / 4, over 2 sequences
        ("seq-mean-token-sum-norm", {"token_sum_normalizer": 4.0}, (-1.7 / 4 + 11.6 / 4) / 2),
        # explicit global normalizers replace the local counts (5 tokens, 2 sequences)
        ("token-mean", {"global_num_tokens": 20}, 9.9 / 20),
        ("seq-mean-token-mean", {"global_num_seqs": torch.tensor(8)}, (-0.85 + 11.6 / 3) / 8),
    ],
)
def test_hand_worked_loss_per_agg_mode(agg, kwargs, expected):
    settings = {k: v for k, v in kwargs.items() if k == "token_sum_normalizer"}
    normalizers = {k: v for k, v in kwargs.items() if k != "token_sum_normalizer"}
    loss, _ = ppo(agg=agg, **settings)(**hand_batch(), **normalizers)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_hand_worked_gradient_and_metrics():
    batch = hand_batch()
    loss, metrics = ppo()(**batch)
    loss.backward()
    # d(-A r)/d log pi = -A r on unclipped tokens, 0 on clipped ones and on padding; token-mean divides by 5.
    expected_grad = torch.tensor([[0.0, -0.5, 0.0], [2.0, 0.0, 8.0]], dtype=F64) / 5
    torch.testing.assert_close(batch["logprobs"].grad, expected_grad)
    ratios = [r for row in RATIOS for r in row]
    expected = {
        "clip_frac_low": 1 / 5,  # seq 1, r = 0.5
        "clip_frac_high": 1 / 5,  # seq 0, r = 1.5
        "dual_clip_frac": 0.0,
        "approx_kl": sum(r - 1 - math.log(r) for r in ratios) / 5,
        "ratio_mean": 7.5 / 5,
        "ratio_max": 4.0,
        "num_tokens": 5.0,
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        metric = metrics[name]
        assert metric.value.item() == pytest.approx(value, rel=1e-12, abs=1e-15), name
        assert metric.value.ndim == 0 and not metric.value.requires_grad
        assert metric.reduction == ClippedPolicyLoss.METRIC_REDUCTIONS[name]
        if metric.reduction == "mean":
            assert metric.weight.item() == 5  # token means over the 5 valid tokens


def test_dual_clip_caps_negative_advantage_tokens():
    batch = hand_batch()
    loss, metrics = ppo(dual_clip=3.0)(**batch)
    loss.backward()
    # Only seq 1's r = 4 token has A < 0 and r > 3: min(8.0, -A * 3 = 6.0) = 6.0, with zero gradient.
    assert loss.item() == pytest.approx((9.9 - 8.0 + 6.0) / 5, rel=1e-12)
    expected_grad = torch.tensor([[0.0, -0.5, 0.0], [2.0, 0.0, 0.0]], dtype=F64) / 5
    torch.testing.assert_close(batch["logprobs"].grad, expected_grad)
    assert metrics["dual_clip_frac"].value.item() == pytest.approx(1 / 5)


def test_dual_clip_leaves_positive_advantages_alone():
    # A = +1, r = 4: PPO gives max(-4, -1.2) = -1.2; the dual clip bound -A * c = -3 must not apply.
    loss, metrics = ppo(dual_clip=3.0)(
        torch.tensor([[math.log(4.0)]], dtype=F64),
        torch.zeros(1, 1, dtype=F64),
        torch.tensor([1.0], dtype=F64),
        torch.ones(1, 1),
    )
    assert loss.item() == pytest.approx(-1.2)
    assert values(metrics)["dual_clip_frac"] == 0.0 and values(metrics)["clip_frac_high"] == 1.0


def test_asymmetric_clip_bounds():
    # clip_low 0.1, clip_high 0.3 (DAPO clip-higher).
    # A = +1: r = 1.25 is inside 1.3, r = 1.5 is clipped to 1.3.  A = -1: r = 0.85 is clipped to 0.9, r = 0.95
    # is inside.  Losses: -1.25, -1.3, 0.9, 0.95.
    log_ratio = torch.tensor([[1.25, 1.5], [0.85, 0.95]], dtype=F64).log()
    loss, metrics = ClippedPolicyLoss(clip_low=0.1, clip_high=0.3)(
        log_ratio, torch.zeros(2, 2, dtype=F64), torch.tensor([1.0, -1.0], dtype=F64), torch.ones(2, 2)
    )
    assert loss.item() == pytest.approx((-1.25 - 1.3 + 0.9 + 0.95) / 4)
    assert values(metrics)["clip_frac_high"] == 0.25 and values(metrics)["clip_frac_low"] == 0.25


def test_kl_penalty_term_value_and_gradient():
    batch = hand_batch()
    ref = batch["old_logprobs"] + torch.tensor([[0.3, -0.2, 7.0], [0.0, 0.5, -1.0]], dtype=F64)
    loss, metrics = ppo(kl_coef=0.1)(**batch, ref_logprobs=ref)
    loss.backward()
    logp = batch["logprobs"].detach()
    valid = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    # k3 = exp(x) - x - 1 with x = ref - logp; d k3 / d logp = 1 - exp(x).
    x = {ij: (ref[ij] - logp[ij]).item() for ij in valid}
    k3 = {ij: math.exp(x[ij]) - x[ij] - 1 for ij in valid}
    assert loss.item() == pytest.approx((9.9 + 0.1 * sum(k3.values())) / 5, rel=1e-12)
    assert metrics["kl"].value.item() == pytest.approx(sum(k3.values()) / 5, rel=1e-12)
    pg_grad = {(0, 1): -0.5, (1, 0): 2.0, (1, 2): 8.0}
    expected = torch.zeros(2, 3, dtype=F64)
    for ij in valid:
        expected[ij] = (pg_grad.get(ij, 0.0) + 0.1 * (1 - math.exp(x[ij]))) / 5
    torch.testing.assert_close(batch["logprobs"].grad, expected)


def test_ref_logprobs_without_kl_coef_only_report_kl():
    batch = hand_batch()
    ref = batch["old_logprobs"] - 0.5
    loss, metrics = ppo(kl_estimator="k2")(**batch, ref_logprobs=ref)
    assert loss.item() == pytest.approx(9.9 / 5, rel=1e-12)
    # k2 = x^2 / 2 with x = ref - logp = -0.5 - log r, over the 5 valid tokens
    k2 = [0.5 * (-0.5 - math.log(r)) ** 2 for row in RATIOS for r in row]
    assert metrics["kl"].value.item() == pytest.approx(sum(k2) / 5, rel=1e-12)


def test_truncated_importance_sampling_weights_policy_term():
    batch = hand_batch()
    # exp(old - rollout) = 2.0, 0.5 | 1.0, 3.0, 1.2; capped at 1.5 -> 1.5, 0.5 | 1.0, 1.5, 1.2.
    weights = torch.tensor([[2.0, 0.5, 1.0], [1.0, 3.0, 1.2]], dtype=F64)
    rollout = batch["old_logprobs"] - weights.log()
    loss, metrics = ppo(tis_cap=1.5)(**batch, rollout_logprobs=rollout)
    loss.backward()
    # -1.2 * 1.5 - 0.5 * 0.5 + 2 * 1 + 1.6 * 1.5 + 8 * 1.2 = 11.95
    assert loss.item() == pytest.approx(11.95 / 5, rel=1e-12)
    assert metrics["tis_weight_mean"].value.item() == pytest.approx(
        (1.5 + 0.5 + 1.0 + 1.5 + 1.2) / 5, rel=1e-12
    )
    # The weight is a constant: gradients are the PPO ones times the weight.
    expected_grad = torch.tensor([[0.0, -0.5 * 0.5, 0.0], [2.0, 0.0, 8.0 * 1.2]], dtype=F64) / 5
    torch.testing.assert_close(batch["logprobs"].grad, expected_grad)


@pytest.mark.parametrize(
    ("agg", "kwargs", "expected"),
    [
        ("token-mean", {}, -1.7 / 2),  # only seq 0 is kept: its 2 tokens
        ("seq-mean-token-mean", {}, -0.85 / 1),
        ("seq-mean-token-sum-norm", {"token_sum_normalizer": 4.0}, -1.7 / 4 / 1),
    ],
)
def test_truncated_sequences_are_masked_and_uncounted(agg, kwargs, expected):
    truncated = torch.tensor([False, True])
    loss, metrics = ppo(agg=agg, mask_truncated=True, **kwargs)(**hand_batch(), truncated=truncated)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert values(metrics)["num_tokens"] == 2 and values(metrics)["truncated_frac"] == 0.5
    assert metrics["truncated_frac"].weight.item() == 2  # a fraction of the 2 sequences, not of tokens
    assert [c.item() for c in count_valid(torch.tensor([[1, 1, 0], [1, 1, 1]]), truncated)] == [2, 1]


def test_truncated_without_mask_truncated_is_a_metric_only():
    loss, metrics = ppo()(**hand_batch(), truncated=torch.tensor([False, True]))
    assert loss.item() == pytest.approx(9.9 / 5, rel=1e-12)
    assert values(metrics)["truncated_frac"] == 0.5


def test_token_level_advantages_match_broadcast_sequence_advantages():
    batch = hand_batch()
    per_seq, _ = ppo()(**batch)
    batch["advantages"] = batch["advantages"][:, None].expand(2, 3).clone()
    batch["advantages"][0, 2] = float("nan")  # padding position: must be ignored
    per_token, _ = ppo()(**batch)
    assert per_token.item() == per_seq.item()


def test_garbage_in_padding_reaches_neither_loss_nor_gradient():
    batch = hand_batch()
    # float32 and an overflowing ratio at the padding position (seq 0, token 2)
    batch = {k: (v.detach().float() if v.is_floating_point() else v) for k, v in batch.items()}
    batch["logprobs"].requires_grad_()
    ref = batch["old_logprobs"].clone()
    ref[0, 2] = 1e5  # exp(ref - logprobs) overflows there too
    loss, metrics = ppo(kl_coef=0.1, dual_clip=3.0)(**batch, ref_logprobs=ref)
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in values(metrics).values())
    assert batch["logprobs"].grad[0, 2].item() == 0.0
    assert torch.isfinite(batch["logprobs"].grad).all()


def test_empty_mask_gives_zero_loss_and_zero_metrics():
    loss, metrics = ppo()(
        torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3)
    )
    got = values(metrics)
    assert loss.item() == 0.0 and got["num_tokens"] == got["ratio_mean"] == got["ratio_max"] == 0.0


def test_ratio_max_is_over_valid_tokens_only():
    # Valid ratios 0.5 and 0.8; the padding position (ratio 1 after neutralising, 50 before) must not count.
    old = torch.zeros(1, 3, dtype=F64)
    logprobs = torch.tensor([[math.log(0.5), math.log(0.8), math.log(50.0)]], dtype=F64)
    _, metrics = ppo()(logprobs, old, torch.ones(1, dtype=F64), torch.tensor([[1, 1, 0]]))
    assert metrics["ratio_max"].value.item() == pytest.approx(0.8, rel=1e-12)
    assert metrics["ratio_max"].reduction == "max" and metrics["ratio_max"].weight is None


# ---------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------


def test_kl_estimators_match_formulas():
    logp = torch.tensor([-0.1, -2.0, -5.0, -0.7], dtype=F64)
    ref = torch.tensor([-0.3, -1.0, -5.0, -4.0], dtype=F64)
    for i in range(4):
        x = ref[i].item() - logp[i].item()
        assert kl_penalty(logp, ref, "k1")[i].item() == pytest.approx(
            logp[i].item() - ref[i].item(), abs=1e-15
        )
        assert kl_penalty(logp, ref, "k2")[i].item() == pytest.approx(0.5 * x**2, abs=1e-15)
        assert kl_penalty(logp, ref, "k3")[i].item() == pytest.approx(
            math.exp(x) - x - 1, rel=1e-12, abs=1e-15
        )


def test_k3_is_accurate_for_tiny_differences():
    # exp(x) - x - 1 = x^2/2 + x^3/6 + ... In float32 the naive formula cancels catastrophically (5% off at
    # x = 1e-3); expm1(x) - x stays within 1e-3.
    x = torch.full((1,), 1e-3)
    exact = x.double().item() ** 2 / 2 + x.double().item() ** 3 / 6
    assert kl_penalty(torch.zeros(1), x, "k3").item() == pytest.approx(exact, rel=1e-3)
    assert (torch.exp(x) - x - 1).item() != pytest.approx(exact, rel=1e-3)


@settings(max_examples=200, deadline=None)
@given(st.floats(-30, 30), st.floats(-30, 30))
def test_k3_and_k2_are_nonnegative(logp, ref):
    for estimator in ("k2", "k3"):
        assert (
            kl_penalty(torch.tensor([logp], dtype=F64), torch.tensor([ref], dtype=F64), estimator).item() >= 0
        )


def test_k3_is_unbiased_for_kl():
    # Sampling from p = softmax(a), E_p[k3(log p, log q)] = KL(p || q) exactly when summed with weights p.
    p = torch.softmax(torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=F64), 0)
    q = torch.softmax(torch.tensor([1.0, 0.0, -0.5, 0.2], dtype=F64), 0)
    exact = (p * (p.log() - q.log())).sum()
    for estimator in ("k1", "k3"):
        torch.testing.assert_close((p * kl_penalty(p.log(), q.log(), estimator)).sum(), exact)


# ---------------------------------------------------------------------------------------------------------
# Gradient invariance: sum over micro-batches / data-parallel ranks == full batch, for every agg mode.
# A tiny linear "policy" makes the gradient land on shared parameters, as in training.
# ---------------------------------------------------------------------------------------------------------
B, T, V, F = 8, 6, 5, 3
LENGTHS = [6, 1, 4, 0, 3, 6, 2, 5]  # one empty sequence
TRUNCATED = [True, False, False, False, False, False, False, False]  # seq 0 hit the max length
LAYOUTS = {
    # rank -> micro-batches -> rows
    "micro-batches": [[[0, 1, 2], [3], [4, 5, 6, 7]]],
    "dp-ranks": [[[5, 0], [7]], [[2, 3, 1], [6, 4]]],
}
OPTIONS = {
    "ppo": {},
    "kl-dual-clip-tis-overlong": {
        "dual_clip": 1.5,
        "kl_coef": 0.1,
        "kl_estimator": "k3",
        "tis_cap": 1.5,
        "mask_truncated": True,
    },
}


def make_problem(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, T, F, generator=g, dtype=F64)
    tokens = torch.randint(V, (B, T), generator=g)
    weight = torch.randn(F, V, generator=g, dtype=F64)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    logp = policy_logprobs(weight, features, tokens).detach()

    def noisy(base: torch.Tensor, scale: float) -> torch.Tensor:
        # noise wide enough that both clips and the dual clip fire; padding holds garbage
        return torch.where(mask, base + scale * torch.randn(B, T, generator=g, dtype=F64), 1e4)

    old = noisy(logp, 0.5)
    return {
        "weight": weight,
        "features": features,
        "tokens": tokens,
        "mask": mask,
        "old_logprobs": old,
        "ref_logprobs": noisy(logp, 0.3),
        "rollout_logprobs": noisy(old, 0.3),
        "advantages": 2 * torch.randn(B, generator=g, dtype=F64),
        "truncated": torch.tensor(TRUNCATED),
        "entropy": torch.where(mask, torch.rand(B, T, generator=g, dtype=F64) * 3, 1e4),
    }


def policy_logprobs(weight: torch.Tensor, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logits = features @ weight  # [B, T, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)  # [B, T]


def loss_on_rows(problem, weight, rows, agg, options, **normalizers):
    """Loss of a micro-batch, trimmed to its own longest sequence like a packing data loader would."""
    rows = torch.tensor(rows)
    width = max(int(problem["mask"][rows].sum(-1).max()), 1)
    part = {k: v[rows][:, :width] if v.ndim == 2 else v[rows] for k, v in problem.items() if k != "weight"}
    part["features"] = problem["features"][rows][:, :width]
    normalizer = {"token_sum_normalizer": float(T)} if agg == "seq-mean-token-sum-norm" else {}
    inputs = {"entropy": part["entropy"]}
    if options:
        inputs.update(
            ref_logprobs=part["ref_logprobs"],
            rollout_logprobs=part["rollout_logprobs"],
            truncated=part["truncated"],
        )
    return ClippedPolicyLoss(agg=agg, **options, **normalizer)(
        policy_logprobs(weight, part["features"], part["tokens"]),
        part["old_logprobs"],
        part["advantages"],
        part["mask"],
        **inputs,
        **normalizers,
    )


def full_batch_grad(problem, agg, options):
    weight = problem["weight"].clone().requires_grad_()
    loss, metrics = loss_on_rows(problem, weight, list(range(B)), agg, options)
    loss.backward()
    return loss.detach(), weight.grad, metrics


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_split_gradients_sum_to_full_batch_gradient(agg, options, layout):
    problem = make_problem()
    opts = OPTIONS[options]
    full_loss, full_grad, metrics = full_batch_grad(problem, agg, opts)
    if opts:  # the clipped, dual-clipped and TIS-capped branches are all exercised
        got = values(metrics)
        assert got["clip_frac_low"] > 0 and got["clip_frac_high"] > 0 and got["dual_clip_frac"] > 0
        assert got["tis_weight_mean"] < 1.5

    # Each rank counts its micro-batches; "all-reduce SUM" of the counts gives the global normalizers.
    truncated = problem["truncated"] if opts.get("mask_truncated") else torch.zeros(B, dtype=torch.bool)
    counts = [
        count_valid(problem["mask"][rows], truncated[rows]) for rank in LAYOUTS[layout] for rows in rank
    ]
    global_num_tokens = sum(c[0] for c in counts)
    global_num_seqs = sum(c[1] for c in counts)

    total_loss, rank_grads = torch.zeros((), dtype=F64), []
    for rank in LAYOUTS[layout]:
        weight = problem["weight"].clone().requires_grad_()  # each rank holds its own replica
        for rows in rank:  # gradient accumulation over micro-batches
            loss, _ = loss_on_rows(
                problem,
                weight,
                rows,
                agg,
                opts,
                global_num_tokens=global_num_tokens,
                global_num_seqs=global_num_seqs,
            )
            loss.backward()
            total_loss += loss.detach()
        rank_grads.append(weight.grad)

    torch.testing.assert_close(total_loss, full_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(sum(rank_grads), full_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_local_normalizers_would_break_split_invariance(agg):
    # The invariance test above can fail: with each micro-batch normalizing by its own counts, it does.
    problem = make_problem()
    _, full_grad, _ = full_batch_grad(problem, agg, {})
    weight = problem["weight"].clone().requires_grad_()
    for rows in LAYOUTS["micro-batches"][0]:
        loss, _ = loss_on_rows(problem, weight, rows, agg, {})
        loss.backward()
    assert (weight.grad - full_grad).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Metric reductions: micro-batches and data-parallel ranks pool to the whole batch's values.
# ---------------------------------------------------------------------------------------------------------


def pool_over_simulated_ranks(ranks: list[list[dict[str, Metric]]]) -> dict[str, float]:
    """pool_metrics as rank 0 of a data-parallel group runs it: every rank reduces its own micro-batches,
    then the all-reduce combines the ranks' tensors elementwise, SUM or MAX as torch.distributed would."""
    local: dict[str, list[torch.Tensor]] = {"sum": [], "max": []}

    def record(tensor: torch.Tensor, op: str) -> torch.Tensor:
        local[op].append(tensor.clone())
        return tensor

    for parts in ranks:
        pool_metrics(parts, record)

    def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        stacked = torch.stack(local[op])  # [ranks, K]
        return stacked.sum(0) if op == "sum" else stacked.amax(0)

    return pool_metrics(ranks[0], all_reduce)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_split_metrics_pool_to_the_whole_batch_metrics(options, layout):
    problem, opts = make_problem(), OPTIONS[options]
    _, whole = loss_on_rows(problem, problem["weight"], list(range(B)), "token-mean", opts)
    ranks = [
        [loss_on_rows(problem, problem["weight"], rows, "token-mean", opts)[1] for rows in rank]
        for rank in LAYOUTS[layout]
    ]
    pooled = pool_over_simulated_ranks(ranks)

    expected = values(whole)
    assert (
        pooled.keys()
        == expected.keys()
        == set(ClippedPolicyLoss.METRIC_REDUCTIONS)
        - (set() if opts else {"kl", "tis_weight_mean", "truncated_frac"})
    )
    for name, value in expected.items():
        assert pooled[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
        assert whole[name].reduction == ClippedPolicyLoss.METRIC_REDUCTIONS[name], name

    # Independent references, straight from the problem's tensors.
    kept = problem["mask"] & ~(problem["truncated"][:, None] if opts else torch.zeros(B, 1, dtype=torch.bool))
    logp = policy_logprobs(problem["weight"], problem["features"], problem["tokens"])
    ratios = (logp - problem["old_logprobs"]).exp()[kept]
    assert pooled["ratio_max"] == pytest.approx(ratios.max().item(), rel=1e-12)
    assert pooled["ratio_mean"] == pytest.approx(ratios.mean().item(), rel=1e-12)
    assert pooled["entropy"] == pytest.approx(problem["entropy"][kept].mean().item(), rel=1e-12)
    assert pooled["num_tokens"] == kept.sum().item()
    if opts:
        assert pooled["truncated_frac"] == pytest.approx(1 / 7)  # seq 0 of the 7 with tokens (seq 3 has none)
    # The pooling is not trivially right: adding the parts' maxes or averaging their means would be wrong.
    parts = [values(part) for rank in ranks for part in rank]
    assert sum(part["ratio_max"] for part in parts) > pooled["ratio_max"] * 1.5
    assert sum(part["entropy"] for part in parts) / len(parts) != pytest.approx(pooled["entropy"], rel=1e-3)


def test_pool_metrics_plain_values_are_sums_and_empty_means_are_zero():
    parts = [
        {
            "n": 2,
            "m": Metric(torch.tensor(0.0), "mean", torch.tensor(0.0)),
            "top": Metric(torch.tensor(-3.0), "max"),
        },
        {
            "n": torch.tensor(5),
            "m": Metric(torch.tensor(0.0), "mean", torch.tensor(0.0)),
            "top": Metric(torch.tensor(-7.0), "max"),
        },
    ]
    assert pool_metrics(parts) == {"n": 7.0, "m": 0.0, "top": -3.0}


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([], "at least one micro-batch"),
        ([{"a": 1.0}, {"b": 1.0}], "micro-batches report different metrics"),
        ([{"a": 1.0}, {"a": Metric(torch.tensor(1.0), "max")}], "micro-batches report different metrics"),
    ],
)
def test_pool_metrics_refuses_inconsistent_parts(parts, match):
    with pytest.raises(ValueError, match=match):
        pool_metrics(parts)


def test_a_metric_says_how_it_reduces():
    with pytest.raises(ValueError, match="a 'mean' metric needs weight"):
        Metric(torch.tensor(1.0), "mean")
    with pytest.raises(ValueError, match="a 'max' metric takes no weight"):
        Metric(torch.tensor(1.0), "max", torch.tensor(2.0))
    with pytest.raises(ValueError, match="unknown metric reduction 'min'"):
        Metric(torch.tensor(1.0), "min")


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"clip_low": 1.0}, r"clip_low must be in \[0, 1\)"),
        ({"clip_low": -0.1}, r"clip_low must be in \[0, 1\)"),
        ({"clip_high": -0.1}, "clip_high must be >= 0"),
        ({"clip_high": math.nan}, "clip_high must be >= 0"),
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"kl_coef": -1.0}, "kl_coef must be >= 0"),
        ({"kl_estimator": "k4"}, "unknown KL estimator 'k4'; choose one of k1, k2, k3"),
        ({"agg": "seq-mean"}, "unknown loss aggregation mode 'seq-mean'; choose one of token-mean"),
        ({"agg": "seq-mean-token-sum-norm"}, "seq-mean-token-sum-norm needs it"),
        ({"token_sum_normalizer": 4.0}, "the other modes do not take it"),
        ({"agg": "seq-mean-token-sum-norm", "token_sum_normalizer": 0.0}, "token_sum_normalizer must be > 0"),
        ({"tis_cap": 0.0}, "tis_cap must be > 0"),
    ],
)
def test_bad_settings_fail_when_the_loss_is_built(settings, match):
    with pytest.raises(ValueError, match=match):
        ClippedPolicyLoss(**settings)


def test_the_settings_cannot_change_after_the_checks():
    loss = ClippedPolicyLoss()
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss.clip_low = 2.0


def test_defaults_are_the_configs():
    from nemo_quagmire.config.grpo import GRPOConfig
    from nemo_quagmire.trainer.grpo import policy_loss_from_config

    assert policy_loss_from_config(GRPOConfig()) == ClippedPolicyLoss()


@pytest.mark.parametrize(
    ("settings", "inputs", "match"),
    [
        ({"kl_coef": 0.1}, {}, "kl_coef=0.1 needs ref_logprobs"),
        ({"mask_truncated": True}, {}, "mask_truncated=True needs truncated"),
        ({"tis_cap": 2.0}, {}, "needs both rollout_logprobs and tis_cap"),
        ({}, {"rollout_logprobs": torch.zeros(2, 3)}, "needs both rollout_logprobs and tis_cap"),
        ({}, {"global_num_tokens": 0}, "global_num_tokens must be a positive number"),
        ({}, {"global_num_seqs": torch.ones(2)}, "global_num_seqs must be a scalar"),
        ({}, {"truncated": torch.tensor([0, 1])}, r"truncated must be a bool tensor \[B\] = \[2\]"),
        (
            {},
            {"ref_logprobs": torch.zeros(2, 2)},
            r"ref_logprobs has shape \(2, 2\) but logprobs has \(2, 3\)",
        ),
        ({}, {"entropy": torch.zeros(3)}, "entropy has shape"),
        ({}, {"advantages": torch.zeros(3)}, r"advantages must be \[B\] = \[2\] or \[B, T\]"),
        ({}, {"mask": torch.ones(2, 4)}, r"mask has shape \(2, 4\)"),
        ({}, {"logprobs": torch.zeros(2, 3, 1)}, r"logprobs must be a non-empty \[B, T\] tensor"),
    ],
)
def test_bad_inputs_fail_at_the_call(settings, inputs, match):
    loss = ClippedPolicyLoss(**settings)  # the settings themselves are fine
    args = {k: v.detach() for k, v in hand_batch().items()} | inputs
    if "logprobs" in inputs:
        args["old_logprobs"] = inputs["logprobs"]
    with pytest.raises(ValueError, match=match):
        loss(**args)


def test_entropy_metric():
    entropy = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]], dtype=F64)  # 100 sits on padding
    _, metrics = ppo()(**hand_batch(), entropy=entropy)
    assert metrics["entropy"].value.item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert metrics["entropy"].reduction == "mean" and metrics["entropy"].weight.item() == 5


def test_every_metric_is_documented():
    root = Path(__file__).resolve().parents[2]
    reference = (root / "nemo_quagmire" / "METRICS.md").read_text(encoding="utf-8")
    readme = (root / "README.md").read_text(encoding="utf-8")
    for name in ClippedPolicyLoss.METRIC_REDUCTIONS:
        assert f"`train/{name}`" in reference, name
        assert f"`{name}`" in readme, name


def test_aggregate_loss_ignores_nonfinite_padding():
    per_token = torch.tensor([[1.0, float("nan")], [2.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert aggregate_loss(per_token, mask).item() == pytest.approx(7 / 3)
    assert aggregate_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((1 + 3) / 2)
