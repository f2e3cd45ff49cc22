"""Small-sample linear fits of a post-RL score on pre-RL proxies, scored for how far they can be trusted.

Why this module: a team can afford RL on only a handful of SFT checkpoints (the paper's runs took days each),
so the predictor is calibrated on 4-10 points. In-sample R^2 of a line through so few points flatters it, so
every fit here is also scored out of sample (leave-one-out), by rank agreement (what picking a checkpoint
needs), and resampled (bootstrap) for intervals.

Model choice, fixed by the number of labelled points n and of features p:
- ordinary least squares with an intercept while every leave-one-out fit is determined (p <= n - 2);
- ridge otherwise (p >= n - 1; the issue's "features outnumber points" plus the case p = n - 1, where OLS
  interpolates the n points and its leave-one-out fits are underdetermined). Ridge works on standardized
  features (centred, divided by their population std; the intercept is not penalized) and picks its penalty
  from `RIDGE_ALPHAS` by the exact leave-one-out squared error of the hat matrix (what scikit-learn's RidgeCV
  does by default), preferring the larger penalty on ties. Coefficients are reported on the original scale.

Leave-one-out refits the whole procedure (standardization and penalty choice included) without the left-out
point. The bootstrap resamples the labelled rows with replacement and refits the same way; every feature set
draws the same resamples for one seed, so sets are compared on paired resamples.

Scale and size: features are standardized after dividing by their largest magnitude, so values near the
float range (1e300) keep their information instead of overflowing the std to inf and zeroing the feature.
The batched fits (leave-one-out folds, bootstrap resamples) run in chunks of at most `CHUNK_BYTES` of design
matrices, and ranks and Kendall's tau switch from the all-pairs form to sorting when pairs would not fit
(`PAIRWISE_MAX_ELEMENTS`), so a 10,000-row table costs memory linear in its rows, not quadratic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

# Descending, so that near-ties go to the stronger penalty. Features are standardized, so X^T X has n on the
# diagonal and this range spans "almost OLS" to "intercept only" for any n of interest.
RIDGE_ALPHAS = np.logspace(4, -4, 33)
_TIE_RTOL = 1e-9
CHUNK_BYTES = 64 * 2**20  # design matrices per batched fit call
PAIRWISE_MAX_ELEMENTS = 2**22  # pair entries per all-pairs rank / tau call (a few tens of MB)


@dataclass(frozen=True)
class LinearModel:
    """y ~ intercept + X @ coef, on the original feature scale.

    Attributes:
        coef: one slope per feature.  # [p]
        intercept: the fitted value at X = 0.
        alpha: the ridge penalty on standardized features (0.0 for OLS).
    """

    coef: tuple[float, ...]
    intercept: float
    alpha: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Fitted values for the rows of X [m, p] -> [m]."""
        return self.intercept + np.asarray(X, dtype=float) @ np.asarray(self.coef)


def uses_ridge(n_points: int, n_features: int) -> bool:
    """True where OLS leave-one-out fits would be underdetermined (p >= n - 1); see the module docstring."""
    return n_features >= n_points - 1


def fit_batch(
    X: np.ndarray, y: np.ndarray, ridge: bool, alphas: Sequence[float] = RIDGE_ALPHAS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit B independent samples at once (the model, its leave-one-out folds, or bootstrap resamples).

    Both models work on centred, standardized features Xs = U S V^T (a column constant within a sample is
    left unscaled and gets slope 0), with the intercept unpenalized:
    - OLS: the minimum-norm least-squares slopes V S^+ U^T yc;
    - ridge with penalty a: slopes V diag(S / (S^2 + a)) U^T yc, with a chosen per sample from `alphas` by
      the exact leave-one-out error: fitted values ybar + U diag(d) U^T yc, d = S^2 / (S^2 + a), hat diagonal
      h_ii = 1/n + sum_j U_ij^2 d_j, leave-one-out residual (y_i - fitted_i) / (1 - h_ii). The first penalty
      within a relative 1e-9 of the smallest error wins.

    Args:
        X: features of each sample.  # [B, n, p]
        y: target of each sample.  # [B, n]
        ridge: ridge (True) or OLS.
        alphas: candidate ridge penalties, in order of preference on ties.

    Returns:
        coef [B, p] and intercept [B] on the original scale, the penalty alpha [B] (0 for OLS), and
        full_rank [B]: whether the standardized design has rank p (for OLS: a unique fit).
    """
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    n = X.shape[1]
    # Standardize in units of each column's largest magnitude: values near the float range (1e300) would
    # overflow the std to inf and zero the column. The same Xs, mean and scale as the direct formula.
    magnitude = np.abs(X).max(axis=1, keepdims=True)  # [B, 1, p]
    magnitude = np.where(magnitude > 0.0, magnitude, 1.0)
    Xu = X / magnitude  # [B, n, p], in [-1, 1]
    unit_mean = Xu.mean(axis=1, keepdims=True)
    constant = np.ptp(X, axis=1, keepdims=True) == 0.0  # exact; the std of equal values can be 1e-17
    unit_scale = np.where(constant, 1.0, Xu.std(axis=1, keepdims=True))
    Xs = np.where(constant, 0.0, (Xu - unit_mean) / unit_scale)  # [B, n, p]
    x_mean, x_scale = unit_mean * magnitude, unit_scale * magnitude  # [B, 1, p], original units
    y_mean = y.mean(axis=1)  # [B]
    yc = y - y_mean[:, None]  # [B, n]
    U, s, Vt = np.linalg.svd(Xs, full_matrices=False)  # [B, n, r], [B, r], [B, r, p]
    uty = np.einsum("bnr,bn->br", U, yc)  # [B, r]
    tol = np.finfo(float).eps * max(X.shape[1:]) * np.maximum(s.max(axis=1, initial=0.0), 1.0)  # [B]
    full_rank = (s > tol[:, None]).sum(axis=1) == X.shape[2]
    if ridge:
        alphas_arr = np.asarray(alphas, dtype=float)  # [A]
        shrink = s[:, None, :] ** 2 / (s[:, None, :] ** 2 + alphas_arr[None, :, None])  # [B, A, r]
        fitted = np.einsum("bar,br,bnr->ban", shrink, uty, U)  # [B, A, n]
        leverage = 1.0 / n + np.einsum("bar,bnr->ban", shrink, U**2)  # [B, A, n]
        with np.errstate(divide="ignore", invalid="ignore"):  # n = 1: every point has leverage 1
            loo_mse = np.mean(((yc[:, None, :] - fitted) / (1.0 - leverage)) ** 2, axis=2)  # [B, A]
        loo_mse = np.where(np.isfinite(loo_mse), loo_mse, np.inf)
        threshold = loo_mse.min(axis=1, keepdims=True) * (1 + _TIE_RTOL)
        alpha = alphas_arr[np.argmax(loo_mse <= threshold, axis=1)]  # [B]
        gain = s / (s**2 + alpha[:, None])  # [B, r]
    else:
        alpha = np.zeros(len(X))
        gain = np.divide(1.0, s, out=np.zeros_like(s), where=s > tol[:, None])
    coef = np.einsum("brp,br->bp", Vt, gain * uty) / x_scale[:, 0, :]  # [B, p]
    intercept = y_mean - np.einsum("bp,bp->b", x_mean[:, 0, :], coef)
    return coef, intercept, alpha, full_rank


def fit_linear(X: np.ndarray, y: np.ndarray, ridge: bool) -> LinearModel:
    """One fit of y [n] on X [n, p] (see `fit_batch`)."""
    coef, intercept, alpha, _ = fit_batch(
        np.asarray(X, dtype=float)[None], np.asarray(y, dtype=float)[None], ridge
    )
    return LinearModel(tuple(float(c) for c in coef[0]), float(intercept[0]), float(alpha[0]))


def loo_predictions(X: np.ndarray, y: np.ndarray, ridge: bool) -> np.ndarray:
    """Prediction for each row from a fit on all the other rows (the whole procedure refitted).

    Args:
        X: features.  # [n, p]
        y: target.  # [n]
        ridge: the model kind, kept fixed across folds.

    Returns:
        Leave-one-out predictions.  # [n]
    """
    X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    n = len(y)
    size = max(1, CHUNK_BYTES // max(1, n * max(X.shape[1], 1) * 8 * 4))
    predictions = []
    for start in range(0, n, size):
        left_out = np.arange(start, min(start + size, n))  # [c]
        keep = np.arange(n)[None, :] != left_out[:, None]  # [c, n]: fold i uses every point but i
        folds = np.nonzero(keep)[1].reshape(len(left_out), n - 1)  # [c, n - 1]
        coef, intercept, _, _ = fit_batch(X[folds], y[folds], ridge)  # [c, n - 1, p] per chunk
        predictions.append(intercept + np.einsum("ip,ip->i", X[left_out], coef))
    return np.concatenate(predictions)


def r2_score(y: np.ndarray, predicted: np.ndarray) -> np.ndarray | float:
    """1 - SS_res / SS_tot around the mean of y, along the last axis; NaN where y is constant.

    Negative values mean the predictions do worse than the mean of y.
    """
    y, predicted = np.asarray(y, dtype=float), np.asarray(predicted, dtype=float)
    ss_tot = np.sum((y - y.mean(axis=-1, keepdims=True)) ** 2, axis=-1)
    ss_res = np.sum((y - predicted) ** 2, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0.0, 1.0 - ss_res / ss_tot, np.nan)
    return float(r2) if r2.ndim == 0 else r2


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing the mean of the ranks they span (scipy's "average"):
    rank_i = #{j: x_j < x_i} + (#{j: x_j == x_i} + 1) / 2.

    All pairs at once while they fit in `PAIRWISE_MAX_ELEMENTS`, else by binary search in each sorted row.
    """
    x = np.asarray(values, dtype=float)
    if x.size * x.shape[-1] <= PAIRWISE_MAX_ELEMENTS:
        below = (x[..., None, :] < x[..., :, None]).sum(axis=-1)  # [..., n]
        equal = (x[..., None, :] == x[..., :, None]).sum(axis=-1)
        return below + (equal + 1) / 2.0
    rows = x.reshape(-1, x.shape[-1])
    ranks = np.empty_like(rows)
    for i, row in enumerate(rows):
        ordered = np.sort(row)
        below = np.searchsorted(ordered, row, side="left")
        ranks[i] = below + (np.searchsorted(ordered, row, side="right") - below + 1) / 2.0
    return ranks.reshape(x.shape)


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denominator = np.sqrt(np.sum(a**2, axis=-1) * np.sum(b**2, axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(denominator > 0.0, np.sum(a * b, axis=-1) / denominator, np.nan)
    return float(r) if r.ndim == 0 else r


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Spearman's rho along the last axis: Pearson correlation of average ranks; NaN if a side is constant."""
    return _correlation(rankdata(a), rankdata(b))


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Kendall's tau-b along the last axis over all pairs (ties corrected); NaN if a side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = a.shape[-1]
    if a.size * n > PAIRWISE_MAX_ELEMENTS:  # O(n log n) per row instead of every pair at once
        from scipy.stats import kendalltau

        flat_a, flat_b = a.reshape(-1, n), b.reshape(-1, n)
        tau = np.array([kendalltau(flat_a[i], flat_b[i]).statistic for i in range(len(flat_a))])
        tau = tau.reshape(a.shape[:-1])
        return float(tau) if tau.ndim == 0 else tau
    upper = np.triu_indices(n, k=1)
    sa = np.sign(a[..., :, None] - a[..., None, :])[..., upper[0], upper[1]]  # [..., n (n - 1) / 2]
    sb = np.sign(b[..., :, None] - b[..., None, :])[..., upper[0], upper[1]]
    denominator = np.sqrt(np.count_nonzero(sa, axis=-1) * np.count_nonzero(sb, axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = np.where(denominator > 0, np.sum(sa * sb, axis=-1) / denominator, np.nan)
    return float(tau) if tau.ndim == 0 else tau


@dataclass(frozen=True)
class FitResult:
    """One feature set fitted on the labelled rows of a table and scored; per-row values cover every row.

    Attributes:
        features: the feature columns, in order.
        n: labelled rows the fit used.
        model: "ols" or "ridge" (see the module docstring).
        alpha: the ridge penalty on standardized features (0.0 for OLS).
        coef: slope per feature, original scale.
        intercept: fitted value at all features 0.
        r2: in-sample coefficient of determination.
        r2_loo: R^2 of the leave-one-out predictions against the target.
        spearman, kendall: rank correlations (Spearman's rho, Kendall's tau-b) of the in-sample fitted values
            with the target.
        spearman_loo: Spearman's rho of the leave-one-out predictions with the target.
        feature_spearman: Spearman's rho of each feature with the target, signed (the fitted values of a
            one-feature fit rank like the feature or its reverse, so `spearman` never shows the direction).
        intervals: percentile bootstrap intervals at `level` of "r2", "spearman" and "kendall" (each
            recomputed in sample on each resample; NaN if no resample allowed it).
        level: the central coverage of every interval, e.g. 0.9.
        resamples: bootstrap resamples drawn.
        resamples_used: resamples that could be fitted (OLS needs a full-rank design; others are dropped).
        seed: the bootstrap seed.
        predicted: the fit's prediction for every table row (labelled rows and candidates).  # [N]
        loo: leave-one-out prediction for labelled rows, NaN for candidates.  # [N]
        ci_low, ci_high: percentile interval of the fitted value at each row over the bootstrap fits: the
            uncertainty of the line.  # [N]
        pi_low, pi_high: the same with a centred leave-one-out residual added to each bootstrap prediction:
            where a run at that point may land, scatter around the line included.  # [N]
    """

    features: tuple[str, ...]
    n: int
    model: Literal["ols", "ridge"]
    alpha: float
    coef: Mapping[str, float]
    intercept: float
    r2: float
    r2_loo: float
    spearman: float
    kendall: float
    spearman_loo: float
    feature_spearman: Mapping[str, float]
    intervals: Mapping[str, tuple[float, float]]
    level: float
    resamples: int
    resamples_used: int
    seed: int
    predicted: tuple[float, ...]
    loo: tuple[float, ...]
    ci_low: tuple[float, ...]
    ci_high: tuple[float, ...]
    pi_low: tuple[float, ...]
    pi_high: tuple[float, ...]


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Central percentile interval along axis 0, ignoring NaN; NaN where no sample is finite."""
    tail = 100.0 * (1.0 - level) / 2.0
    finite = np.isfinite(samples).any(axis=0)
    low = np.full(samples.shape[1:], np.nan)
    high = np.full(samples.shape[1:], np.nan)
    if finite.any():
        low[finite] = np.nanpercentile(samples[:, finite], tail, axis=0)
        high[finite] = np.nanpercentile(samples[:, finite], 100.0 - tail, axis=0)
    return low, high


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def fit_feature_set(
    X: np.ndarray,
    y: np.ndarray,
    features: Sequence[str],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.9,
) -> FitResult:
    """Fit, cross-validate and bootstrap one feature set.

    Args:
        X: features of every table row.  # [N, p]
        y: target of every row, NaN for candidates (rows to predict, not fitted).  # [N]
        features: the names of X's columns.
        resamples: bootstrap resamples of the labelled rows (0: intervals are NaN).
        seed: seeds the bootstrap.
        level: central coverage of the intervals, in (0, 1).

    Raises:
        ValueError: fewer than 2 labelled rows, a constant target, non-finite features, or mismatched shapes.
    """
    X = np.asarray(X, dtype=float).reshape(len(y), -1)
    y = np.asarray(y, dtype=float)
    if X.shape[1] != len(features):
        raise ValueError(f"X has {X.shape[1]} columns but {len(features)} feature names: {list(features)}")
    if not np.isfinite(X).all():
        raise ValueError(f"features {list(features)} contain NaN or infinite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    labelled = np.isfinite(y)
    Xl, yl = X[labelled], y[labelled]  # [n, p], [n]
    n, p = Xl.shape
    if n < 2:
        raise ValueError(f"need at least 2 rows with a target to fit {list(features)}, got {n}")
    if np.ptp(yl) == 0.0:
        raise ValueError(f"the target is constant ({yl[0]}) over the {n} labelled rows: nothing to predict")
    ridge = uses_ridge(n, p)
    model = fit_linear(Xl, yl, ridge)
    fitted = model.predict(Xl)
    loo_labelled = loo_predictions(Xl, yl, ridge)
    loo = np.full(len(y), np.nan)
    loo[labelled] = loo_labelled

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))  # [B, n], the same for every feature set of one seed
    chunk = max(1, CHUNK_BYTES // (n * max(p, 1) * 8 * 4))
    preds, stat_parts = [np.empty((0, len(y)))], [np.empty((0, 3))]
    for start in range(0, resamples, chunk):
        Xb, yb = Xl[draws[start : start + chunk]], yl[draws[start : start + chunk]]  # [c, n, p], [c, n]
        coef_b, intercept_b, _, full_rank = fit_batch(Xb, yb, ridge)
        usable = full_rank | ridge  # an OLS resample with a rank-deficient design has no unique fit
        coef_b, intercept_b, Xb, yb = coef_b[usable], intercept_b[usable], Xb[usable], yb[usable]
        fitted_b = intercept_b[:, None] + np.einsum("bnp,bp->bn", Xb, coef_b)  # [c_used, n]
        preds.append(intercept_b[:, None] + coef_b @ X.T)  # [c_used, N]
        stat_parts.append(
            np.stack(
                [r2_score(yb, fitted_b), spearman(fitted_b, yb), kendall_tau_b(fitted_b, yb)], axis=1
            ).reshape(-1, 3)
        )
    pred, stats = np.concatenate(preds), np.concatenate(stat_parts)  # [B_used, N], [B_used, 3]
    residuals = yl - loo_labelled
    noisy = pred + rng.choice(residuals - residuals.mean(), size=pred.shape)
    ci_low, ci_high = _percentile_interval(pred, level)
    pi_low, pi_high = _percentile_interval(noisy, level)
    stat_low, stat_high = _percentile_interval(stats, level)

    return FitResult(
        features=tuple(features),
        n=n,
        model="ridge" if ridge else "ols",
        alpha=model.alpha,
        coef=dict(zip(features, model.coef, strict=True)),
        intercept=model.intercept,
        r2=r2_score(yl, fitted),
        r2_loo=r2_score(yl, loo_labelled),
        spearman=spearman(fitted, yl),
        kendall=kendall_tau_b(fitted, yl),
        spearman_loo=spearman(loo_labelled, yl),
        feature_spearman={f: spearman(Xl[:, j], yl) for j, f in enumerate(features)},
        intervals={
            name: (float(stat_low[j]), float(stat_high[j]))
            for j, name in enumerate(("r2", "spearman", "kendall"))
        },
        level=level,
        resamples=resamples,
        resamples_used=len(pred),
        seed=seed,
        predicted=_floats(model.predict(X)),
        loo=_floats(loo),
        ci_low=_floats(ci_low),
        ci_high=_floats(ci_high),
        pi_low=_floats(pi_low),
        pi_high=_floats(pi_high),
    )
