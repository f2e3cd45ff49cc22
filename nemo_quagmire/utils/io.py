"""File output that never leaves a partial result: one file atomically (a temporary sibling, then a rename),
several files all or nothing (`write_outputs`), and a writability check to run before the work
(`check_output_dir`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from nemo_quagmire.utils.errors import InputError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to `path`; on success fsync and rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Fail early if files cannot be created in directory `path` (which may not exist yet); creates nothing.

    Run it before any heavy work, so a read-only location, a path that is a file or a missing permission is
    reported in seconds rather than after the compute. `what` names the setting (`--out`, `run_dir`).

    Raises:
        InputError: naming `what`, the path and the reason.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a directory; give a directory path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} {path}: {existing} is a file, so the directory cannot be created")
    try:  # a real probe: permissions, read-only mounts and a full inode table all show here
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(
            f"{what} {path}: cannot create files in {existing} ({err.strerror}); choose a writable location"
        ) from None
    return path


def write_outputs(out_dir: str | os.PathLike, files: Mapping[str, str | bytes]) -> list[Path]:
    """Write several result files into `out_dir` all or nothing.

    Every file is first written in full (and fsynced) to a temporary sibling; only when all are written are
    they renamed into place. A failure on the way (a full disk, a quota) removes every temporary file and
    the directory if this call created it, and re-raises: the caller never leaves a partial result set.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        for name, content in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
            staged.append((name, Path(tmp)))
            os.chmod(tmp, 0o666 & ~_current_umask())
            with os.fdopen(fd, "wb") as handle:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
                handle.flush()
                os.fsync(handle.fileno())
        for name, tmp in staged:
            os.replace(tmp, out_dir / name)
    except BaseException:
        for _, tmp in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if empty
        raise
    return [out_dir / name for name in files]
