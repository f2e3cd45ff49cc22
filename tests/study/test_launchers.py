"""Launchers: local jobs get one thread each; the Slurm launcher's job generation through submitit, checked
without a cluster (a stand-in `sbatch` on PATH records the script it is given and answers like Slurm)."""

from __future__ import annotations

import os
import pickle
import stat
import sys

import pytest

from nemo_quagmire.study.launchers import LocalLauncher, SubmititLauncher, job_env
from nemo_quagmire.study.plan import STUDY_CONF_DIR, load_study_config, plan_jobs

FAKE_SBATCH = """#!/bin/sh
cp "$1" "{record}/$(basename "$1")"
echo "Submitted batch job 4242"
"""


def test_local_jobs_run_on_one_thread_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert job_env()["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert job_env()["OMP_NUM_THREADS"] == "4"
    job = plan_jobs(load_study_config(STUDY_CONF_DIR / "quick.yaml"), tmp_path)[0]
    command = (sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])")
    probe = type(job)(job.name, job.kind, command, job.run_dir, (), 1.0, 0)
    running = LocalLauncher().start(probe, tmp_path / "probe.log")
    while running.poll() is None:
        pass
    assert (tmp_path / "probe.log").read_text().strip() == "4"


def test_the_slurm_launcher_says_how_to_install_submitit(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ImportError, match=r'pip install -c constraints.txt -e "\.\[cluster\]"'):
        SubmititLauncher(tmp_path)


def test_slurm_jobs_are_sbatch_scripts_running_the_planned_commands(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    record, bin_dir = tmp_path / "submitted", tmp_path / "bin"
    record.mkdir()
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH.format(record=record)), ("srun", "#!/bin/sh\nexit 1\n")):
        tool = bin_dir / name  # submitit looks for srun to decide it is on a Slurm login node
        tool.write_text(text)
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    jobs = plan_jobs(load_study_config(STUDY_CONF_DIR / "tiny.yaml"), tmp_path / "study")
    launcher = SubmititLauncher(
        tmp_path / "slurm",
        slurm_partition="cpu",
        timeout_min=90,
        cpus_per_task=2,
        slurm_setup=["module load python"],
    )
    running = launcher.start(jobs[1], tmp_path / "unused.log")  # grpo/full-1ep-s0
    assert running.job.job_id == "4242" and "4242" in running.where
    (script,) = record.iterdir()
    text = script.read_text()
    for line in (
        "#SBATCH --partition=cpu",
        "#SBATCH --time=90",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --job-name=grpo-full-1ep-s0",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        "module load python",
    ):
        assert line in text, line
    assert "--gpus" not in text and "--gres" not in text
    order = [text.index(s) for s in ("export OMP_NUM", "module load python", "-m submitit.core._submit")]
    assert order == sorted(order)
    with (tmp_path / "slurm" / "4242_submitted.pkl").open("rb") as handle:
        delayed = pickle.load(handle)
    assert isinstance(delayed.function, submitit.helpers.CommandFunction)
    assert delayed.function.command == list(jobs[1].argv)
    assert delayed.function.env is None  # the job inherits the node's environment (and the setup lines)
