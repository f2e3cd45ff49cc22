"""The whole method on one machine: which SFT checkpoint is best after RL, and which proxy said so first.

    python scripts/quagmire_study.py               # conf/study/tiny.yaml: 8 variants, ~15 min on 2 cores
    python scripts/quagmire_study.py --seeds 3     # the same, 3 training seeds per variant
    python scripts/quagmire_study.py --quick       # CI smoke run (~2 min): the whole chain, checked
    python scripts/quagmire_study.py --variants full-1ep,half-2ep,short-1ep --sft-steps 200 --grpo-steps 20
    python scripts/quagmire_study.py --status      # the stages of a study directory
    python scripts/quagmire_study.py --seeds 3 --report-finished   # report on the pairs finished so far
    python scripts/quagmire_study.py --launcher slurm --slurm-partition cpu --workers 16  # ".[cluster]" extra

Stages (see nemo_quagmire/study/): SFT of every variant (scripts/train_sft.py, the held-out loss and pass@1
... pass@n logged by the validation callbacks at the last step), GRPO from each SFT checkpoint with one
recipe (scripts/train_grpo.py, post-RL pass@1 on the same held-out problems), then the predictor report over
the runs (scripts/predict_report.py --sft-runs/--rl-runs) and the study's summary. Everything goes to one
study directory (--out); a rerun skips finished stages and resumes killed runs from their checkpoints.

Exit codes: 0 done (every artefact checked), 1 a stage failed or an artefact is inconsistent, 2 bad
arguments or a study directory made with other settings (nothing started).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from nemo_quagmire.config.errors import format_validation_error
from nemo_quagmire.predict.analysis import label
from nemo_quagmire.study.launchers import LocalLauncher, SubmititLauncher
from nemo_quagmire.study.plan import STUDY_CONF_DIR, load_study_config, plan_jobs, report_job
from nemo_quagmire.study.results import MAIN_PLOT, SUMMARY_MD, ranking_lines, summarize_study, verify_study
from nemo_quagmire.study.runner import (
    StageConflict,
    check_conflicts,
    cpu_seconds,
    is_done,
    run_jobs,
    stage_table,
)
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import configure_logging

OVERRIDES = {  # flag -> StudyConfig key
    "seeds": "seeds",
    "sft_steps": "sft_steps",
    "grpo_steps": "grpo_steps",
    "problems": "problems",
    "samples": "samples",
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--plan", type=Path, help="study YAML (default conf/study/tiny.yaml; --quick: quick.yaml)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run: conf/study/quick.yaml, ~2 minutes"
    )
    parser.add_argument(
        "--out", type=Path, help="study directory (default runs/study, --quick runs/study-quick)"
    )
    parser.add_argument("--variants", help="comma-separated variant names of the plan (default: all)")
    parser.add_argument("--seeds", type=_positive, help="training seeds per variant")
    parser.add_argument("--sft-steps", type=_positive, help="SFT steps of the reference variant")
    parser.add_argument("--grpo-steps", type=_positive, help="GRPO steps from each SFT checkpoint")
    parser.add_argument("--problems", type=_positive, help="held-out problems of pass@k")
    parser.add_argument("--samples", type=_positive, help="samples per problem (pass@1 ... pass@samples)")
    parser.add_argument(
        "--workers", type=_positive, default=2, help="jobs at a time (default 2: one per core)"
    )
    parser.add_argument("--status", action="store_true", help="print the stages of the study directory, exit")
    parser.add_argument(
        "--report-finished",
        action="store_true",
        help="start no training: report on the SFT -> GRPO pairs finished so far (a study cut short)",
    )
    cluster = parser.add_argument_group("Slurm (--launcher slurm; needs the cluster extra: submitit)")
    cluster.add_argument("--launcher", choices=("local", "slurm"), default="local")
    cluster.add_argument("--slurm-partition")
    cluster.add_argument("--slurm-account")
    cluster.add_argument("--slurm-time-min", type=_positive, default=120, help="per job (default 120)")
    cluster.add_argument("--slurm-cpus", type=_positive, default=2, help="CPUs per job (default 2)")
    cluster.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per job (default 0)")
    cluster.add_argument("--slurm-setup", action="append", default=[], help="shell line before each job")
    return parser


def slurm_parameters(args: argparse.Namespace) -> dict:
    """submitit executor parameters from the --slurm-* flags."""
    params = {
        "timeout_min": args.slurm_time_min,
        "cpus_per_task": args.slurm_cpus,
        "slurm_setup": list(args.slurm_setup),
    }
    if args.slurm_gpus:  # some clusters reject --gpus-per-node=0
        params["gpus_per_node"] = args.slurm_gpus
    if args.slurm_partition:
        params["slurm_partition"] = args.slurm_partition
    if args.slurm_account:
        params["slurm_account"] = args.slurm_account
    return params


def _raise_interrupt(signum, frame):  # SIGTERM stops the study like Ctrl-C: running jobs are stopped
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    plan = args.plan or STUDY_CONF_DIR / ("quick.yaml" if args.quick else "tiny.yaml")
    out = (args.out or Path("runs") / ("study-quick" if args.quick else "study")).resolve()
    overrides = {
        key: getattr(args, flag) for flag, key in OVERRIDES.items() if getattr(args, flag) is not None
    }
    try:
        cfg = load_study_config(plan, overrides)
        if args.variants:
            cfg = cfg.select([name.strip() for name in args.variants.split(",")])
    except ValidationError as err:
        print(format_validation_error(err, f"study plan {plan}"), file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"invalid study plan {plan}: {err}", file=sys.stderr)
        return 2
    jobs = plan_jobs(cfg, out)
    if args.status:
        print("\n".join(stage_table(out, jobs)))
        return 0
    if args.report_finished:
        by_name = {job.name: job for job in jobs}
        finished = [job for job in jobs if job.kind == "grpo" and is_done(out, job)]
        if len(finished) < 3:
            print(f"{out}: {len(finished)} finished SFT -> GRPO pair(s); the report needs 3", file=sys.stderr)
            return 1
        jobs = [*(by_name[job.after[0]] for job in finished), *finished]
        jobs.append(report_job(cfg, out, jobs))
    try:
        check_conflicts(out, jobs)
        launcher = (
            SubmititLauncher(out / "slurm", **slurm_parameters(args))
            if args.launcher == "slurm"
            else LocalLauncher()
        )
    except (StageConflict, ImportError) as err:
        print(str(err), file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "study.json") as handle:
        json.dump(cfg.model_dump(), handle, indent=1)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    start = time.monotonic()
    try:
        result = run_jobs(out, jobs, launcher, args.workers)
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to continue ({out})", file=sys.stderr)
        return 130
    if not result.ok:
        print(f"failed: {result.failed}; not started: {result.blocked}", file=sys.stderr)
        print(f"rerun the same command to retry them (logs in {out / 'logs'})", file=sys.stderr)
        return 1
    summary = summarize_study(out, cfg)
    problems = verify_study(out, cfg, jobs)
    minutes = (time.monotonic() - start) / 60
    print(f"\nStudy {out}: {len(jobs)} stages ({len(result.skipped)} done before), {minutes:.1f} min")
    cpu, timed = cpu_seconds(out, jobs)
    if timed:
        print(
            f"CPU time of {timed} stage(s): {cpu / 60:.1f} min (one core each: {args.workers} free cores "
            f"need about {cpu / 60 / args.workers:.1f} min)"
        )
    print("\nSFT checkpoints ranked by the predicted post-RL pass@1 (best proxy; actual = after GRPO):")
    print("\n".join(ranking_lines(summary.report_dir)))
    best = summary.best
    print(
        f"\nBest proxy: {label(best['features'])} (leave-one-out R^2 {best['r2_loo']:.2f}, "
        f"Spearman {best['spearman']:.2f}, n = {best['n']})"
    )
    print(f"Report: {summary.report_dir / 'report.html'}")
    print(f"Summary: {summary.report_dir / SUMMARY_MD} (main plot {summary.report_dir / MAIN_PLOT})")
    if problems:
        print("INCONSISTENT STUDY:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("Every artefact present and consistent with the runs' metrics.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
