"""JSON-lines record files: written atomically, read back with every line checked against a fixed schema.

Why strict: an SFT or RL file with a missing key or a number where a string belongs would otherwise fail deep
inside a training step, or train on the wrong text silently; here it fails at load time naming `file:line`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence

from nemo_quagmire.utils.errors import InputError
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.json_lines import iter_json_lines

__all__ = ["RL_FIELDS", "SFT_FIELDS", "RecordFileError", "read_records", "write_records"]

SFT_FIELDS = ("prompt", "response")  # SFT and held-out examples
RL_FIELDS = ("id", "prompt", "answer")  # RL prompts with their gold answers


class RecordFileError(InputError):
    """A record file does not match its schema (the message names `file:line`)."""


def write_records(path: str | os.PathLike, records: Iterable[Mapping[str, object]]) -> int:
    """Write one JSON object per line, atomically (a crash leaves the old file or none); returns the count."""
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_records(path: str | os.PathLike, fields: Sequence[str]) -> list[dict[str, str]]:
    """Read a JSONL file whose lines are objects with exactly the string keys `fields`, in file order.

    Raises:
        RecordFileError: a line is not JSON, not an object, has other keys, or a non-string value; or the
            file is empty.
    """
    if not os.path.isfile(path):
        raise RecordFileError(f"{path}: no such file")
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
