"""The error contract of every command-line tool, in one place.

Every input error (a bad argument, config value or input file; an output location that cannot be written)
raises an `InputError` subclass whose message names the file:line or key, the bad value and the fix. The
scripts' `main` runs under `cli_main`, which turns it into that message on stderr and exit code 2, without
a traceback, and turns Ctrl-C into exit code 130, also without a traceback. Checks run before any heavy
work, and outputs are written only once everything is computed (`nemo_quagmire.utils.io.write_outputs`),
so an input error leaves nothing behind.
"""

from __future__ import annotations

import errno
import importlib.util
import sys
from collections.abc import Callable

__all__ = [
    "EXIT_INPUT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "OUTPUT_ERRNOS",
    "TRAIN_MODULES",
    "InputError",
    "cli_main",
    "require_extra",
]

EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped early on request, after a checkpoint
# Where the output cannot go: reported like an input error (the user picks the location), not a crash.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


class InputError(ValueError):
    """Bad user input: the message names the file:line or key, the value and the fix (exit code 2)."""


TRAIN_MODULES = ("hydra", "omegaconf", "megatron.core")  # what the [train] extra adds to the light base


def require_extra(extra: str, modules: tuple[str, ...], *, needed_by: str) -> None:
    """Raise `InputError` naming the install command when a module of a pip extra is missing (a light
    install running a training entry point), before anything imports it."""

    def present(module: str) -> bool:
        parts = module.split(".")
        return all(importlib.util.find_spec(".".join(parts[: i + 1])) is not None for i in range(len(parts)))

    if missing := [module for module in modules if not present(module)]:
        raise InputError(
            f"{needed_by} needs the [{extra}] install ({', '.join(missing)} missing here); run "
            f'pip install -c constraints.txt -e ".[{extra}]" from the repository (or use the NGC container)'
        )


def cli_main(main: Callable[[], int | None], *, prefix: str = "error") -> int:
    """Run a script's `main` under the error contract; returns the exit code.

    `InputError` -> its message and 2; an `OSError` of a full disk, quota, read-only file system or missing
    permission -> what could not be written and 2 (the writers leave nothing partial); `KeyboardInterrupt`
    -> "interrupted" and 130. A `SystemExit` (argparse's usage errors exit 2 already) passes through; any
    other exception is a bug and keeps its traceback.
    """
    try:
        return int(main() or 0)
    except InputError as error:
        print(f"{prefix}: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as error:
        if error.errno not in OUTPUT_ERRNOS:
            raise
        where = f" ({error.filename})" if error.filename else ""
        print(f"{prefix}: {error.strerror}{where}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
