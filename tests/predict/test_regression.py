"""nemo_quagmire.predict.regression against scipy and scikit-learn on the same data, hand-derived small cases,
and a brute-force replay of the bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from nemo_quagmire.predict.regression import (
    RIDGE_ALPHAS,
    fit_batch,
    fit_feature_set,
    fit_linear,
    kendall_tau_b,
    loo_predictions,
    r2_score,
    rankdata,
    spearman,
    uses_ridge,
)

sklearn = pytest.importorskip(
    "sklearn", reason="scikit-learn (the dev extra) is the reference implementation"
)
from sklearn.linear_model import LinearRegression, Ridge, RidgeCV  # noqa: E402
from sklearn.metrics import r2_score as sk_r2_score  # noqa: E402
from sklearn.model_selection import LeaveOneOut, cross_val_predict  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


def _data(n: int, p: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = np.resize([0.1, 3.0, 50.0], p)  # unlike scales and offsets on purpose
    X = rng.normal(size=(n, p)) * scale + np.resize([0.5, -2.0, 100.0], p)
    y = X @ rng.normal(size=p) + rng.normal(scale=0.3, size=n)
    return X, y


# ---------------------------------------------------------------- hand-derived
def test_ols_and_loo_on_a_hand_derived_three_point_case():
    # x = 0, 1, 2; y = 0, 2, 1: xbar = ybar = 1, Sxy = 1, Sxx = 2 -> slope 1/2, intercept 1/2.
    # Fitted 0.5, 1, 1.5; SS_res = 0.25 + 1 + 0.25 = 1.5, SS_tot = 2 -> R^2 = 0.25.
    # Leave-one-out lines: without x=0 through (1,2),(2,1) -> y = 3 - x -> predicts 3 at 0;
    # without x=1 through (0,0),(2,1) -> 0.5 at 1; without x=2 through (0,0),(1,2) -> 4 at 2.
    # SS of LOO errors = 9 + 2.25 + 9 = 20.25 -> LOO R^2 = 1 - 20.25 / 2 = -9.125.
    X, y = np.array([[0.0], [1.0], [2.0]]), np.array([0.0, 2.0, 1.0])
    model = fit_linear(X, y, ridge=False)
    assert model.coef == pytest.approx((0.5,)) and model.intercept == pytest.approx(0.5)
    assert r2_score(y, model.predict(X)) == pytest.approx(0.25)
    loo = loo_predictions(X, y, ridge=False)
    np.testing.assert_allclose(loo, [3.0, 0.5, 4.0])
    assert r2_score(y, loo) == pytest.approx(-9.125)


def test_rank_statistics_on_hand_derived_ties():
    # a = 1, 2, 2, 3 has ranks 1, 2.5, 2.5, 4; b = 1, 3, 2, 4 has ranks 1, 3, 2, 4.
    # Pairs (6): (1,2) +,+ ; (1,3) +,+ ; (1,4) +,+ ; (2,3) a tied ; (2,4) +,+ ; (3,4) +,+  -> concordant 5,
    # discordant 0, ties in a 1 -> tau-b = 5 / sqrt(5 * 6).
    a, b = np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0, 4.0])
    np.testing.assert_array_equal(rankdata(a), [1.0, 2.5, 2.5, 4.0])
    assert kendall_tau_b(a, b) == pytest.approx(5 / np.sqrt(30))
    # centred ranks a: -1.5, 0, 0, 1.5; b: -1.5, 0.5, -0.5, 1.5 -> sum of products 4.5,
    # norms sqrt(4.5) and sqrt(5) -> rho = 4.5 / sqrt(22.5).
    assert spearman(a, b) == pytest.approx(4.5 / np.sqrt(22.5))
    assert np.isnan(spearman(a, np.ones(4))) and np.isnan(kendall_tau_b(np.ones(4), b))
    assert np.isnan(r2_score(np.ones(3), np.zeros(3)))


def test_two_labelled_points_use_ridge_and_leave_one_out_predicts_the_other_point():
    # n = 2, p = 1 >= n - 1 -> ridge. Each LOO fit sees one point, so it predicts that point's y whatever the
    # penalty: LOO predictions are y swapped, errors d = y1 - y0 twice, SS_tot = d^2 / 2 -> LOO R^2 = -3.
    X, y = np.array([[0.2], [0.7]]), np.array([0.3, 0.5])
    assert uses_ridge(2, 1) and not uses_ridge(3, 1) and uses_ridge(3, 2)
    np.testing.assert_allclose(loo_predictions(X, y, ridge=True), [0.5, 0.3])
    assert r2_score(y, loo_predictions(X, y, ridge=True)) == pytest.approx(-3.0)


# ---------------------------------------------------------------- against scipy
@pytest.mark.parametrize("seed", range(5))
def test_rank_correlations_match_scipy_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    for a, b in [
        (rng.normal(size=9), rng.normal(size=9)),
        (rng.integers(0, 4, size=12).astype(float), rng.integers(0, 3, size=12).astype(float)),
    ]:
        np.testing.assert_allclose(rankdata(a), stats.rankdata(a))
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_rank_correlations_are_batched_along_the_last_axis():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, size=(7, 10)).astype(float), rng.normal(size=(7, 10))
    np.testing.assert_allclose(
        spearman(a, b), [stats.spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    )
    np.testing.assert_allclose(
        kendall_tau_b(a, b), [stats.kendalltau(x, y).statistic for x, y in zip(a, b, strict=True)]
    )
    np.testing.assert_allclose(rankdata(a), stats.rankdata(a, axis=1))


def test_single_feature_ols_matches_linregress():
    X, y = _data(8, 1, seed=3)
    ref = stats.linregress(X[:, 0], y)
    model = fit_linear(X, y, ridge=False)
    assert model.coef[0] == pytest.approx(ref.slope, rel=1e-10)
    assert model.intercept == pytest.approx(ref.intercept, rel=1e-10)
    assert r2_score(y, model.predict(X)) == pytest.approx(ref.rvalue**2, rel=1e-10)


# ---------------------------------------------------------------- against scikit-learn
@pytest.mark.parametrize(("n", "p"), [(5, 1), (8, 2), (10, 3)])
def test_ols_fit_and_leave_one_out_match_sklearn(n, p):
    X, y = _data(n, p, seed=n)
    assert not uses_ridge(n, p)
    ref = LinearRegression().fit(X, y)
    model = fit_linear(X, y, ridge=False)
    np.testing.assert_allclose(model.coef, ref.coef_, rtol=1e-9)
    assert model.intercept == pytest.approx(ref.intercept_, rel=1e-9)
    loo = loo_predictions(X, y, ridge=False)
    np.testing.assert_allclose(loo, cross_val_predict(LinearRegression(), X, y, cv=LeaveOneOut()), rtol=1e-9)
    assert r2_score(y, loo) == pytest.approx(sk_r2_score(y, loo))


@pytest.mark.parametrize(("n", "p"), [(4, 3), (5, 4), (4, 6)])
def test_ridge_matches_sklearn_standardized_ridgecv_and_its_leave_one_out(n, p):
    X, y = _data(n, p, seed=10 + n + p)
    assert uses_ridge(n, p)
    reference = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(X, y)
    model = fit_linear(X, y, ridge=True)
    assert model.alpha == reference[-1].alpha_
    np.testing.assert_allclose(model.predict(X), reference.predict(X), rtol=1e-8)
    # the same penalty with plain Ridge on standardized features, slopes mapped back to the original scale
    scaler = StandardScaler().fit(X)
    plain = Ridge(alpha=model.alpha).fit(scaler.transform(X), y)
    np.testing.assert_allclose(model.coef, plain.coef_ / scaler.scale_, rtol=1e-8)
    # leave-one-out refits the scaler and the penalty choice in every fold
    expected = cross_val_predict(
        make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)), X, y, cv=LeaveOneOut()
    )
    np.testing.assert_allclose(loo_predictions(X, y, ridge=True), expected, rtol=1e-8)


def test_ridge_breaks_penalty_ties_toward_the_strongest():
    # n = 3, p = 2: each leave-one-out fold has 2 points, whose own inner leave-one-out predicts each point by
    # the other whatever the penalty, so every penalty ties and the first (strongest) one is taken.
    X, y = _data(3, 2, seed=8)
    expected = cross_val_predict(
        make_pipeline(StandardScaler(), Ridge(alpha=RIDGE_ALPHAS[0])), X, y, cv=LeaveOneOut()
    )
    np.testing.assert_allclose(loo_predictions(X, y, ridge=True), expected, rtol=1e-8)
    _, _, alpha, _ = fit_batch(X[None, :2], y[None, :2], ridge=True)
    assert alpha[0] == RIDGE_ALPHAS[0] == RIDGE_ALPHAS.max()


def test_ridge_penalty_choice_follows_sklearn_on_a_larger_sample():
    # 12 points, 3 features: both sides pick the penalty by exact LOO error on the same grid
    X, y = _data(12, 3, seed=5)
    y = y + np.random.default_rng(1).normal(scale=3.0, size=12)  # noisy enough that shrinkage pays
    ref = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(X, y)
    model = fit_linear(X, y, ridge=True)
    assert model.alpha == ref[-1].alpha_ and model.alpha > RIDGE_ALPHAS[-1]
    np.testing.assert_allclose(model.predict(X), ref.predict(X), rtol=1e-8)


def test_fit_batch_flags_rank_deficient_samples():
    X = np.array([[[1.0], [1.0], [1.0]], [[1.0], [2.0], [3.0]]])  # sample 0: a constant feature
    _, _, _, full_rank = fit_batch(X, np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), ridge=False)
    np.testing.assert_array_equal(full_rank, [False, True])


# ---------------------------------------------------------------- fit_feature_set and the bootstrap
def test_fit_feature_set_scores_match_the_references_and_candidates_get_predictions():
    X, y = _data(9, 2, seed=7)
    target = y.copy()
    target[[2, 6]] = np.nan  # two candidates
    labelled = np.isfinite(target)
    fit = fit_feature_set(X, target, ["a", "b"], resamples=50, seed=1)
    ref = LinearRegression().fit(X[labelled], y[labelled])
    assert fit.n == 7 and fit.model == "ols" and fit.alpha == 0.0
    assert fit.coef == pytest.approx(dict(zip("ab", ref.coef_, strict=True)))
    np.testing.assert_allclose(fit.predicted, ref.predict(X), rtol=1e-9)  # every row, candidates too
    fitted = ref.predict(X[labelled])
    assert fit.r2 == pytest.approx(sk_r2_score(y[labelled], fitted))
    loo = cross_val_predict(LinearRegression(), X[labelled], y[labelled], cv=LeaveOneOut())
    assert fit.r2_loo == pytest.approx(sk_r2_score(y[labelled], loo))
    np.testing.assert_allclose(np.array(fit.loo)[labelled], loo)
    assert np.isnan(np.array(fit.loo)[~labelled]).all()
    assert fit.spearman == pytest.approx(stats.spearmanr(fitted, y[labelled]).statistic)
    assert fit.kendall == pytest.approx(stats.kendalltau(fitted, y[labelled]).statistic)
    assert fit.spearman_loo == pytest.approx(stats.spearmanr(loo, y[labelled]).statistic)
    assert fit.feature_spearman["b"] == pytest.approx(stats.spearmanr(X[labelled, 1], y[labelled]).statistic)


def test_bootstrap_intervals_replay_a_brute_force_loop():
    # n = 3 labelled points, two with the same x: a resample drawing only those has no unique OLS line and is
    # dropped (x = 0.4544 on purpose: the float std of three copies of it is 5.6e-17, not 0); the loop below
    # redraws the same resamples and fits each with scikit-learn.
    X = np.array([[0.4544], [0.4544], [0.5], [0.47]])
    y = np.array([0.1, 0.3, 0.9, np.nan])
    resamples, seed, level = 300, 4, 0.8
    fit = fit_feature_set(X, y, ["x"], resamples=resamples, seed=seed, level=level)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, 3, size=(resamples, 3))
    preds, r2s = [], []
    for idx in draws:
        if np.ptp(X[idx, 0]) == 0:
            continue
        ref = LinearRegression().fit(X[idx], y[idx])
        preds.append(ref.predict(X))
        r2s.append(ref.score(X[idx], y[idx]))
    preds = np.array(preds)
    assert fit.resamples_used == len(preds) < resamples  # some resamples were dropped
    np.testing.assert_allclose(fit.ci_low, np.percentile(preds, 10, axis=0), rtol=1e-9)
    np.testing.assert_allclose(fit.ci_high, np.percentile(preds, 90, axis=0), rtol=1e-9)
    assert fit.intervals["r2"] == pytest.approx((np.percentile(r2s, 10), np.percentile(r2s, 90)))
    # prediction interval: a centred leave-one-out residual added to each bootstrap prediction
    residuals = y[:3] - cross_val_predict(LinearRegression(), X[:3], y[:3], cv=LeaveOneOut())
    noisy = preds + rng.choice(residuals - residuals.mean(), size=preds.shape)
    np.testing.assert_allclose(fit.pi_low, np.percentile(noisy, 10, axis=0), rtol=1e-9)
    np.testing.assert_allclose(fit.pi_high, np.percentile(noisy, 90, axis=0), rtol=1e-9)


def test_bootstrap_is_seeded_and_paired_across_feature_sets():
    X, y = _data(7, 2, seed=2)
    first = fit_feature_set(X[:, :1], y, ["a"], resamples=100, seed=3)
    assert first == fit_feature_set(X[:, :1], y, ["a"], resamples=100, seed=3)
    assert first.ci_low != fit_feature_set(X[:, :1], y, ["a"], resamples=100, seed=4).ci_low
    # same seed, another feature: the same resample draws, so r2 intervals can be compared pairwise
    rng = np.random.default_rng(3)
    draws = rng.integers(0, 7, size=(100, 7))
    r2_b = [LinearRegression().fit(X[i, 1:], y[i]).score(X[i, 1:], y[i]) for i in draws]
    other = fit_feature_set(X[:, 1:], y, ["b"], resamples=100, seed=3)
    assert other.intervals["r2"] == pytest.approx((np.percentile(r2_b, 5), np.percentile(r2_b, 95)))


def test_no_resamples_gives_nan_intervals():
    X, y = _data(5, 1, seed=0)
    fit = fit_feature_set(X, y, ["a"], resamples=0)
    assert fit.resamples_used == 0 and np.isnan(fit.ci_low).all() and np.isnan(fit.intervals["r2"]).all()
    assert np.isfinite(fit.r2_loo)


@pytest.mark.parametrize(
    ("X", "y", "match"),
    [
        ([[1.0], [2.0], [3.0]], [1.0, np.nan, np.nan], "at least 2 rows with a target"),
        ([[1.0], [2.0], [3.0]], [1.0, 1.0, 1.0], "target is constant"),
        ([[1.0], [np.nan], [3.0]], [1.0, 2.0, 3.0], "NaN or infinite"),
    ],
)
def test_fit_feature_set_rejects_unusable_input(X, y, match):
    with pytest.raises(ValueError, match=match):
        fit_feature_set(np.array(X), np.array(y), ["x"], resamples=0)
