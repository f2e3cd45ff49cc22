"""The stage runner with real child processes (tiny Python commands instead of training runs): dependency
order, the worker limit, markers, skipping done stages, retrying failed ones, relaunching interrupted ones,
and refusing a study directory made with other settings."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from nemo_quagmire.study.launchers import LocalLauncher
from nemo_quagmire.study.plan import Job
from nemo_quagmire.study.runner import (
    StageConflict,
    marker_path,
    read_marker,
    run_jobs,
    stage_table,
)

# Appends "<name> start <t>" / "<name> end <t>" to the journal, sleeps, exits: the seconds and the status come
# from the file <tmp>/behaviour/<name> when it exists (default 0.2 s, status 0), so a test can fix a job's
# "cause of failure" without changing its command.
STEP = """
import pathlib, sys, time
name, tmp = sys.argv[1], pathlib.Path(sys.argv[2])
behaviour = tmp / "behaviour" / name
seconds, status = (behaviour.read_text().split() if behaviour.exists() else ("0.2", "0"))
with open(tmp / "journal", "a") as journal:
    journal.write(f"{name} start {time.time()}\\n")
    journal.flush()
    time.sleep(float(seconds))
    journal.write(f"{name} end {time.time()}\\n")
sys.exit(int(status))
"""


def _job(tmp: Path, name: str, after=(), seed=0, kind="sft", cost=1.0) -> Job:
    return Job(name, kind, (sys.executable, "-c", STEP, name, str(tmp)), tmp / name, tuple(after), cost, seed)


def _behave(tmp: Path, name: str, seconds: float, status: int) -> None:
    path = tmp / "behaviour" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{seconds} {status}")


def _journal(tmp: Path) -> list[tuple[str, str, float]]:
    lines = (tmp / "journal").read_text().split("\n") if (tmp / "journal").exists() else []
    return [(n, e, float(t)) for n, e, t in (line.split() for line in lines if line)]


def _intervals(tmp: Path) -> dict[str, tuple[float, float]]:
    events = _journal(tmp)
    start = {n: t for n, e, t in events if e == "start"}
    return {n: (start[n], t) for n, e, t in events if e == "end"}


def _study(tmp: Path) -> list[Job]:
    """Three SFT -> GRPO pairs, then a report over the GRPO jobs."""
    return [
        _job(tmp, "sft/a", cost=3),
        _job(tmp, "grpo/a", after=["sft/a"]),
        _job(tmp, "sft/b", cost=2),
        _job(tmp, "grpo/b", after=["sft/b"]),
        _job(tmp, "sft/c", cost=1),
        _job(tmp, "grpo/c", after=["sft/c"]),
        _job(tmp, "report", after=["grpo/a", "grpo/b", "grpo/c"], kind="report", seed=1),
    ]


def test_jobs_run_after_their_dependencies_two_at_a_time(tmp_path):
    jobs = _study(tmp_path)
    result = run_jobs(tmp_path, jobs, LocalLauncher(), workers=2)
    assert result.ok and sorted(result.done) == sorted(j.name for j in jobs) and not result.skipped
    spans = _intervals(tmp_path)
    for job in jobs:
        for parent in job.after:
            assert spans[parent][1] <= spans[job.name][0], (parent, job.name)
    edges = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    assert peak == 2
    assert [read_marker(tmp_path, j)["state"] for j in jobs] == ["done"] * len(jobs)
    assert (tmp_path / "logs" / "sft" / "a.log").is_file()


def test_a_second_run_skips_every_done_stage(tmp_path):
    jobs = _study(tmp_path)
    run_jobs(tmp_path, jobs, LocalLauncher(), workers=2)
    before = _journal(tmp_path)
    again = run_jobs(tmp_path, jobs, LocalLauncher(), workers=2)
    assert again.ok and again.done == [] and sorted(again.skipped) == sorted(j.name for j in jobs)
    assert _journal(tmp_path) == before
    assert all("done in" in line for line in stage_table(tmp_path, jobs))


def test_a_failed_job_blocks_its_dependents_and_the_rerun_retries_it(tmp_path):
    jobs = _study(tmp_path)
    _behave(tmp_path, "sft/b", 0.1, 3)
    result = run_jobs(tmp_path, jobs, LocalLauncher(), workers=2)
    assert result.failed == ["sft/b"] and sorted(result.blocked) == ["grpo/b", "report"]
    assert {"sft/a", "grpo/a", "sft/c", "grpo/c"} == set(result.done)
    assert read_marker(tmp_path, jobs[2])["state"] == "started"
    _behave(tmp_path, "sft/b", 0.1, 0)  # the cause fixed
    retry = run_jobs(tmp_path, jobs, LocalLauncher(), workers=2)
    assert retry.ok and sorted(retry.done) == ["grpo/b", "report", "sft/b"]
    assert len(retry.skipped) == 4


def test_a_directory_made_with_other_settings_is_refused_before_anything_runs(tmp_path):
    jobs = _study(tmp_path)
    run_jobs(tmp_path, jobs[:2], LocalLauncher(), workers=2)
    before = _journal(tmp_path)
    other = Job("sft/a", "sft", (*jobs[0].argv, "lr=1"), tmp_path / "sft/a", (), 1.0, 0)
    with pytest.raises(StageConflict, match=r"sft/a: recorded \[\], planned \['lr=1'\]"):
        run_jobs(tmp_path, [other, *jobs[1:]], LocalLauncher(), workers=2)
    assert _journal(tmp_path) == before
    assert "made with other settings" in stage_table(tmp_path, [other])[0]


def test_an_interrupted_study_stops_its_jobs_and_relaunches_them_next_time(tmp_path):
    jobs = [_job(tmp_path, "sft/slow"), _job(tmp_path, "grpo/slow", after=["sft/slow"])]
    _behave(tmp_path, "sft/slow", 60, 0)
    timer = threading.Timer(1.5, _interrupt_main_thread)
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_jobs(tmp_path, jobs, LocalLauncher(), workers=2)
    assert time.monotonic() - started < 30  # the 60 s child was stopped, not waited for
    assert [e for n, e, _ in _journal(tmp_path)] == ["start"]
    assert read_marker(tmp_path, jobs[0])["state"] == "started"
    assert "not finished" in stage_table(tmp_path, jobs)[0]
    _behave(tmp_path, "sft/slow", 0.1, 0)
    again = run_jobs(tmp_path, jobs, LocalLauncher(), workers=2)
    assert again.ok and again.done == ["sft/slow", "grpo/slow"]


def _interrupt_main_thread() -> None:
    import _thread

    _thread.interrupt_main()


def test_the_report_reruns_when_its_inputs_change(tmp_path):
    jobs = _study(tmp_path)
    run_jobs(tmp_path, jobs, LocalLauncher(), workers=2)
    report = jobs[-1]
    more = Job(report.name, report.kind, report.argv + ("extra",), report.run_dir, report.after, 1.0, 1)
    assert "outdated" in stage_table(tmp_path, [*jobs[:-1], more])[-1]
    result = run_jobs(tmp_path, [*jobs[:-1], more], LocalLauncher(), workers=2)
    assert result.done == ["report"]
    assert json.loads(marker_path(tmp_path, more).read_text())["command"][-1] == "extra"


def test_earlier_seeds_and_longer_jobs_start_first(tmp_path):
    jobs = [
        _job(tmp_path, "sft/late", seed=1, cost=100),
        _job(tmp_path, "sft/short", seed=0, cost=1),
        _job(tmp_path, "sft/long", seed=0, cost=50),
    ]
    run_jobs(tmp_path, jobs, LocalLauncher(), workers=1)
    assert [n for n, e, _ in _journal(tmp_path) if e == "start"] == ["sft/long", "sft/short", "sft/late"]
