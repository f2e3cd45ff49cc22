"""Slurm batch scripts for multi-node training: one torchrun per node, rendezvousing at the job's first node.

Why a generator rather than a hand-written sbatch file: the parts that break multi-node jobs are small and
easy to get wrong by hand. The head node must be read at run time from the allocation (Slurm compresses the
nodelist, e.g. ``gpu[01-02]``, so ``scontrol show hostnames`` expands it); every node must start exactly one
torchrun (``--ntasks-per-node=1``, torchrun forks the GPU workers itself); the rendezvous id must be the job
id, so that two jobs sharing a node never join each other; and a worker that dies must end the whole step
(``--kill-on-bad-exit``) instead of leaving the other nodes waiting in a collective until the time limit.

torchrun's c10d rendezvous needs only ``host:port`` of the first node; ranks, MASTER_ADDR and WORLD_SIZE
follow from it, so the same script runs on 1 or 2 nodes (or more) unchanged. The job runs either in a
container through pyxis/enroot (``srun --container-image``, the image built from docker/Dockerfile) or in a
Python environment on a shared filesystem.

The module is pure (stdlib only, no Slurm, no torch): it turns a :class:`SlurmJob` into the text of the
script. ``scripts/launch_slurm.py`` validates the training config against the job's world size before it
writes (or submits) the script; tests run the script under a fake ``srun``/``scontrol`` and, for real, as a
1-node x 2-process gloo job.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

__all__ = ["SlurmJob", "render_sbatch", "torchrun_command"]

DEFAULT_RDZV_PORT = 29500


@dataclass(frozen=True)
class SlurmJob:
    """One training job: where it runs, with what, and which entry script with which arguments.

    Attributes:
        job_name: Slurm job name (also names the log file).
        nodes: nodes to allocate; torchrun runs once on each.
        gpus_per_node: GPUs per node = worker processes per node (``--nproc-per-node``).
        script: the entry script, relative to ``workdir`` (e.g. ``scripts/train_grpo.py``).
        script_args: its arguments (``--config-name=nemo12b``, Hydra overrides).
        workdir: the repository directory as the job sees it (in the container, or on the shared filesystem).
        python: the interpreter that runs torchrun (the container's ``python``, or ``<venv>/bin/python``).
        container_image: a pyxis/enroot image (e.g. a squashfs of docker/Dockerfile); None = no container.
        container_mounts: ``SRC:DST`` mounts for the container (data, checkpoints, run directories).
        partition, account, time_limit: passed to ``#SBATCH`` when set.
        output: the job's log file (``%x`` = job name, ``%j`` = job id).
        rdzv_port: the TCP port of the rendezvous on the first node.
        exports: environment variables exported before ``srun`` (e.g. ``NCCL_DEBUG=WARN``).
        sbatch_options: further ``#SBATCH`` options as ``key=value`` or ``flag`` (``qos=high``,
            ``constraint=h100``, ``requeue``).
    """

    job_name: str
    nodes: int
    gpus_per_node: int
    script: str
    script_args: tuple[str, ...] = ()
    workdir: str = "."
    python: str = "python"
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None
    output: str = "%x-%j.out"
    rdzv_port: int = DEFAULT_RDZV_PORT
    exports: dict[str, str] = field(default_factory=dict)
    sbatch_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.nodes < 1:
            problems.append(f"nodes={self.nodes}: at least 1")
        if self.gpus_per_node < 1:
            problems.append(f"gpus_per_node={self.gpus_per_node}: at least 1")
        if not 1024 <= self.rdzv_port <= 65535:
            problems.append(f"rdzv_port={self.rdzv_port}: choose an unprivileged port in 1024-65535")
        if self.container_mounts and self.container_image is None:
            problems.append("container_mounts without container_image: set the image or drop the mounts")
        if not self.job_name or any(c.isspace() for c in self.job_name):
            problems.append(f"job_name={self.job_name!r}: a non-empty name without spaces")
        problems += [
            f"sbatch option {option!r}: key=value or a flag, without leading dashes or line breaks"
            for option in self.sbatch_options
            if not option or option.startswith("-") or any(c in option for c in "\n\r")
        ]
        if problems:
            raise ValueError("invalid Slurm job: " + "; ".join(problems))

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def torchrun_command(job: SlurmJob) -> list[str]:
    """The per-node command, as shell words: shell variables (``$SLURM_NNODES``, ``$head_node``,
    ``$SLURM_JOB_ID``) stay unexpanded inside double quotes, everything else is quoted literally."""
    return [
        shlex.quote(job.python),
        "-m",
        "torch.distributed.run",
        '--nnodes="$SLURM_NNODES"',
        f"--nproc-per-node={job.gpus_per_node}",
        "--rdzv-backend=c10d",
        f'--rdzv-endpoint="$head_node:{job.rdzv_port}"',
        '--rdzv-id="$SLURM_JOB_ID"',
        shlex.quote(job.script),
        *(shlex.quote(arg) for arg in job.script_args),
    ]


def _srun_options(job: SlurmJob) -> list[str]:
    # Options as --key=value only: a fake srun in the tests strips them by their leading "--".
    options = ['--nodes="$SLURM_NNODES"', "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if job.container_image is not None:
        options.append(f"--container-image={shlex.quote(job.container_image)}")
        options.append(f"--container-workdir={shlex.quote(job.workdir)}")
        if job.container_mounts:
            options.append(f"--container-mounts={shlex.quote(','.join(job.container_mounts))}")
    return options


def render_sbatch(job: SlurmJob, *, generated_by: str = "scripts/launch_slurm.py") -> str:
    """The text of the sbatch script for `job` (submit it with ``sbatch FILE``)."""
    header = [
        "#!/bin/bash",
        f"# Generated by {generated_by}: {job.nodes} node(s) x {job.gpus_per_node} GPU(s), world size "
        f"{job.world_size}.",
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={job.gpus_per_node}",
        "#SBATCH --exclusive",
        f"#SBATCH --output={job.output}",
    ]
    header += [
        f"#SBATCH --{key}={value}"
        for key, value in (("partition", job.partition), ("account", job.account), ("time", job.time_limit))
        if value
    ]
    header += [f"#SBATCH --{option}" for option in job.sbatch_options]
    body = ["set -euo pipefail", ""]
    if job.container_image is None:
        body.append(f"cd {shlex.quote(job.workdir)}")
    body += [f"export {name}={shlex.quote(value)}" for name, value in sorted(job.exports.items())]
    body += [
        "# The first node of the allocation hosts the c10d rendezvous (the nodelist may be compressed). No",
        "# `| head -n 1`: under pipefail, scontrol killed by SIGPIPE would fail the job at random.",
        'nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "head_node=${nodes%%$'\\n'*}",
        f'echo "job $SLURM_JOB_ID: $SLURM_NNODES node(s) x {job.gpus_per_node} GPU(s), rendezvous at '
        f'$head_node:{job.rdzv_port}"',
        "",
    ]
    torchrun = torchrun_command(job)
    lines = [
        " ".join(["srun", *_srun_options(job)]),
        " ".join(torchrun[:3]),  # python -m torch.distributed.run
        " ".join(torchrun[3:5]),  # nodes, processes per node
        " ".join(torchrun[5:8]),  # rendezvous
        " ".join(torchrun[8:]),  # the entry script and its arguments
    ]
    body.append(" \\\n    ".join(lines))
    return "\n".join(header + [""] + body) + "\n"
