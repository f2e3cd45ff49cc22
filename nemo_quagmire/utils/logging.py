"""Rank-zero aware logging.

Library code logs through `get_logger(__name__)`; only rank 0 of a distributed job emits INFO and below,
so an 8-GPU run prints one line per event, not eight. Warnings and errors pass on every rank.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_ROOT = "nemo_quagmire"


def global_rank() -> int:
    """Rank of this process: torch.distributed if initialised, else the launcher's RANK variable, else 0."""
    # Only ask torch if it is already imported: a process group cannot exist otherwise, and importing torch
    # here would cost seconds to torch-free tools (the grading and report CLIs).
    if "torch.distributed" in sys.modules:
        dist = sys.modules["torch.distributed"]
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or global_rank() == 0


def get_logger(name: str) -> logging.Logger:
    """A logger under the package namespace whose INFO/DEBUG records pass on rank 0 only."""
    logger = logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")
    if not any(isinstance(f, _RankZeroFilter) for f in logger.filters):
        logger.addFilter(_RankZeroFilter())
    return logger


def configure_logging(level: int | str = logging.INFO) -> None:
    """Set up a console handler for entry-point scripts (library code never calls this)."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # megatron-core logs every parameter name and its whole optimizer config at INFO on each model build, and
    # it and torch.distributed warn about CPU fallbacks and their own deprecations on every call: noise to a
    # user of this project.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for module in ("megatron", "torch.distributed", "torch.jit"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
