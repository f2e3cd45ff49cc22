from __future__ import annotations

import json
import math

from nemo_quagmire.trainer import metrics as metrics_module
from nemo_quagmire.trainer.metrics import METRICS_FILE, MetricsLogger, StageTimer, read_metrics


def test_records_are_flushed_every_step_and_non_finite_values_stay_visible(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"train/loss": 0.5, "train/grad_norm": float("nan")})
    # Readable before close: users tail the file while the run goes.
    first = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])
    assert first["step"] == 1 and first["train/loss"] == 0.5 and first["train/grad_norm"] == "nan"
    logger.log(2, {"train/loss": 0.25})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1, 2]


def test_resume_drops_the_steps_after_the_checkpoint_and_a_new_run_starts_empty(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"train/loss": float(step)})
    logger.close()
    resumed = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    resumed.log(4, {"train/loss": 40.0})
    resumed.close()
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [(r["step"], r["train/loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    fresh = MetricsLogger(tmp_path, tensorboard=False)
    fresh.close()
    assert read_metrics(tmp_path / METRICS_FILE) == []


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_module, "global_rank", lambda: 1)
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    assert not (tmp_path / METRICS_FILE).exists() and not (tmp_path / "tensorboard").exists()


def test_tensorboard_gets_the_numeric_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(3, {"train/loss": 0.75, "note": "text is not a scalar"})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]
    (scalar,) = events.Scalars("train/loss")
    assert scalar.step == 3 and math.isclose(scalar.value, 0.75)


def test_missing_optional_backends_are_skipped_with_a_warning(tmp_path, caplog, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    logger = MetricsLogger(tmp_path, tensorboard=False, wandb={"project": "p"})
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    assert "wandb is not installed" in caplog.text


def test_stage_timer_accumulates_named_stages():
    clock = iter([0.0, 1.0, 3.0, 3.5, 4.0, 10.0])
    timer = StageTimer.__new__(StageTimer)
    timer._seconds = {}
    original = metrics_module.time.perf_counter
    metrics_module.time.perf_counter = lambda: next(clock)
    try:
        timer._start = metrics_module.time.perf_counter()  # 0.0
        with timer.stage("generate"):  # 1.0 -> 3.0
            pass
        with timer.stage("generate"):  # 3.5 -> 4.0
            pass
        result = timer.metrics()  # total at 10.0
    finally:
        metrics_module.time.perf_counter = original
    assert result == {"timing/generate": 2.5, "timing/step": 10.0}
