"""Metric logging for training runs: metrics.jsonl first, TensorBoard, and W&B / MLflow when asked for.

metrics.jsonl in the run directory is the record users read while a run goes (`tail -f`) and the predictor
report reads afterwards, so it is written on rank 0 only, one JSON object per step, flushed every step. After
a resume, entries past the checkpoint's step are dropped first: the resumed run writes those steps again, and
the file then holds exactly what an uninterrupted run would have written.

Metric names are namespaced: `train/...`, `val/<bench>/pass@<k>`, `val/heldout_loss/...`, `timing/...`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import get_logger, global_rank
from nemo_quagmire.utils.metrics_file import METRICS_FILE, read_metrics

logger = get_logger(__name__)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-dim tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as "nan"/"inf"
    return value


class MetricsLogger:
    """Writes step metrics to metrics.jsonl and the optional backends; a no-op on ranks other than 0.

    Args:
        run_dir: directory of the run (metrics.jsonl and tensorboard/ go there).
        tensorboard: also write TensorBoard event files.
        wandb: also log to Weights & Biases (`{"project": ..., ...}` passed to `wandb.init`), if installed.
        mlflow: also log to MLflow (`{"experiment": ...}`), if installed.
        resume_step: drop metrics.jsonl records with `step > resume_step` (the steps a resumed run redoes);
            None starts a new file.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: Mapping[str, Any] | None = None,
        mlflow: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = global_rank() == 0
        self.path = Path(run_dir) / METRICS_FILE
        self._sinks: list[Any] = []
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._sinks.append(_TensorBoard(SummaryWriter(str(Path(run_dir) / "tensorboard"))))
        if wandb is not None:
            self._sinks.append(_optional_sink("wandb", lambda m: _WandB(m, dict(wandb))))
        if mlflow is not None:
            self._sinks.append(_optional_sink("mlflow", lambda m: _MLflow(m, dict(mlflow))))
        self._sinks = [sink for sink in self._sinks if sink is not None]

    def _truncate(self, resume_step: int | None) -> None:
        if not self.path.exists():
            return
        if resume_step is None:
            self.path.unlink()
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        with atomic_write(self.path) as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one record `{"step": step, "time": unix seconds, **metrics}` and flush it."""
        if not self.enabled:
            return
        record = {
            "step": step,
            "time": round(time.time(), 3),
            **{k: _jsonable(v) for k, v in metrics.items()},
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {
            k: v for k, v in record.items() if isinstance(v, int | float) and k not in ("step", "time")
        }
        for sink in self._sinks:
            sink.log(step, numeric)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        for sink in self._sinks:
            sink.close()


def _optional_sink(module: str, make: Any) -> Any:
    try:
        imported = __import__(module)
    except ImportError:
        logger.warning("%s logging was enabled but %s is not installed: skipping it", module, module)
        return None
    return make(imported)


class _TensorBoard:
    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandB:
    def __init__(self, wandb: Any, init_kwargs: dict[str, Any]) -> None:
        self._wandb = wandb
        self._run = wandb.init(**init_kwargs)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class _MLflow:
    def __init__(self, mlflow: Any, options: dict[str, Any]) -> None:
        self._mlflow = mlflow
        if "experiment" in options:
            mlflow.set_experiment(options["experiment"])
        mlflow.start_run()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


class StageTimer:
    """Wall-clock seconds per named stage of a step, reported as `timing/<stage>` (and `timing/step`)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """Seconds per stage so far, plus the total since construction."""
        total = time.perf_counter() - self._start
        return {**{f"timing/{k}": v for k, v in self._seconds.items()}, "timing/step": total}
