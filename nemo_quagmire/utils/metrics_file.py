"""The metrics.jsonl format shared by the writers (trainers, callbacks) and the readers (predictor report).

One JSON object per line, each with an integer `step`; validation records carry `val/...` keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order.

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not a JSON object with an integer `step` (the message names file:line).
    """
    path = Path(path)
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{lineno}: expected an object with an integer 'step'")
        records.append(record)
    return records
