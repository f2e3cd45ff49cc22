"""Predict which SFT checkpoints will be best after RL, from the few that went through RL; write a report.

Usage:
    python scripts/predict_report.py --table T.csv --target COLUMN --out DIR [--features a,b+c,...]
    python scripts/predict_report.py --sft-runs RUN [RUN ...] --rl-runs RUN [RUN ...] --out DIR \
        [--rl-metric val/macro/pass@1]
    python scripts/predict_report.py --table scripts/examples/predict/checkpoints.csv \
        --target post_rl_pass@1 --out runs/predict-example

Input, either
- a CSV table, one row per SFT checkpoint: `run` (an identifier), numeric feature columns (e.g. pass@1 ...
  pass@64, heldout_loss) and the target column; an empty target marks a candidate to rank; or
- run directories: SFT runs (features from their validation in metrics.jsonl; `DIR`, `DIR@STEP` or
  `DIR/checkpoints/step_N`) and GRPO runs (target from their last validation, each linked to its SFT
  checkpoint by run_info.json); see nemo_quagmire/predict/runs.py for the formats.

--features lists the feature sets to compare, comma-separated, features in a set joined by '+'; default:
each feature alone plus heldout_loss + pass@<largest k>. The best set (highest leave-one-out R^2) predicts
every row.

Output (written only after all input was validated and everything was computed; each file atomically):
    DIR/fit.json         one object per feature set, best first: features, n, r2, r2_loo, spearman, kendall,
                         coef, intercept, plus spearman_loo, model, alpha, intervals, level, bootstrap
    DIR/predictions.csv  every row in rank order under the best set, with fit and prediction intervals
    DIR/report.html      one self-contained page: plots, ranked tables, a plain-language summary
    DIR/table.csv        (run-directory input only) the table that was built, readable with --table
The summary goes to stdout. Exit code 2 on bad input (every problem named; nothing written).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from nemo_quagmire.predict.analysis import (
    analyze,
    fit_records,
    parse_feature_sets,
    prediction_rows,
    summarize,
)
from nemo_quagmire.predict.report import render_html
from nemo_quagmire.predict.runs import DEFAULT_RL_METRIC, table_from_runs
from nemo_quagmire.predict.table import Table, read_table, table_to_csv
from nemo_quagmire.utils.errors import cli_main
from nemo_quagmire.utils.io import check_output_dir, write_outputs
from nemo_quagmire.utils.logging import configure_logging, get_logger

logger = get_logger("predict_report")


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        )
    return buffer.getvalue()


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_argument_group("input: a table, or run directories")
    source.add_argument("--table", type=Path, help="CSV: run, feature columns, target (empty = candidate)")
    source.add_argument("--target", help="the target column of --table, e.g. post_rl_pass@1")
    source.add_argument("--sft-runs", nargs="+", default=[], metavar="RUN", help="SFT runs or checkpoints")
    source.add_argument("--rl-runs", nargs="+", default=[], type=Path, metavar="RUN", help="GRPO run dirs")
    source.add_argument(
        "--rl-metric", default=DEFAULT_RL_METRIC, help=f"post-RL target key (default {DEFAULT_RL_METRIC})"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--features", help="feature sets, e.g. pass@1,heldout_loss,heldout_loss+pass@64")
    parser.add_argument("--bootstrap", type=_non_negative, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--level", type=_fraction, default=0.9, help="interval coverage (default 0.9)")
    parser.add_argument(
        "--lower-is-better", action="store_true", help="rank smaller targets first (a loss-like target)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0 done, 2 bad input (message on stderr, nothing written), 130 Ctrl-C."""
    return cli_main(lambda: _report(argv))


def _report(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.table is not None and (args.sft_runs or args.rl_runs):
        parser.error("give either --table or --sft-runs/--rl-runs, not both")
    if args.table is not None and args.target is None:
        parser.error("--table needs --target (the post-RL column)")
    if args.table is None and not args.rl_runs:
        parser.error("give --table T.csv --target COLUMN, or --rl-runs (and optionally --sft-runs)")
    if args.table is None and args.target is not None:
        parser.error("--target names a --table column; with run directories use --rl-metric")
    configure_logging()

    check_output_dir(args.out, "--out")
    feature_sets = parse_feature_sets(args.features) if args.features else None
    if args.table is not None:
        used = list(dict.fromkeys(f for s in feature_sets for f in s)) if feature_sets else None
        table: Table = read_table(args.table, args.target, used)
    else:
        table = table_from_runs(args.sft_runs, args.rl_runs, args.rl_metric)
    analysis = analyze(
        table,
        feature_sets,
        resamples=args.bootstrap,
        seed=args.seed,
        level=args.level,
        higher_is_better=not args.lower_is_better,
    )
    summary = summarize(analysis)
    outputs = {
        "fit.json": json.dumps(fit_records(analysis), indent=2) + "\n",
        "predictions.csv": _csv_text(prediction_rows(analysis)),
        "report.html": render_html(analysis, summary),
    }
    if args.table is None:
        outputs["table.csv"] = table_to_csv(table)
    write_outputs(args.out, outputs)
    print("\n".join(summary))
    print("wrote " + ", ".join(str(args.out / name) for name in outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
