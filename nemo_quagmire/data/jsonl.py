"""JSON-lines record files: written atomically, read back with every line checked against a fixed schema.

Why strict: an SFT or RL file with a missing key or a number where a string belongs would otherwise fail deep
inside a training step, or train on the wrong text silently; here it fails at load time naming `file:line`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from nemo_quagmire.utils.io import atomic_write

__all__ = ["RL_FIELDS", "SFT_FIELDS", "RecordFileError", "read_records", "write_records"]

SFT_FIELDS = ("prompt", "response")  # SFT and held-out examples
RL_FIELDS = ("id", "prompt", "answer")  # RL prompts with their gold answers


class RecordFileError(ValueError):
    """A record file does not match its schema (the message names `file:line`)."""


def write_records(path: str | os.PathLike, records: Iterable[Mapping[str, object]]) -> int:
    """Write one JSON object per line, atomically (a crash leaves the old file or none); returns the count."""
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def iter_json_lines(path: str | os.PathLike, error: type[Exception]) -> Iterator[tuple[str, object]]:
    """`("file:line", parsed value)` for each line of a JSONL file; a line that is not JSON raises `error`
    naming file:line and column."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from err


def read_records(path: str | os.PathLike, fields: Sequence[str]) -> list[dict[str, str]]:
    """Read a JSONL file whose lines are objects with exactly the string keys `fields`, in file order.

    Raises:
        RecordFileError: a line is not JSON, not an object, has other keys, or a non-string value; or the
            file is empty.
    """
    records: list[dict[str, str]] = []
    for where, record in iter_json_lines(path, RecordFileError):
        if not isinstance(record, dict) or set(record) != set(fields):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise RecordFileError(f"{where}: expected an object with keys {list(fields)}, got {keys}")
        if bad := [key for key in fields if not isinstance(record[key], str)]:
            raise RecordFileError(f"{where}: values of {bad} must be strings")
        records.append(record)
    if not records:
        raise RecordFileError(f"{path}: no records in the file")
    return records
