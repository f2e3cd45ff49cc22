"""Write (and optionally submit) a Slurm batch script that trains a config on 1, 2 or more GPU nodes.

    python scripts/launch_slurm.py --config-name=qwen3_4b --container-image=/shared/nemo-quagmire.sqsh \\
        --container-mounts=/lustre/ckpt:/ckpt,/lustre/data:/data -- data.train_file=/data/rl.jsonl
    python scripts/launch_slurm.py --config-name=nemo12b --venv /shared/venvs/nq --submit   # 2 nodes x 8
    python scripts/launch_slurm.py --train sft --config-name=nemo12b --out runs/slurm/sft.sbatch

Every node runs one torchrun (`--nproc-per-node` = GPUs per node) that rendezvouses over c10d at the first
node of the allocation (nemo_quagmire/launch/slurm.py explains the choices). Before anything is written the
config is composed and validated exactly as the training script will (Hydra overrides included), and its
parallel layout is checked against the job: nodes x GPUs per node must be the config's world size
(TP x PP x CP x DP), and GPUs per node must match the config's `gpus_per_node` (its layout and memory plan
assume it). Any mismatch exits with code 2, names the values and the fix, and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from nemo_quagmire.launch.slurm import DEFAULT_RDZV_PORT, SlurmJob, render_sbatch

REPO = Path(__file__).resolve().parents[1]
CONTAINER_WORKDIR = "/workspace/nemo-quagmire"  # WORKDIR of docker/Dockerfile
ENTRY_SCRIPTS = {"grpo": "scripts/train_grpo.py", "sft": "scripts/train_sft.py"}


class LaunchError(Exception):
    """Bad input: printed without a traceback, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", choices=sorted(ENTRY_SCRIPTS), default="grpo", help="which trainer")
    parser.add_argument("--config-name", required=True, help="conf/NAME.yaml (GRPO) or conf/sft/NAME.yaml")
    parser.add_argument("--nodes", type=int, help="default: the config's world size / GPUs per node")
    parser.add_argument("--gpus-per-node", type=int, help="default: the config's gpus_per_node")
    env = parser.add_mutually_exclusive_group()
    env.add_argument("--container-image", help="pyxis/enroot image (e.g. a squashfs of docker/Dockerfile)")
    env.add_argument("--venv", help="a virtual environment on the shared filesystem (runs DIR/bin/python)")
    env.add_argument("--python", help="the interpreter on the nodes (default: python on their PATH)")
    parser.add_argument("--container-mounts", default="", help="SRC:DST[,SRC:DST...] for --container-image")
    parser.add_argument(
        "--workdir",
        help=f"the repository as the job sees it; default: {CONTAINER_WORKDIR} in the container, else this "
        "checkout",
    )
    parser.add_argument("--job-name", help="default: <train>-<config-name>")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", dest="time_limit", help="wall-clock limit, e.g. 04:00:00")
    parser.add_argument("--log", default="%x-%j.out", help="the job's log file (%%x job name, %%j job id)")
    parser.add_argument("--rdzv-port", type=int, default=DEFAULT_RDZV_PORT)
    parser.add_argument("--export", action="append", default=[], metavar="NAME=VALUE", help="repeatable")
    parser.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another #SBATCH option (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="the sbatch file to write; default: runs/slurm/<job>.sbatch")
    parser.add_argument("--submit", action="store_true", help="run sbatch on the written file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the config (key=value ...)")
    return parser


def _compose(train: str, config_name: str, overrides: list[str]):
    """The validated run config the training script would build from the same name and overrides."""
    from hydra.errors import HydraException
    from pydantic import ValidationError

    from nemo_quagmire.config.errors import format_validation_error

    if train == "grpo":
        from nemo_quagmire.trainer.entry import compose_run_config as compose
    else:
        from nemo_quagmire.trainer.entry import compose_sft_config as compose
    try:
        return compose(config_name, overrides)
    except ValidationError as error:
        raise LaunchError(format_validation_error(error, f"{train.upper()} config {config_name!r}")) from None
    except (HydraException, ValueError, KeyError) as error:
        raise LaunchError(f"config {config_name!r} with overrides {overrides}: {error}") from None


def world_size_of(par) -> int:
    """TP x PP x CP x DP of a parallel config whose data_parallel_size is set."""
    return (
        par.tensor_model_parallel_size
        * par.pipeline_model_parallel_size
        * par.context_parallel_size
        * par.data_parallel_size
    )


def _check_layout(cfg, world: int, what: str = "") -> int:
    """`world` if the config's model splits evenly over it (the training script's own start-up check)."""
    from nemo_quagmire.megatron.parallel import validate_layout

    try:
        validate_layout(cfg.model, cfg.parallel, world, backend="nccl")
    except ValueError as error:
        raise LaunchError(f"{what}world size {world}: {error}") from None
    return world


def _nodes_and_gpus(cfg, nodes: int | None, gpus_per_node: int | None) -> tuple[int, int]:
    """Resolve and check the job's shape against the config's layout."""
    gpus = gpus_per_node if gpus_per_node is not None else cfg.gpus_per_node
    if gpus != cfg.gpus_per_node:
        raise LaunchError(
            f"--gpus-per-node={gpus} but the config has gpus_per_node={cfg.gpus_per_node} (its layout and "
            f"memory plan assume it); add the override gpus_per_node={gpus} or pass "
            f"--gpus-per-node={cfg.gpus_per_node}"
        )
    par = cfg.parallel
    if nodes is None:
        if par.data_parallel_size is None:
            raise LaunchError(
                "the config leaves parallel.data_parallel_size unset, so its world size follows the launch: "
                "pass --nodes"
            )
        world = _check_layout(cfg, world_size_of(par))
        if world % gpus:
            raise LaunchError(
                f"the config's world size TP x PP x CP x DP = {world} is not a multiple of "
                f"--gpus-per-node={gpus}; change parallel.data_parallel_size or the GPUs per node"
            )
        nodes = world // gpus
    if nodes < 1 or gpus < 1:
        raise LaunchError(f"--nodes={nodes} and --gpus-per-node={gpus} must both be at least 1")
    _check_layout(cfg, nodes * gpus, f"{nodes} node(s) x {gpus} GPU(s) = ")
    return nodes, gpus


def _exports(pairs: list[str]) -> dict[str, str]:
    exports = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier():
            raise LaunchError(f"--export {pair!r}: expected NAME=VALUE")
        exports[name] = value
    return exports


def build_job(args: argparse.Namespace) -> SlurmJob:
    """Validate the config and the job shape, and describe the job (raises LaunchError on bad input)."""
    if args.container_mounts and not args.container_image:
        raise LaunchError("--container-mounts needs --container-image")
    exports = _exports(args.export)
    cfg = _compose(args.train, args.config_name, args.overrides)
    nodes, gpus = _nodes_and_gpus(cfg, args.nodes, args.gpus_per_node)
    if args.venv:
        python = str(Path(args.venv) / "bin" / "python")
    else:
        python = args.python or "python"
    workdir = args.workdir or (CONTAINER_WORKDIR if args.container_image else str(REPO))
    try:
        return SlurmJob(
            job_name=args.job_name or f"{args.train}-{args.config_name}",
            nodes=nodes,
            gpus_per_node=gpus,
            script=ENTRY_SCRIPTS[args.train],
            script_args=(f"--config-name={args.config_name}", *args.overrides),
            workdir=workdir,
            python=python,
            container_image=args.container_image,
            container_mounts=tuple(m for m in args.container_mounts.split(",") if m),
            partition=args.partition,
            account=args.account,
            time_limit=args.time_limit,
            output=args.log,
            rdzv_port=args.rdzv_port,
            exports=exports,
            sbatch_options=tuple(args.sbatch),
        )
    except ValueError as error:
        raise LaunchError(str(error)) from None


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        if args.submit and shutil.which("sbatch") is None:
            raise LaunchError("--submit: sbatch is not on PATH (run on a Slurm login node, or drop --submit)")
        job = build_job(args)
    except LaunchError as error:
        print(f"launch_slurm: {error}", file=sys.stderr)
        return 2
    out = args.out or REPO / "runs" / "slurm" / f"{job.job_name}.sbatch"
    _write_atomically(out, render_sbatch(job, generated_by=shlex.join(["scripts/launch_slurm.py", *argv])))
    command = shlex.join([job.script, *job.script_args])
    print(f"wrote {out}: {job.nodes} node(s) x {job.gpus_per_node} GPU(s), {command}")
    if args.submit:
        return subprocess.run(["sbatch", str(out)], check=False).returncode
    print(f"submit with: sbatch {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
