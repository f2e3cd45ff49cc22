"""The Slurm launcher: the generated sbatch script run under a fake Slurm (fake `srun` and `scontrol` on PATH,
SLURM_* variables set), its input errors, and one real 2-process gloo training job through the same script.

The fake `srun` records its options and runs its command on this machine, as Slurm would on each node; the
fake `scontrol show hostnames` expands the nodelist as the test says. So what runs is the script's own text:
the head-node lookup, the srun line and the torchrun line, not a re-implementation of them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_quagmire.launch.slurm import SlurmJob, render_sbatch

REPO = Path(__file__).resolve().parents[2]

FAKE_SRUN = """#!/bin/bash
# One node: record the srun options (all --key=value), then run the command.
while [[ $# -gt 0 && $1 == --* ]]; do echo "$1" >> "$FAKE_SRUN_LOG"; shift; done
exec "$@"
"""
# Writes the hostnames one by one with a pause, as a slow scontrol might: a script that reads only the first
# line through a pipe (`| head -n 1`) then has scontrol killed by SIGPIPE, which `set -o pipefail` turns into
# a failed job.
FAKE_SCONTROL = """#!/bin/bash
[[ $1 == show && $2 == hostnames && $3 == "$SLURM_JOB_NODELIST" ]] || { echo "bad call: $*" >&2; exit 1; }
for host in $FAKE_HOSTNAMES; do echo "$host"; sleep 0.2; done
"""
# Stands in for the nodes' python: writes the arguments it was started with, one per line.
FAKE_PYTHON = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_PYTHON_ARGV"
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_slurm(tmp_path):
    """Runs an sbatch script as a Slurm job on `nodelist` (expanded to `hostnames`) would run on one node."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    srun_log = tmp_path / "srun-options.txt"

    def run(script: Path, *, nodelist: str, hostnames: list[str], job_id: str = "4242", extra_env=None):
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "SLURM_JOB_ID": job_id,
            "SLURM_JOB_NODELIST": nodelist,
            "SLURM_NNODES": str(len(hostnames)),
            "SLURM_NODEID": "0",
            "FAKE_HOSTNAMES": " ".join(hostnames),
            "FAKE_SRUN_LOG": str(srun_log),
            **(extra_env or {}),
        }
        proc = subprocess.run(
            ["bash", str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
        )
        options = srun_log.read_text().splitlines() if srun_log.exists() else []
        return proc, options

    return run


@pytest.mark.parametrize(
    ("nodelist", "hostnames", "container"),
    [
        ("gpu07", ["gpu07"], None),
        ("gpu[01-02]", ["gpu01", "gpu02"], "/images/nemo-quagmire.sqsh"),
    ],
)
def test_the_script_starts_one_torchrun_per_node_at_the_first_node(
    tmp_path, fake_slurm, nodelist, hostnames, container
):
    nodes = len(hostnames)
    job = SlurmJob(
        job_name="grpo-nemo12b",
        nodes=nodes,
        gpus_per_node=8,
        script="scripts/train_grpo.py",
        script_args=("--config-name=nemo12b", "data.train_file=/data/math rl.jsonl"),
        workdir=str(tmp_path),
        python=str(_executable(tmp_path / "python", FAKE_PYTHON)),
        container_image=container,
        container_mounts=("/lustre/ckpt:/ckpt",) if container else (),
        rdzv_port=29555,
        exports={"NCCL_DEBUG": "WARN"},
        sbatch_options=("qos=high", "requeue"),
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job))
    argv_file = tmp_path / "argv.txt"
    proc, srun_options = fake_slurm(
        script, nodelist=nodelist, hostnames=hostnames, extra_env={"FAKE_PYTHON_ARGV": str(argv_file)}
    )
    assert proc.returncode == 0, proc.stderr

    header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert f"#SBATCH --nodes={nodes}" in header and "#SBATCH --gpus-per-node=8" in header
    assert header[-2:] == ["#SBATCH --qos=high", "#SBATCH --requeue"]
    assert argv_file.read_text().splitlines() == [
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={hostnames[0]}:29555",  # the first host of the expanded nodelist
        "--rdzv-id=4242",  # the job id: two jobs on one node never join each other
        "scripts/train_grpo.py",
        "--config-name=nemo12b",
        "data.train_file=/data/math rl.jsonl",  # an argument with a space arrives as one word
    ]
    expected = [f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if container:
        expected += [
            f"--container-image={container}",
            f"--container-workdir={tmp_path}",
            "--container-mounts=/lustre/ckpt:/ckpt",
        ]
    assert srun_options == expected
    assert f"rendezvous at {hostnames[0]}:29555" in proc.stdout


def test_bad_jobs_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"nodes=0: at least 1"):
        SlurmJob("j", nodes=0, gpus_per_node=8, script="s.py")
    with pytest.raises(ValueError, match=r"rdzv_port=80"):
        SlurmJob("j", nodes=1, gpus_per_node=8, script="s.py", rdzv_port=80)
    with pytest.raises(ValueError, match=r"container_mounts without container_image"):
        SlurmJob("j", nodes=1, gpus_per_node=8, script="s.py", container_mounts=("/a:/b",))
    with pytest.raises(ValueError, match=r"sbatch option '--qos=high'"):
        SlurmJob("j", nodes=1, gpus_per_node=8, script="s.py", sbatch_options=("--qos=high",))


# ---------------------------------------------------------------------------------------------------------
# The CLI: config composed and checked against the job before anything is written.


@pytest.fixture(scope="module")
def launch_slurm():
    spec = importlib.util.spec_from_file_location("launch_slurm", REPO / "scripts" / "launch_slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # nemo12b is TP 4 x DP 4 = 16 GPUs: one node of 8 is half of it.
        (["--config-name=nemo12b", "--nodes=1"], r"data_parallel_size=4 but world size 8"),
        (
            ["--config-name=nemo12b", "--gpus-per-node=4"],
            r"--gpus-per-node=4 but the config has gpus_per_node=8",
        ),
        (
            ["--config-name=nemo12b", "parallel.tensor_model_parallel_size=3"],
            r"(?s)(?=.*tensor_model_parallel_size=3)(?=.*num_attention_heads=32)",  # names both, any order
        ),
        (["--config-name=tiny"], r"data_parallel_size unset.*pass --nodes"),
        (["--config-name=nemo12b", "grpo.group_size=1"], r"grpo.group_size=1: .*at least 2"),
        (["--config-name=nemo12b", "no_such.key=1"], r"no_such.key"),
        (["--config-name=no_such_config"], r"no_such_config"),
        (["--train=sft", "--config-name=nemo12b", "--nodes=3"], r"world size 24"),
        (
            ["--config-name=nemo12b", "--container-mounts=/a:/b"],
            r"--container-mounts needs --container-image",
        ),
        (["--config-name=nemo12b", "--export=1BAD"], r"--export '1BAD': expected NAME=VALUE"),
        (["--config-name=nemo12b", "--sbatch=--qos=high"], r"sbatch option '--qos=high'"),
    ],
)
def test_cli_input_errors_exit_2_and_write_nothing(launch_slurm, tmp_path, capsys, args, message):
    out = tmp_path / "job.sbatch"
    assert launch_slurm.main([*args[:1], f"--out={out}", *args[1:]]) == 2
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert err.startswith("launch_slurm: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_submit_without_sbatch_exits_2_before_writing(launch_slurm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert launch_slurm.main(["--config-name=nemo12b", f"--out={tmp_path / 'job.sbatch'}", "--submit"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
    assert not (tmp_path / "job.sbatch").exists()


@pytest.mark.parametrize(
    ("train", "config", "nodes"), [("grpo", "nemo12b", 2), ("grpo", "qwen3_4b", 1), ("sft", "nemo12b", 1)]
)
def test_shipped_configs_get_their_node_count_from_the_layout(launch_slurm, tmp_path, train, config, nodes):
    out = tmp_path / "job.sbatch"
    args = [f"--train={train}", f"--config-name={config}", "--container-image=nq.sqsh", f"--out={out}"]
    assert launch_slurm.main(args) == 0
    text = out.read_text()
    assert f"#SBATCH --nodes={nodes}" in text and "#SBATCH --gpus-per-node=8" in text
    assert f"scripts/train_{train}.py --config-name={config}" in text


# ---------------------------------------------------------------------------------------------------------
# A real job: 1 node x 2 processes on gloo, GRPO on the tiny config, through the generated script.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_a_generated_job_trains_on_two_gloo_ranks(launch_slurm, tmp_path, fake_slurm):
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    overrides = [
        "gpus_per_node=2",
        "parallel.data_parallel_size=2",
        f"run_dir={run_dir}",
        "max_steps=2",
        "sft_warmup.steps=0",
        "grpo.prompts_per_step=4",
        "grpo.group_size=2",
        "rollout.max_new_tokens=8",
        "data.num_sft=16",
        "data.num_rl=16",
        "data.num_heldout=8",
        "validation.benchmarks=[]",
        "validation.heldout_loss=false",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
    ]
    args = ["--config-name=tiny", "--nodes=1", "--gpus-per-node=2", f"--python={sys.executable}"]
    args += [f"--rdzv-port={_free_port()}", f"--out={script}", "--export=OMP_NUM_THREADS=1", "--", *overrides]
    assert launch_slurm.main(args) == 0

    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc, srun_options = fake_slurm(
        script, nodelist="localhost", hostnames=["localhost"], extra_env={"PYTHONPATH": python_path}
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert srun_options[:2] == ["--nodes=1", "--ntasks-per-node=1"]
    assert "world 2 = TP 1 x PP 1 x CP 1 x DP 2 on gloo" in output
    steps = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line]
    assert len(steps) == 2
    # Each rank saves its own RNG state with the final checkpoint: both ranks ran to the end.
    rng_files = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*/rng/rank_*.pt"))
    assert rng_files == ["rank_00000.pt", "rank_00001.pt"]
