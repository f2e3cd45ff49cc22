"""Finished shards of a long evaluation on disk: what lets a killed evaluation continue where it stopped.

Why shards: pass@64 from n = 256 samples over the 2,866 problems of the seven benchmarks is 734k completions,
hours of generation per checkpoint. The Pass@k evaluator (`nemo_quagmire.callbacks.passk`) therefore cuts each
benchmark into shards of a few problems; as soon as every completion of a shard is graded, the shard's samples
are written here (atomically, one parquet file each, the columns of `nemo_quagmire.eval.samples`). A re-run
with the same arguments reads the finished shards back and generates only the others; since every generation
call is seeded from its shard and position, not from the process or engine that ran it, the resumed result
equals an uninterrupted one (with a deterministic engine), whatever the number of engines or ranks.

Layout: `<dir>/arguments.json` (everything that decides the samples: model, sampling, problems, seeds) and
`<dir>/<benchmark>/shard-XXXXX.parquet`. Arguments that differ from the stored ones are refused
(`ShardStoreMismatch`, naming each differing key): mixing samples of two settings would be silently wrong.
A shard file that cannot be read or does not hold exactly its shard's samples is refused too, naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_quagmire.eval.samples import SampleRecord, read_samples, write_samples
from nemo_quagmire.utils.io import atomic_write

__all__ = ["ARGUMENTS_FILE", "ShardKey", "ShardStore", "ShardStoreError", "ShardStoreMismatch"]

ARGUMENTS_FILE = "arguments.json"


class ShardStoreError(ValueError):
    """The shard directory cannot be resumed from (the message names the file and the fix)."""


class ShardStoreMismatch(ShardStoreError):
    """The shard directory holds an evaluation with other arguments."""


@dataclass(frozen=True, order=True)
class ShardKey:
    """Shard `index` of `benchmark` (problems `index * shard_size ...` of the evaluator's order)."""

    benchmark: str
    index: int


class ShardStore:
    """The finished shards of one evaluation, under `directory`.

    Args:
        directory: where shards and `arguments.json` live (created at `begin`).
        arguments: JSON-serializable description of everything that decides the samples.
    """

    def __init__(self, directory: str | os.PathLike, arguments: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.arguments = json.loads(json.dumps(dict(arguments), sort_keys=True))  # tuples -> lists

    def check(self) -> None:
        """Refuse a directory that holds an evaluation with other arguments; writes nothing.

        Raises:
            ShardStoreMismatch: each differing key with its stored and current value.
            ShardStoreError: an unreadable arguments file.
        """
        path = self.directory / ARGUMENTS_FILE
        if not path.is_file():
            return
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ShardStoreError(
                f"{path} is unreadable ({error}); delete {self.directory} to start this evaluation over"
            ) from None
        if stored == self.arguments:
            return
        differences = [
            f"{key}: stored {stored.get(key, '<absent>')!r}, now {self.arguments.get(key, '<absent>')!r}"
            for key in sorted(set(stored) | set(self.arguments))
            if stored.get(key) != self.arguments.get(key)
        ]
        raise ShardStoreMismatch(
            f"{self.directory} holds a resumable evaluation with other arguments:\n  "
            + "\n  ".join(differences)
            + "\nre-run with the stored arguments to continue it, or pass another --out (or delete "
            f"{self.directory}) to start over"
        )

    def begin(self) -> None:
        """Record the arguments (once checked); shards can be written from then on."""
        self.check()
        path = self.directory / ARGUMENTS_FILE
        if not path.is_file():
            with atomic_write(path) as handle:
                json.dump(self.arguments, handle, indent=2, sort_keys=True)

    def path(self, key: ShardKey) -> Path:
        return self.directory / key.benchmark / f"shard-{key.index:05d}.parquet"

    def finished(self, keys: Collection[ShardKey]) -> list[ShardKey]:
        """The shards among `keys` that are on disk (complete: files are written atomically)."""
        return [key for key in keys if self.path(key).is_file()]

    def write(self, key: ShardKey, records: Sequence[SampleRecord]) -> None:
        write_samples(self.path(key), records)

    def read(self, key: ShardKey, expected: Collection[tuple[str, int]]) -> list[SampleRecord]:
        """The shard's records, checked to be exactly the `(problem id, sample index)` pairs expected.

        Raises:
            ShardStoreError: the file is unreadable or holds other samples (named, with the fix).
        """
        path = self.path(key)
        try:
            records = read_samples(path)
        except (OSError, ValueError) as error:  # pyarrow's errors are OSError / ValueError subclasses
            raise ShardStoreError(
                f"{path} is damaged ({error}); delete it to generate the shard again"
            ) from None
        found = sorted((r.problem_id, r.sample_index) for r in records)
        if found != sorted(expected) or any(r.benchmark != key.benchmark for r in records):
            raise ShardStoreError(
                f"{path} holds {len(found)} samples that are not shard {key.index} of {key.benchmark!r} "
                f"under these arguments ({len(expected)} expected); delete it to generate the shard again"
            )
        return records
