"""Size and CRC-32 of every file of a directory, recorded when it is written and checked before it is read.

Why: a checkpoint is many files written by many ranks; a node that died mid-copy, a full disk on a
file system that reports it late, or a truncated transfer leaves a directory that looks complete but fails
deep inside `torch.load` with an error that names no checkpoint. With a manifest a damaged file is found
before anything is loaded, named with what differs, and a resume can fall back to an older checkpoint.
CRC-32 (zlib) reads at several GB/s, so checking costs one extra read of the files.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["FileDigest", "digest_files", "list_files", "manifest_problems"]

FileDigest = dict[str, int | str]  # {"size": bytes, "crc32": "8 hex digits"}
_BLOCK = 16 * 2**20


def list_files(root: str | os.PathLike, exclude: Sequence[str] = ()) -> list[str]:
    """Paths of the regular files under `root`, relative and "/"-separated, sorted; `exclude`d names off."""
    root = Path(root)
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.relative_to(root).as_posix() not in exclude
    )


def _crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def digest_files(root: str | os.PathLike, names: Sequence[str]) -> dict[str, FileDigest]:
    """`{name: {"size", "crc32"}}` of the files `names` under `root`."""
    root = Path(root)
    return {name: {"size": (root / name).stat().st_size, "crc32": _crc32(root / name)} for name in names}


def manifest_problems(
    root: str | os.PathLike, expected: Mapping[str, Mapping[str, object]], *, checksums: bool = True
) -> list[str]:
    """What differs between the files under `root` and their recorded digests (empty: all intact).

    Sizes are compared first (a truncated file shows without reading it), then, if `checksums`, CRC-32s.
    """
    root = Path(root)
    problems = []
    for name, digest in sorted(expected.items()):
        path = root / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if size != digest.get("size"):
            problems.append(f"{name} has {size} bytes, {digest.get('size')} were written")
        elif checksums and (crc := _crc32(path)) != digest.get("crc32"):
            problems.append(f"{name} has checksum {crc}, {digest.get('crc32')} was written")
    return problems
