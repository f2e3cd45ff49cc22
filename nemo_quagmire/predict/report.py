"""The predictor report as one self-contained HTML page.

Why one file: it is mailed around and opened on laptops, clusters' login nodes and CI artefact viewers, so it
needs no network, no scripts and no side files: the plots are PNGs inlined as base64, the CSS is inline.
Rendering recomputes nothing: every number on the page is read from the `Analysis` (the fitted lines are
drawn from its coefficients), so the page always agrees with fit.json and predictions.csv.

Plots use matplotlib's object API with the Agg canvas, never pyplot, so rendering changes no global backend.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nemo_quagmire.predict.analysis import Analysis, label, pass_at_k_of
from nemo_quagmire.predict.regression import FitResult

LABELLED_COLOR = "#1f77b4"  # blue: rows with a post-RL result
CANDIDATE_COLOR = "#ff7f0e"  # orange: candidates
SPEARMAN_COLOR = "#2ca02c"
LOSS_COLOR = "#7f7f7f"
DPI = 110
R2_FLOOR = -1.0  # the k-curve's axis starts here; lower values are drawn on it as down-pointing markers

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1120px; color: #222; line-height: 1.45; padding: 0 12px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.meta { color: #666; margin-top: 0; } .summary li { margin: 0.3em 0; }
.warning { background: #fff4e5; border-left: 4px solid #ff7f0e; padding: 8px 12px; margin: 12px 0; }
.row { display: flex; gap: 16px; flex-wrap: wrap; } .row img { flex: 1 1 420px; min-width: 0; }
img { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 0.92em; margin: 8px 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th { background: #f5f5f5; } td.name, th.name { text-align: left; }
tr.best td { font-weight: 600; } .note { color: #666; font-size: 0.88em; }
"""


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _interval(low: float, high: float, digits: int = 3) -> str:
    return f"[{_num(low, digits)}, {_num(high, digits)}]"


def _single_fits(analysis: Analysis) -> list[FitResult]:
    """Single-feature fits in the table's column order."""
    by_feature = {fit.features[0]: fit for fit in analysis.fits if len(fit.features) == 1}
    return [by_feature[f] for f in analysis.table.columns if f in by_feature]


def k_curve_png(analysis: Analysis) -> str | None:
    """R^2 (in sample, with its interval, and leave-one-out) of each single pass@k fit and the signed Spearman
    correlation of pass@k with the target, against k; None if fewer than 2 ks."""
    fits = sorted(
        (fit for fit in _single_fits(analysis) if pass_at_k_of(fit.features[0]) is not None),
        key=lambda fit: pass_at_k_of(fit.features[0]),
    )
    if len(fits) < 2:
        return None
    ks = np.array([pass_at_k_of(fit.features[0]) for fit in fits])
    fig = Figure(figsize=(5.4, 3.6), dpi=DPI)
    ax = fig.subplots()
    series = [
        ("R$^2$", [f.r2 for f in fits], [f.intervals["r2"] for f in fits], LABELLED_COLOR, "-"),
        ("leave-one-out R$^2$", [f.r2_loo for f in fits], None, LABELLED_COLOR, "--"),
        ("Spearman of pass@k with target", [f.feature_spearman[f.features[0]] for f in fits], None,
         SPEARMAN_COLOR, "-"),
    ]  # fmt: skip
    for name, values, intervals, color, style in series:
        values = np.array(values, dtype=float)
        clipped = values < R2_FLOOR
        ax.plot(ks, np.maximum(values, R2_FLOOR), style, color=color, marker="o", ms=4, label=name)
        ax.plot(ks[clipped], np.full(clipped.sum(), R2_FLOOR), "v", color=color, ms=8)
        if intervals is not None:
            low, high = np.array(intervals, dtype=float).T
            ax.fill_between(ks, np.maximum(low, R2_FLOOR), high, color=color, alpha=0.12, lw=0)
    loss = next((f for f in _single_fits(analysis) if f.features == ("heldout_loss",)), None)
    if loss is not None:
        ax.axhline(max(loss.r2_loo, R2_FLOOR), color=LOSS_COLOR, ls=":", label="held-out loss, LOO R$^2$")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(R2_FLOOR - 0.05, 1.05)
    ax.axhline(0.0, color="#bbb", lw=0.8)
    ax.set_xlabel("k of pre-RL pass@k")
    ax.set_title(f"How well pre-RL pass@k predicts {analysis.table.target_name}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def loo_png(analysis: Analysis) -> str:
    """The best set's leave-one-out predictions against the actual target, with the identity line."""
    best, table = analysis.best, analysis.table
    labelled = table.labelled
    actual = np.asarray(table.target)[labelled]
    loo = np.asarray(best.loo)[labelled]
    fig = Figure(figsize=(4.6, 3.6), dpi=DPI)
    ax = fig.subplots()
    low, high = min(actual.min(), loo.min()), max(actual.max(), loo.max())
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="#999", lw=1)
    ax.scatter(actual, loo, color=LABELLED_COLOR, zorder=3)
    for run, x, y in zip(np.asarray(table.ids)[labelled], actual, loo, strict=True):
        ax.annotate(run, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points", color="#444")
    ax.set_xlabel(f"actual {table.target_name}")
    ax.set_ylabel("leave-one-out prediction")
    ax.set_title(f"Best set: {label(best.features)}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def scatter_png(analysis: Analysis, columns: int = 4) -> str | None:
    """One panel per single-feature fit: labelled rows, the fitted line, candidates on it with intervals."""
    fits = _single_fits(analysis)
    if not fits:
        return None
    table = analysis.table
    labelled = table.labelled
    target = np.asarray(table.target)
    columns = min(columns, len(fits))
    rows = math.ceil(len(fits) / columns)
    fig = Figure(figsize=(2.75 * columns, 2.5 * rows), dpi=DPI)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, fit in zip(axes, fits, strict=False):
        feature = fit.features[0]
        x = np.asarray(table.columns[feature])
        predicted = np.asarray(fit.predicted)
        span = np.array([x.min(), x.max()])
        ax.plot(span, fit.intercept + fit.coef[feature] * span, color="#333", lw=1.2)
        ax.scatter(x[labelled], target[labelled], color=LABELLED_COLOR, s=22, zorder=3)
        if (~labelled).any():
            candidates = ~labelled
            ax.errorbar(
                x[candidates],
                predicted[candidates],
                yerr=[
                    predicted[candidates] - np.asarray(fit.ci_low)[candidates],
                    np.asarray(fit.ci_high)[candidates] - predicted[candidates],
                ],
                fmt="D",
                ms=5,
                mfc="white",
                color=CANDIDATE_COLOR,
                zorder=4,
                lw=1,
            )
        ax.set_title(
            f"{feature}: R$^2$ {_num(fit.r2, 2)}, LOO {_num(fit.r2_loo, 2)}, "
            f"ρ {_num(fit.feature_spearman[feature], 2)}",
            fontsize=8.5,
        )
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(fits) :]:
        ax.set_visible(False)
    fig.supylabel(table.target_name, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], best_row: int | None = None) -> str:
    head = "".join(f'<th class="name">{h}</th>' if i == 0 else f"<th>{h}</th>" for i, h in enumerate(header))
    body = []
    for r, cells in enumerate(rows):
        tds = "".join(
            f'<td class="name">{c}</td>' if i == 0 else f"<td>{c}</td>" for i, c in enumerate(cells)
        )
        body.append(f"<tr{' class=best' if r == best_row else ''}>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _fits_table(analysis: Analysis) -> str:
    pct = round(100 * analysis.best.level)
    header = [
        "feature set", "model", "n", "R²", f"R² {pct}% CI", "LOO R²", "Spearman", f"Spearman {pct}% CI",
        "Kendall", "LOO Spearman",
    ]  # fmt: skip
    rows = [
        [
            html.escape(" + ".join(fit.features)),
            "OLS" if fit.model == "ols" else f"ridge (α={fit.alpha:.3g})",
            str(fit.n),
            _num(fit.r2),
            _interval(*fit.intervals["r2"]),
            _num(fit.r2_loo),
            _num(fit.spearman),
            _interval(*fit.intervals["spearman"]),
            _num(fit.kendall),
            _num(fit.spearman_loo),
        ]
        for fit in analysis.fits
    ]
    return _table(header, rows, best_row=0)


def _candidates_table(analysis: Analysis) -> str:
    best, table = analysis.best, analysis.table
    ranks = analysis.candidate_ranks()
    order = sorted((r, i) for i, r in enumerate(ranks) if r is not None)
    if not order:
        return "<p>Every checkpoint has a post-RL result: there are no candidates to rank.</p>"
    pct = round(100 * best.level)
    header = ["run", "rank", f"predicted {html.escape(table.target_name)}", f"{pct}% CI of the fit",
              f"{pct}% prediction interval"]  # fmt: skip
    rows = [
        [
            html.escape(table.ids[i]),
            str(rank),
            _num(best.predicted[i], 4),
            _interval(best.ci_low[i], best.ci_high[i], 4),
            _interval(best.pi_low[i], best.pi_high[i], 4),
        ]
        for rank, i in order
    ]
    return _table(header, rows)


def _labelled_table(analysis: Analysis) -> str:
    best, table = analysis.best, analysis.table
    ranks = analysis.ranks()
    order = sorted((ranks[i], i) for i in np.flatnonzero(table.labelled))
    header = ["run", "overall rank", f"actual {html.escape(table.target_name)}", "fitted", "leave-one-out"]
    rows = [
        [html.escape(table.ids[i]), str(rank), _num(table.target[i], 4), _num(best.predicted[i], 4),
         _num(best.loo[i], 4)]
        for rank, i in order
    ]  # fmt: skip
    return _table(header, rows)


def render_html(analysis: Analysis, summary: Sequence[str]) -> str:
    """The whole report page.

    Args:
        analysis: the fits to show.
        summary: the plain-language sentences (from `analysis.summarize`).
    """
    table, best = analysis.table, analysis.best
    n_labelled = int(table.labelled.sum())
    title = "Which SFT checkpoint will be best after RL"
    warnings = "".join(f'<div class="warning">⚠ {html.escape(w)}</div>' for w in analysis.warnings)
    figures = [
        _img(data, alt)
        for data, alt in (
            (k_curve_png(analysis), "R² and Spearman against k"),
            (loo_png(analysis), "leave-one-out predictions of the best feature set"),
        )
        if data is not None
    ]
    scatter = scatter_png(analysis)
    pct = round(100 * best.level)
    method = (
        "Least squares with an intercept while each leave-one-out fit is determined (features ≤ labelled "
        "rows − 2), ridge on standardized features otherwise (penalty chosen by leave-one-out error). "
        "Leave-one-out refits everything without the left-out row. "
        f"Intervals: {pct}% percentile bootstrap over the labelled rows ({best.resamples} resamples, seed "
        f"{best.seed}, the same resamples for every feature set); the prediction interval adds "
        "leave-one-out residuals to the bootstrap fits. In the tables, rank correlations are between the "
        "fitted values and the target (for one feature: the size of its correlation, whatever its sign). The "
        "best set has the highest leave-one-out R²."
    )
    parts = [
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{title}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        f'<p class="meta">{html.escape(table.source)} · target <b>{html.escape(table.target_name)}</b> '
        f"({'higher' if analysis.higher_is_better else 'lower'} is better) · {n_labelled} checkpoints with "
        f"a post-RL result, {len(table.ids) - n_labelled} candidates · {len(analysis.fits)} feature sets</p>",
        warnings,
        '<ul class="summary">' + "".join(f"<li>{html.escape(s)}</li>" for s in summary) + "</ul>",
        '<div class="row">' + "".join(figures) + "</div>",
        "<h2>Each proxy against the post-RL result</h2>",
        '<p class="note">Blue: checkpoints with a post-RL result; orange diamonds: candidates at their '
        f"predicted value, with the {pct}% interval of the fit; line: the single-feature fit; ρ: Spearman "
        "correlation of the feature with the target.</p>",
        _img(scatter, "scatter plots of each feature against the target") if scatter else "",
        "<h2>Candidates, ranked by the best feature set</h2>",
        _candidates_table(analysis),
        "<h2>Feature sets, best first</h2>",
        _fits_table(analysis),
        "<h2>Checkpoints with a post-RL result</h2>",
        _labelled_table(analysis),
        f'<p class="note">{html.escape(method)}</p>',
        "</body></html>",
    ]
    return "\n".join(parts)
