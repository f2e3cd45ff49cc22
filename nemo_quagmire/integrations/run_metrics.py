"""One metrics.jsonl writer per run directory, shared by every adapter that validates in that run.

Why shared: the held-out-loss and Pass@k adapters of one run both append to `<run_dir>/metrics.jsonl` (the
file the predictor report reads), and the first validation of a run must drop the records a resumed run
redoes (`MetricsLogger(resume_step=...)` rewrites the file). Two writers would each rewrite it, the second
discarding the first's record and leaving the first appending to a replaced file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_quagmire.trainer.metrics import MetricsLogger

__all__ = ["acquire_metrics_logger", "release_metrics_logger"]

_open: dict[Path, list[Any]] = {}  # resolved run dir -> [MetricsLogger, number of adapters using it]


def acquire_metrics_logger(run_dir: str | Path, first_step: int) -> MetricsLogger:
    """The run's writer; the first adapter to ask opens it, keeping only the records before `first_step`."""
    key = Path(run_dir).resolve()
    if key not in _open:
        _open[key] = [MetricsLogger(key, tensorboard=False, resume_step=first_step - 1), 0]
    _open[key][1] += 1
    return _open[key][0]


def release_metrics_logger(run_dir: str | Path) -> None:
    """One adapter is done with the run's writer; the last one closes it."""
    key = Path(run_dir).resolve()
    entry = _open.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        entry[0].close()
        del _open[key]
