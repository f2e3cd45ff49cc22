"""The metrics.jsonl format shared by the writers (trainers, callbacks) and the readers (predictor report).

One JSON object per line, each with an integer `step`; validation records carry `val/...` keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_quagmire.utils.errors import InputError
from nemo_quagmire.utils.json_lines import iter_json_lines

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order.

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not a JSON object with an integer `step` (the message names file:line).
    """
    path = Path(path)
    records = []
    for where, record in iter_json_lines(path, skip_blank=True):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise InputError(f"{where}: expected an object with an integer 'step'")
        records.append(record)
    return records
