"""The predictor's table built from run directories: SFT runs give the features, GRPO runs the target.

Why: the trainers already record everything the predictor needs (validation pass@k and held-out loss in
metrics.jsonl), so a study can be analysed from its run directories without copying numbers by hand. The
result is the same `Table` a CSV gives, and the report script saves it next to the report.

What is read:
- `<run>/metrics.jsonl` (nemo_quagmire/trainer/metrics.py): one JSON object per line with `step`; validation
  records carry `val/...` keys. Records of one step are merged (a step's training and validation metrics are
  separate records), later keys winning. Non-finite values are stored as the strings "nan"/"inf".
- `<grpo run>/run_info.json`, written by the GRPO trainer, says which SFT checkpoint the run started from::

      {"init_from": "runs/sft-25k-2ep/checkpoints/step_00000400"}

  `init_from` is an SFT run directory (meaning its last validation) or a checkpoint of one,
  `<sft run>/checkpoints/step_<N>` (its validation at step N); `<sft run>@<N>` also works. A relative path is
  relative to the GRPO run directory. Other keys are ignored.

The table:
- One row per SFT checkpoint: the sources listed, plus the `init_from` of every GRPO run, each counted once
  (by resolved run directory and step). Row id: `<sft run directory name>@<step>`.
- Features from the SFT validation record at that step: `val/macro/pass@<k>` -> `pass@<k>`,
  `val/heldout_loss/token_mean` -> `heldout_loss`, `val/heldout_loss/seq_mean` -> `heldout_loss_seq`. A
  feature missing from some rows is left out, with a warning naming them.
- Target: `rl_metric` (default `val/macro/pass@1`) at the GRPO run's last validation, in the column
  `post_rl_<feature name>` (e.g. `post_rl_pass@1`); the mean if several GRPO runs (seeds) start from one
  checkpoint. Checkpoints no GRPO run started from are the candidates.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nemo_quagmire.predict.table import PredictInputError, Table, duplicate_id_errors, raise_if_errors
from nemo_quagmire.utils.logging import get_logger
from nemo_quagmire.utils.metrics_file import METRICS_FILE, read_metrics

logger = get_logger(__name__)

RUN_INFO_FILE = "run_info.json"
DEFAULT_RL_METRIC = "val/macro/pass@1"
_CHECKPOINT_DIR = re.compile(r"^step_(\d+)$")
_AT_STEP = re.compile(r"^(.+)@(\d+)$")
_PASS_AT_K = re.compile(r"^val/macro/pass@(\d+)$")
_HELDOUT = {"val/heldout_loss/token_mean": "heldout_loss", "val/heldout_loss/seq_mean": "heldout_loss_seq"}


def feature_name(metric: str) -> str | None:
    """The table column of a metrics.jsonl key, or None if the predictor does not use it as a feature."""
    if match := _PASS_AT_K.match(metric):
        return f"pass@{match.group(1)}"
    return _HELDOUT.get(metric)


def target_column(rl_metric: str) -> str:
    """`val/macro/pass@1` -> `post_rl_pass@1`; other keys: `post_rl_` + the key without `val/`, `/` -> `_`."""
    return "post_rl_" + (feature_name(rl_metric) or rl_metric.removeprefix("val/").replace("/", "_"))


def _feature_order(name: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"pass@(\d+)", name)
    return (0, int(match.group(1)), name) if match else (1, 0, name)


def resolve_checkpoint(spec: str | Path, base: Path | None = None) -> tuple[Path, int | None]:
    """The SFT run directory and step (None: its last validation) of `DIR`, `DIR@STEP` or a checkpoint path.

    A checkpoint path is `DIR/checkpoints/step_<N>`; a relative path is taken relative to `base` if given.

    Raises:
        PredictInputError: the path is none of these (no metrics.jsonl where one is expected).
    """
    text = str(spec)
    step: int | None = None
    path = Path(text)
    if (match := _AT_STEP.match(text)) and not path.exists():
        path, step = Path(match.group(1)), int(match.group(2))
    if base is not None and not path.is_absolute():
        path = base / path
    if (path / METRICS_FILE).is_file():
        return path.resolve(), step
    match = _CHECKPOINT_DIR.match(path.name)
    if match and path.parent.name == "checkpoints" and (path.parent.parent / METRICS_FILE).is_file():
        return path.parent.parent.resolve(), int(match.group(1))
    raise PredictInputError(
        f"{text!r} (as {path}) is not an SFT run directory (no {METRICS_FILE}) or a checkpoint of one "
        f"(<run dir>/checkpoints/step_<N>); expected DIR, DIR@STEP or DIR/checkpoints/step_<N>"
    )


def validation_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Step -> the merged `val/...` metrics logged at that step, in step order.

    Raises:
        PredictInputError: a missing or unreadable file, or a malformed line (by file:line).
    """
    path = run_dir / METRICS_FILE
    try:
        records = read_metrics(path)
    except (OSError, UnicodeDecodeError) as err:
        raise PredictInputError(f"cannot read {path}: {err}") from err
    except ValueError as err:
        raise PredictInputError(str(err)) from err
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        val = {k: v for k, v in record.items() if k.startswith("val/")}
        if val:
            by_step.setdefault(record["step"], {}).update(val)
    return dict(sorted(by_step.items()))


def _record_at(run_dir: Path, step: int | None) -> tuple[int, dict[str, Any]]:
    records = validation_records(run_dir)
    if not records:
        raise PredictInputError(f"{run_dir / METRICS_FILE} has no validation records (no 'val/...' keys)")
    if step is None:
        step = next(reversed(records))
    if step not in records:
        raise PredictInputError(
            f"{run_dir / METRICS_FILE} has no validation at step {step}; validated steps: {list(records)}"
        )
    return step, records[step]


def _number(value: Any) -> float:
    """A metric value as float; "nan"/"inf" strings (how metrics.jsonl stores them) become non-finite."""
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def table_from_runs(
    sft_runs: Sequence[str | Path], rl_runs: Sequence[str | Path], rl_metric: str = DEFAULT_RL_METRIC
) -> Table:
    """Build the table (see the module docstring).

    Args:
        sft_runs: SFT checkpoints to include as `DIR`, `DIR@STEP` or `DIR/checkpoints/step_N`.
        rl_runs: GRPO run directories, each with run_info.json and metrics.jsonl.
        rl_metric: the metrics.jsonl key of the post-RL target.

    Raises:
        PredictInputError: every unreadable run, missing run_info.json or init_from, missing or non-finite
            target or feature value, and duplicate row ids, all at once.
    """
    errors: list[str] = []
    rows: dict[tuple[Path, int], dict[str, Any]] = {}  # (run dir, step) -> validation record
    targets: dict[tuple[Path, int], list[float]] = {}

    def add(spec: str | Path, base: Path | None) -> tuple[Path, int] | None:
        try:
            run_dir, step = resolve_checkpoint(spec, base)
            step, record = _record_at(run_dir, step)
        except PredictInputError as err:
            errors.append(str(err))
            return None
        rows.setdefault((run_dir, step), record)
        return run_dir, step

    for spec in sft_runs:
        add(spec, None)
    for rl in map(Path, rl_runs):
        info_path = rl / RUN_INFO_FILE
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            errors.append(
                f"GRPO run {rl}: cannot read {info_path} ({err}); it must say which SFT checkpoint "
                f'the run started from: {{"init_from": "<sft run dir or checkpoint>"}}'
            )
            continue
        if not isinstance(info, dict) or not isinstance(info.get("init_from"), str):
            errors.append(
                f'{info_path}: expected {{"init_from": "<sft run dir or checkpoint>"}}, got {info!r}'
            )
            continue
        key = add(info["init_from"], rl)
        try:
            _, record = _record_at(rl, None)
        except PredictInputError as err:
            errors.append(str(err))
            continue
        value = _number(record.get(rl_metric))
        if not math.isfinite(value):
            present = sorted(k for k in record if k.startswith("val/macro/"))
            errors.append(
                f"{rl / METRICS_FILE}: the last validation has {rl_metric!r} = {record.get(rl_metric)!r}, "
                f"not a finite number (val/macro keys there: {present})"
            )
        elif key is not None:
            targets.setdefault(key, []).append(value)

    ids = [f"{run_dir.name}@{step}" for run_dir, step in rows]
    errors += duplicate_id_errors(ids, {i: [str(d)] for i, (d, _) in zip(ids, rows, strict=True)})
    raise_if_errors(errors, f"{len(errors)} problem(s) in the run directories")

    present = [{name: v for k, v in record.items() if (name := feature_name(k))} for record in rows.values()]
    everywhere = set.intersection(*(set(p) for p in present)) if present else set()
    if partial := sorted(set().union(*present) - everywhere, key=_feature_order):
        lacking = {f: [i for i, p in zip(ids, present, strict=True) if f not in p] for f in partial}
        logger.warning("features left out because some checkpoints lack them: %s", lacking)
    features = sorted(everywhere, key=_feature_order)
    for run_id, (run_dir, step), values in zip(ids, rows, present, strict=True):
        errors += [
            f"{run_dir / METRICS_FILE} step {step} ({run_id}): {name} = {values[name]!r} is not finite"
            for name in features
            if not math.isfinite(_number(values[name]))
        ]
    if not features:
        errors.append(f"no pass@k or held-out loss metrics common to all {len(ids)} checkpoints: {ids}")
    raise_if_errors(errors, f"{len(errors)} problem(s) in the run directories")
    return Table(
        ids=tuple(ids),
        columns={f: tuple(_number(p[f]) for p in present) for f in features},
        target_name=target_column(rl_metric),
        target=tuple(sum(targets[k]) / len(targets[k]) if k in targets else math.nan for k in rows),
        source=f"{len(sft_runs)} SFT run(s) and {len(rl_runs)} GRPO run(s)",
    )
