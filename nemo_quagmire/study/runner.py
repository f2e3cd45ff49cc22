"""Run a study's jobs in dependency order on a few workers, skipping what is done, resuming what is not.

Why stage markers: a study is hours of runs on a real cluster (minutes here); it must survive being killed.
Each job has a marker, `<study>/stages/<job name>.json`, written "started" (with the job's command) when it
is launched and "done" only after it exits with status 0. A rerun skips done jobs, and relaunches the others
with the same command: the trainers resume from their newest checkpoint (`checkpoint.resume=auto`), so a
killed study continues where it stopped. A marker whose command differs from the plan's means the study
directory holds runs of other settings: that stops the study before anything starts (the report is the
exception: it is recomputed whenever its inputs change, e.g. after adding seeds).

Scheduling: up to `workers` jobs at a time; among the ready jobs, earlier seeds first (a study cut short has
whole seeds), then GRPO before SFT (finished pairs early), then the longest first. A failed job's dependents
are not started; the others go on, and the rerun retries the failed ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nemo_quagmire.study.launchers import Launcher, Running
from nemo_quagmire.study.plan import Job
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import get_logger

__all__ = [
    "StageConflict",
    "StudyResult",
    "cpu_seconds",
    "is_done",
    "marker_path",
    "read_marker",
    "run_jobs",
    "stage_table",
]

logger = get_logger(__name__)

STAGES_DIR = "stages"
LOGS_DIR = "logs"
_KIND_ORDER = {"report": 0, "grpo": 1, "sft": 2}
POLL_SECONDS = 0.5


class StageConflict(ValueError):
    """The study directory holds a run of other settings under a job's name."""


@dataclass
class StudyResult:
    """What a `run_jobs` call did: job names by outcome, and seconds per job run now."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # done before this call
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # a job they wait for failed
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def marker_path(study_dir: Path, job: Job) -> Path:
    return study_dir / STAGES_DIR / f"{job.name}.json"


def log_path(study_dir: Path, job: Job) -> Path:
    return study_dir / LOGS_DIR / f"{job.name}.log"


def read_marker(study_dir: Path, job: Job) -> dict[str, Any] | None:
    path = marker_path(study_dir, job)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None  # a damaged marker counts as not done: the job runs again (and resumes)


def _write_marker(study_dir: Path, job: Job, **fields: Any) -> None:
    record = {"name": job.name, "kind": job.kind, "command": list(job.argv[1:]), **fields}
    with atomic_write(marker_path(study_dir, job)) as handle:
        json.dump(record, handle, indent=1)


def is_done(study_dir: Path, job: Job) -> bool:
    """Whether `job` finished (a "done" marker) with the command it has now."""
    marker = read_marker(study_dir, job)
    return marker is not None and marker.get("state") == "done" and marker["command"] == list(job.argv[1:])


def check_conflicts(study_dir: Path, jobs: Sequence[Job]) -> None:
    """Raise StageConflict naming every training job whose marker records another command.

    The interpreter (argv[0]) is not compared: a study may be continued from another environment.
    """
    conflicts = []
    for job in jobs:
        marker = read_marker(study_dir, job)
        if job.kind != "report" and marker is not None and marker.get("command") != list(job.argv[1:]):
            theirs, ours = set(marker.get("command", [])), set(job.argv[1:])
            conflicts.append(
                f"  {job.name}: recorded {sorted(theirs - ours)}, planned {sorted(ours - theirs)}"
            )
    if conflicts:
        raise StageConflict(
            f"{study_dir} holds runs made with other settings ({len(conflicts)} job(s)):\n"
            + "\n".join(conflicts)
            + "\nuse another study directory (--out), or run with the settings it was made with"
        )


def _priority(job: Job) -> tuple[int, int, float]:
    return (job.seed, _KIND_ORDER[job.kind], -job.cost)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_jobs(study_dir: Path, jobs: Sequence[Job], launcher: Launcher, workers: int) -> StudyResult:
    """Run every job of `jobs` not yet done in `study_dir`, at most `workers` at a time.

    Progress goes to the log, one line per started and finished job with the count of done stages and an
    estimate of the time left (from the run time per unit of job cost so far). Interrupts (Ctrl-C, SIGTERM
    turned into KeyboardInterrupt by the caller) stop the running jobs and propagate; their markers stay
    "started", so the next run relaunches them.

    Raises:
        StageConflict: see `check_conflicts` (before anything starts).
    """
    check_conflicts(study_dir, jobs)
    result = StudyResult()
    by_name = {job.name: job for job in jobs}
    result.skipped = [job.name for job in jobs if is_done(study_dir, job)]
    finished = set(result.skipped)
    pending_jobs = [job for job in jobs if job.name not in finished]
    total_cost = sum(j.cost for j in pending_jobs) or 1.0
    done_cost, busy_seconds = 0.0, 0.0
    running: dict[str, tuple[Running, float]] = {}
    started_at = time.monotonic()
    if result.skipped:
        logger.info(
            "study: %d of %d stages already done, %d to run", len(finished), len(jobs), len(pending_jobs)
        )

    def progress() -> str:
        left = ""
        if done_cost > 0:
            rate = busy_seconds / done_cost  # seconds of one worker per unit of cost
            parallel = max(1, min(workers, len(pending_jobs) + len(running)))
            left = f", ~{_duration((total_cost - done_cost) * rate / parallel)} left"
        done = len(result.done) + len(result.skipped)
        elapsed = _duration(time.monotonic() - started_at)
        return f"[{done}/{len(jobs)} done, {len(running)} running, {elapsed}{left}]"

    try:
        while pending_jobs or running:
            failed = set(result.failed) | set(result.blocked)
            for job in [j for j in pending_jobs if any(d in failed for d in j.after)]:
                pending_jobs.remove(job)
                result.blocked.append(job.name)
                missing = ", ".join(d for d in job.after if d in failed)
                logger.warning("%s not started: it needs %s, which did not finish", job.name, missing)
            ready = sorted((j for j in pending_jobs if all(d in finished for d in j.after)), key=_priority)
            for job in ready[: max(0, workers - len(running))]:
                pending_jobs.remove(job)
                log = log_path(study_dir, job)
                _write_marker(study_dir, job, state="started", started=_now())
                handle = launcher.start(job, log)
                running[job.name] = (handle, time.monotonic())
                logger.info("%s started %s (output: %s)", progress(), job.name, handle.where)
            if not running:
                break
            time.sleep(POLL_SECONDS)
            for name, (handle, start) in list(running.items()):
                status = handle.poll()
                if status is None:
                    continue
                del running[name]
                job, seconds = by_name[name], time.monotonic() - start
                result.seconds[name] = seconds
                done_cost += job.cost
                busy_seconds += seconds
                if status == 0:
                    cpu = None if handle.cpu_seconds is None else round(handle.cpu_seconds, 2)
                    _write_marker(
                        study_dir,
                        job,
                        state="done",
                        finished=_now(),
                        seconds=round(seconds, 1),
                        cpu_seconds=cpu,
                    )
                    finished.add(name)
                    result.done.append(name)
                    logger.info("%s finished %s in %s", progress(), name, _duration(seconds))
                else:
                    result.failed.append(name)
                    logger.error(
                        "%s FAILED %s (exit status %s) after %s; see %s",
                        progress(),
                        name,
                        status,
                        _duration(seconds),
                        handle.where,
                    )
    finally:
        for name, (handle, _) in running.items():
            logger.warning("stopping %s (it resumes on the next run)", name)
            handle.stop()
    return result


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cpu_seconds(study_dir: Path, jobs: Sequence[Job]) -> tuple[float, int]:
    """CPU seconds recorded by the done jobs' markers, and how many jobs recorded one (local jobs do)."""
    recorded = [m["cpu_seconds"] for j in jobs if (m := read_marker(study_dir, j)) and m.get("cpu_seconds")]
    return float(sum(recorded)), len(recorded)


def stage_table(study_dir: Path, jobs: Sequence[Job]) -> list[str]:
    """One line per job: its state (done / started / not started) and run time, for `--status`."""
    lines = []
    for job in jobs:
        marker = read_marker(study_dir, job)
        if marker is None:
            state = "not started"
        elif is_done(study_dir, job):
            state = f"done in {_duration(marker.get('seconds', 0.0))} ({marker.get('finished', '?')})"
        elif marker.get("command") != list(job.argv[1:]):
            state = "made with other settings" if job.kind != "report" else "outdated (inputs changed)"
        else:
            state = f"started {marker.get('started', '?')}, not finished (running, or killed: resumes)"
        lines.append(f"{job.name:<28} {state}")
    return lines
