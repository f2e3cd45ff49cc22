"""Where a study's jobs run: local processes (the default), or a Slurm cluster through submitit.

Why adapters: the stage runner (`runner.py`) only starts a job and asks whether it has finished; how and
where is the launcher's business. `LocalLauncher` runs each job as a child process of this machine (one core
each with OMP_NUM_THREADS=1: `--workers 2` uses both cores of a laptop). `SubmititLauncher` hands the same
command lines to submitit's Slurm executor (install with the `cluster` extra), which writes an sbatch script
per job and submits it: nothing in the study changes but where the commands run. Its job generation is
tested without a cluster (a stand-in `sbatch` records what would be submitted).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from nemo_quagmire.study.plan import Job

__all__ = ["Launcher", "LocalLauncher", "Running", "SubmititLauncher", "job_env"]


def job_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a job: this one, with OMP_NUM_THREADS=1 unless set (one core per job)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Running(Protocol):
    """A started job."""

    def poll(self) -> int | None:
        """None while running, then the exit status (0 = success)."""

    def stop(self) -> None:
        """Stop the job (the study was interrupted)."""

    @property
    def cpu_seconds(self) -> float | None:
        """CPU time the finished job used (user + system), None where the launcher cannot tell."""

    @property
    def where(self) -> str:
        """Where its output goes (a log path or a cluster job id)."""


class Launcher(Protocol):
    def start(self, job: Job, log: Path) -> Running: ...


class _Process:
    def __init__(self, process: subprocess.Popen, log: Path, handle: Any) -> None:
        self.process, self.log, self._handle = process, log, handle
        self.cpu_seconds: float | None = None

    def poll(self) -> int | None:
        if self.process.returncode is not None:
            return self.process.returncode
        # wait4 instead of Popen.poll: it also returns the CPU time of the job (its reaped children included)
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        self._handle.close()
        return self.process.returncode

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the job's own process group (it may have children)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._handle.close()

    @property
    def where(self) -> str:
        return str(self.log)


class LocalLauncher:
    """Each job a child process in its own process group, output to its log file."""

    def start(self, job: Job, log: Path) -> Running:
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("ab")
        process = subprocess.Popen(
            job.argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=job_env(),
            start_new_session=True,
        )
        return _Process(process, log, handle)


class _SubmititJob:
    cpu_seconds = None  # on the cluster: sacct knows

    def __init__(self, job: Any) -> None:
        self.job = job

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        return 1 if self.job.exception() is not None else 0

    def stop(self) -> None:
        self.job.cancel(check=False)

    @property
    def where(self) -> str:
        return f"slurm job {self.job.job_id} ({self.job.paths.stdout})"


class SubmititLauncher:
    """Jobs as Slurm jobs through submitit (`pip install -e ".[cluster]"`).

    Args:
        folder: where submitit writes the sbatch scripts, pickled jobs and logs (on the shared filesystem).
        parameters: submitit executor parameters, e.g. `slurm_partition`, `timeout_min`, `cpus_per_task`,
            `gpus_per_node`, `slurm_account`, `slurm_setup` (lines run before the command).

    Raises:
        ImportError: submitit is not installed (the message says how to install it).
    """

    def __init__(self, folder: Path, **parameters: Any) -> None:
        try:
            import submitit
        except ImportError as err:
            raise ImportError(
                'the Slurm launcher needs submitit: pip install -c constraints.txt -e ".[cluster]"'
            ) from err
        self._submitit = submitit
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        # One thread per job unless the cluster's environment says otherwise (the jobs inherit it).
        setup = ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}", *parameters.pop("slurm_setup", [])]
        self.executor.update_parameters(slurm_setup=setup, **parameters)

    def start(self, job: Job, log: Path) -> Running:
        self.executor.update_parameters(name=job.name.replace("/", "-"))
        command = self._submitit.helpers.CommandFunction(list(job.argv), verbose=True)
        return _SubmititJob(self.executor.submit(command))
