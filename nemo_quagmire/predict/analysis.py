"""Which proxy predicts the post-RL score best, how far to trust it, and the candidates it ranks.

Why: the paper's point is a comparison — pre-RL pass@1 (the SFT score) against held-out loss and pass@large-k
— so every feature set is fitted and scored side by side on the same rows and the same bootstrap resamples,
and the winner ranks the checkpoints that never went through RL.

Feature sets: by default each feature alone, plus held-out loss with the largest-k pass@k (`heldout_loss +
pass@<K>`) when both exist; a caller may name the sets instead. The best set has the highest leave-one-out
R^2; ties go to fewer features, then to the earlier set. Choosing the best of several sets on the same few
rows flatters its leave-one-out R^2 a little; the summary says so.

Everything here is plain data (frozen dataclasses, tuples, JSON-ready dicts); `report.py` renders it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nemo_quagmire.predict.regression import FitResult, fit_feature_set
from nemo_quagmire.predict.table import PredictInputError, Table, raise_if_errors
from nemo_quagmire.utils.logging import get_logger

logger = get_logger(__name__)

LOSS_FEATURE = "heldout_loss"
MIN_RELIABLE_ROWS = 3
# Plain-language grades of leave-one-out R^2 used in the summary.
GOOD_R2, MODERATE_R2 = 0.7, 0.4
_PASS_AT_K = re.compile(r"^pass@(\d+)$")
_LABELS = {
    "heldout_loss": "held-out loss",
    "heldout_loss_seq": "held-out loss (per sequence)",
}


def pass_at_k_of(feature: str) -> int | None:
    """k of a `pass@<k>` column, else None."""
    match = _PASS_AT_K.match(feature)
    return int(match.group(1)) if match else None


def label(features: Sequence[str]) -> str:
    """Readable name of a feature set: ("heldout_loss", "pass@64") -> "held-out loss + pre-RL pass@64"."""
    return " + ".join(f"pre-RL {f}" if pass_at_k_of(f) is not None else _LABELS.get(f, f) for f in features)


def parse_feature_sets(text: str) -> list[tuple[str, ...]]:
    """ "pass@1,heldout_loss+pass@64" -> [("pass@1",), ("heldout_loss", "pass@64")].

    Raises:
        PredictInputError: an empty set or feature name, a set listed twice, or a feature twice in a set.
    """
    sets = [tuple(f.strip() for f in item.split("+")) for item in text.split(",")]
    if any(not f for s in sets for f in s):
        raise PredictInputError(
            f"bad feature list {text!r}: expected comma-separated sets, features in a set joined by '+', "
            f"e.g. pass@1,heldout_loss,heldout_loss+pass@64"
        )
    if len(set(map(frozenset, sets))) < len(sets) or any(len(set(s)) < len(s) for s in sets):
        raise PredictInputError(f"bad feature list {text!r}: a feature set or a feature in a set repeats")
    return sets


def default_feature_sets(features: Sequence[str]) -> list[tuple[str, ...]]:
    """Each feature alone, then `heldout_loss + pass@<largest k>` if both are present."""
    sets = [(f,) for f in features]
    ks = [k for f in features if (k := pass_at_k_of(f)) is not None]
    if LOSS_FEATURE in features and ks:
        sets.append((LOSS_FEATURE, f"pass@{max(ks)}"))
    return sets


@dataclass(frozen=True)
class Analysis:
    """Every feature set fitted on one table, best first.

    Attributes:
        table: the input.
        fits: one per feature set, ranked (highest leave-one-out R^2 first, fewer features on ties).
        warnings: caveats to show with the results (e.g. too few labelled rows).
        higher_is_better: whether a larger target is better (ranks count from the best).
    """

    table: Table
    fits: tuple[FitResult, ...]
    warnings: tuple[str, ...]
    higher_is_better: bool

    @property
    def best(self) -> FitResult:
        return self.fits[0]

    def ranks(self) -> tuple[int, ...]:
        """Rank of every row by its prediction under the best set (1 = best; equal predictions by id)."""
        return _ranks(self.best.predicted, self.table.ids, self.higher_is_better)

    def candidate_ranks(self) -> tuple[int | None, ...]:
        """Rank among the candidates only (None for labelled rows)."""
        candidates = ~self.table.labelled
        sub = _ranks(
            [p for p, c in zip(self.best.predicted, candidates, strict=True) if c],
            [i for i, c in zip(self.table.ids, candidates, strict=True) if c],
            self.higher_is_better,
        )
        ranks = iter(sub)
        return tuple(next(ranks) if c else None for c in candidates)


def _ranks(values: Sequence[float], ids: Sequence[str], higher_is_better: bool) -> tuple[int, ...]:
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(range(len(values)), key=lambda i: (sign * values[i], ids[i]))
    ranks = [0] * len(values)
    for rank, i in enumerate(order, start=1):
        ranks[i] = rank
    return tuple(ranks)


def validate(table: Table, feature_sets: Sequence[Sequence[str]]) -> list[str]:
    """Check the table supports the fits; returns warnings, raises on errors.

    Raises:
        PredictInputError: unknown features (named, with the available ones), non-finite feature values
            (by run id), features constant over the labelled rows, fewer than 2 labelled rows, a constant
            target, no feature sets, or a feature twice in one set.
    """
    errors: list[str] = []
    if not feature_sets:
        errors.append("no feature sets to fit")
    errors += [f"feature set {list(s)} names a feature twice" for s in feature_sets if len(set(s)) < len(s)]
    used = list(dict.fromkeys(f for s in feature_sets for f in s))
    if unknown := [f for f in used if f not in table.columns]:
        errors.append(
            f"feature(s) {unknown} are not columns of {table.source}; available: {list(table.columns)}"
        )
    known = [f for f in used if f in table.columns]
    labelled = table.labelled
    n = int(labelled.sum())
    for f in known:
        column = np.asarray(table.columns[f], dtype=float)
        if bad := [i for i, v in zip(table.ids, column, strict=True) if not math.isfinite(v)]:
            errors.append(f"feature {f!r} is NaN or infinite for run(s) {bad}")
        elif n >= 2 and np.ptp(column[labelled]) == 0.0:
            errors.append(
                f"feature {f!r} is constant ({column[labelled][0]:g}) over the {n} rows with a target, so it "
                f"cannot predict anything; leave it out of the feature sets"
            )
    target = np.asarray(table.target, dtype=float)
    if n < 2:
        errors.append(
            f"{n} row(s) of {table.source} have a target ({table.target_name!r}); a fit needs at least 2 "
            f"(3 or more to be meaningful): add the post-RL results of more checkpoints"
        )
    elif np.ptp(target[labelled]) == 0.0:
        errors.append(
            f"the target {table.target_name!r} is the same for all {n} labelled rows: nothing to fit"
        )
    raise_if_errors(errors, f"cannot fit {table.source}")
    if n < MIN_RELIABLE_ROWS:
        return [
            f"only {n} rows have a target ({table.target_name}): the fits, their leave-one-out scores and "
            f"intervals are not meaningful with fewer than {MIN_RELIABLE_ROWS}; run RL on more checkpoints"
        ]
    return []


def analyze(
    table: Table,
    feature_sets: Sequence[Sequence[str]] | None = None,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.9,
    higher_is_better: bool = True,
) -> Analysis:
    """Fit and score every feature set, rank them and predict every row with the best.

    Args:
        table: checkpoints by metrics, a few with the post-RL target.
        feature_sets: the sets to compare; None: `default_feature_sets` of the table's columns.
        resamples, seed, level: bootstrap resamples, seed and interval coverage (see `fit_feature_set`).
        higher_is_better: a larger target is better (False for a loss-like target).

    Raises:
        PredictInputError: see `validate`.
    """
    sets = [
        tuple(s)
        for s in (feature_sets if feature_sets is not None else default_feature_sets(list(table.columns)))
    ]
    warnings = validate(table, sets)
    for warning in warnings:
        logger.warning("%s", warning)
    y = np.asarray(table.target, dtype=float)
    fits = [fit_feature_set(table.matrix(s), y, s, resamples=resamples, seed=seed, level=level) for s in sets]
    order = sorted(range(len(fits)), key=lambda i: (-fits[i].r2_loo, len(fits[i].features), i))
    return Analysis(table, tuple(fits[i] for i in order), tuple(warnings), higher_is_better)


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _grade(r2_loo: float) -> str:
    if r2_loo >= GOOD_R2:
        return "a good"
    return "a moderate" if r2_loo >= MODERATE_R2 else "a poor"


def summarize(analysis: Analysis) -> list[str]:
    """Plain-language sentences: which proxy predicts best, how the SFT score does, the top candidate."""
    best, target = analysis.best, analysis.table.target_name
    lines = [
        f"{_capitalized(label(best.features))} predicts {target} best: leave-one-out R^2 {best.r2_loo:.2f}, "
        f"Spearman {best.spearman:.2f} between fitted and actual values (n={best.n}); "
        f"{_grade(best.r2_loo)} predictor."
    ]
    ks = sorted(
        (
            (k, fit)
            for fit in analysis.fits
            if len(fit.features) == 1 and (k := pass_at_k_of(fit.features[0]))
        ),
        key=lambda pair: pair[0],
    )
    if ks and ks[0][1] is not best:
        k, fit = ks[0]
        lines.append(
            f"{_capitalized(label(fit.features))} alone{' (the SFT score)' if k == 1 else ''} is "
            f"{_grade(fit.r2_loo)} predictor: leave-one-out R^2 {fit.r2_loo:.2f}; its Spearman correlation "
            f"with {target} is {fit.feature_spearman[fit.features[0]]:.2f}."
        )
    if len(analysis.fits) > 1:
        lines.append(
            f"The best of {len(analysis.fits)} feature sets was picked on these same {best.n} rows, so its "
            f"leave-one-out R^2 is somewhat optimistic."
        )
    candidate_ranks = analysis.candidate_ranks()
    if 1 in candidate_ranks:
        i = candidate_ranks.index(1)
        pct = round(100 * best.level)
        lines.append(
            f"Top candidate: {analysis.table.ids[i]}, predicted {target} {best.predicted[i]:.4g} "
            f"({pct}% interval of the fit {best.ci_low[i]:.4g} to {best.ci_high[i]:.4g}; a single run may "
            f"land between {best.pi_low[i]:.4g} and {best.pi_high[i]:.4g})."
        )
    else:
        lines.append("Every row has a target: there are no candidates to rank.")
    return lines


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def fit_records(analysis: Analysis) -> list[dict[str, Any]]:
    """fit.json: one object per feature set, best first (non-finite numbers as null)."""
    return [
        {
            "features": list(fit.features),
            "n": fit.n,
            "r2": _json_float(fit.r2),
            "r2_loo": _json_float(fit.r2_loo),
            "spearman": _json_float(fit.spearman),
            "kendall": _json_float(fit.kendall),
            "coef": {k: _json_float(v) for k, v in fit.coef.items()},
            "intercept": _json_float(fit.intercept),
            "spearman_loo": _json_float(fit.spearman_loo),
            "feature_spearman": {k: _json_float(v) for k, v in fit.feature_spearman.items()},
            "model": fit.model,
            "alpha": fit.alpha,
            "intervals": {k: [_json_float(lo), _json_float(hi)] for k, (lo, hi) in fit.intervals.items()},
            "level": fit.level,
            "bootstrap": {"resamples": fit.resamples, "used": fit.resamples_used, "seed": fit.seed},
        }
        for fit in analysis.fits
    ]


def prediction_rows(analysis: Analysis) -> list[dict[str, Any]]:
    """predictions.csv: every row under the best set, in rank order.

    Keys, in column order: rank, candidate_rank (None for labelled rows), run, status ("labelled" or
    "candidate"), <target name> (None for candidates), predicted, ci_low, ci_high, pi_low, pi_high (see
    `FitResult`), loo_predicted (None for candidates).
    """
    best, table = analysis.best, analysis.table
    ranks, candidate_ranks = analysis.ranks(), analysis.candidate_ranks()
    rows = []
    for i in sorted(range(len(table.ids)), key=ranks.__getitem__):
        labelled = math.isfinite(table.target[i])
        rows.append(
            {
                "rank": ranks[i],
                "candidate_rank": candidate_ranks[i],
                "run": table.ids[i],
                "status": "labelled" if labelled else "candidate",
                table.target_name: table.target[i] if labelled else None,
                "predicted": best.predicted[i],
                "ci_low": best.ci_low[i],
                "ci_high": best.ci_high[i],
                "pi_low": best.pi_low[i],
                "pi_high": best.pi_high[i],
                "loo_predicted": best.loo[i] if labelled else None,
            }
        )
    return rows
