"""The predictor's input: one row per SFT checkpoint, its pre-RL metrics and (for a few) the post-RL target.

Why a table: it is the one format every source reduces to (run directories, a spreadsheet of past studies,
numbers from a paper), so the fits never care where the numbers came from. A CSV table has an identifier
column `run`, numeric feature columns and the target column; an empty target cell marks a candidate, a
checkpoint that did not go through RL and is to be ranked.

Every problem in a file is reported at once, each by file:line and column, and nothing is returned from a
file with any problem, so a caller can validate fully before writing anything.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nemo_quagmire.utils.errors import InputError

ID_COLUMN = "run"
MAX_REPORTED_ERRORS = 20


class PredictInputError(InputError):
    """The predictor's input cannot be used; the message names every problem found and how to fix it."""


def raise_if_errors(errors: Sequence[str], header: str) -> None:
    """Raise one PredictInputError listing `errors` (the first MAX_REPORTED_ERRORS) under `header`."""
    if not errors:
        return
    more = len(errors) - MAX_REPORTED_ERRORS
    raise PredictInputError(
        f"{header}:\n  "
        + "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        + (f"\n  ... and {more} more" if more > 0 else "")
    )


@dataclass(frozen=True)
class Table:
    """Checkpoints by metrics.

    Attributes:
        ids: one identifier per row, unique.  # [N]
        columns: feature name -> one finite value per row, in the source's column order.  # {name: [N]}
        target_name: what the target column is called.
        target: the post-RL value per row, NaN for candidates.  # [N]
        source: where the table came from, for messages and the report.
    """

    ids: tuple[str, ...]
    columns: Mapping[str, tuple[float, ...]]
    target_name: str
    target: tuple[float, ...]
    source: str

    def matrix(self, features: Sequence[str]) -> np.ndarray:
        """The named feature columns side by side.  # [N, len(features)]"""
        return np.column_stack([np.asarray(self.columns[f], dtype=float) for f in features])

    @property
    def labelled(self) -> np.ndarray:
        """True for rows with a target.  # [N] bool"""
        return np.isfinite(np.asarray(self.target, dtype=float))


def duplicate_id_errors(ids: Sequence[str], where: Mapping[str, list[str]] | None = None) -> list[str]:
    """One message per identifier used more than once (`where[id]`: the places it was seen)."""
    return [
        f"run id {run!r} appears {count} times"
        + (f" ({', '.join(where[run])})" if where else "")
        + "; each checkpoint needs its own row"
        for run, count in Counter(ids).items()
        if count > 1
    ]


def read_table(path: str | Path, target: str, features: Sequence[str] | None = None) -> Table:
    """Read and validate a CSV table.

    Args:
        path: the CSV file (UTF-8, header row first).
        target: the target column; an empty cell marks a candidate.
        features: the feature columns to read; None reads every column except `run` and the target. Other
            columns are ignored (they may hold anything).

    Raises:
        PredictInputError: unreadable file, missing columns (named, with the columns present), empty or
            duplicate run ids, and cells that are empty (features), not numbers, NaN or infinite, each by
            file:line and column.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PredictInputError(f"cannot read table {path}: {err}") from err
    if not header:
        raise PredictInputError(f"{path} is empty: expected a header row with {ID_COLUMN!r} and {target!r}")
    if duplicated := sorted(name for name, count in Counter(header).items() if count > 1):
        raise PredictInputError(f"{path}: column(s) {duplicated} appear more than once in the header")
    chosen = features is not None
    if features is None:
        features = [name for name in header if name not in (ID_COLUMN, target)]
    wanted = [ID_COLUMN, target, *features]
    if missing := [name for name in dict.fromkeys(wanted) if name not in header]:
        raise PredictInputError(
            f"{path}: missing column(s) {missing}; the table has {header}. It needs {ID_COLUMN!r} (one id "
            f"per checkpoint), the target column and every feature asked for"
        )
    if target in features:
        raise PredictInputError(f"{path}: the target {target!r} cannot also be a feature")
    if not features:
        raise PredictInputError(f"{path}: no feature columns besides {ID_COLUMN!r} and the target {target!r}")

    position = {name: i for i, name in enumerate(header)}
    errors: list[str] = []
    ids: list[str] = []
    lines: dict[str, list[str]] = {}
    values: dict[str, list[float]] = {name: [] for name in [target, *features]}
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        if len(row) != len(header):
            errors.append(f"{where}: {len(row)} cells, the header has {len(header)}")
            continue
        run = row[position[ID_COLUMN]].strip()
        if not run:
            errors.append(f"{where}: empty {ID_COLUMN!r}; every row needs an identifier")
        ids.append(run)
        lines.setdefault(run, []).append(f"line {lineno}")
        for name, column in values.items():
            cell = row[position[name]].strip()
            value, problem = _parse_number(cell, is_target=name == target)
            if problem:
                errors.append(f"{where}: column {name!r}: {problem}")
            column.append(value)
    if not rows:
        errors.append(f"{path}: no data rows under the header")
    errors += duplicate_id_errors(ids, lines)
    hint = ""
    if not chosen and any("is not a number" in error for error in errors):
        hint = f" (every column but {ID_COLUMN!r} and the target is a feature unless features are named)"
    raise_if_errors(errors, f"{len(errors)} problem(s) in table {path}{hint}")
    return Table(
        ids=tuple(ids),
        columns={name: tuple(values[name]) for name in features},
        target_name=target,
        target=tuple(values[target]),
        source=str(path),
    )


def _parse_number(cell: str, is_target: bool) -> tuple[float, str | None]:
    """(value, None), or (NaN, what is wrong). An empty target is a candidate: (NaN, None)."""
    if not cell:
        if is_target:
            return math.nan, None
        return math.nan, "empty value; every feature needs a number in every row (or leave the column out)"
    try:
        value = float(cell)
    except ValueError:
        return math.nan, f"{cell!r} is not a number"
    if not math.isfinite(value):
        hint = " (leave the target empty to mark a candidate)" if is_target else ""
        return math.nan, f"{cell!r} is not a finite number{hint}"
    return value, None


def table_to_csv(table: Table) -> str:
    """The table as CSV text that `read_table` reads back unchanged (floats in full precision)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([ID_COLUMN, *table.columns, table.target_name])
    for i, run in enumerate(table.ids):
        target = table.target[i]
        writer.writerow(
            [
                run,
                *(repr(column[i]) for column in table.columns.values()),
                repr(target) if math.isfinite(target) else "",
            ]
        )
    return buffer.getvalue()
