"""The study plan as data: SFT variants, the shared GRPO recipe, the proxies' budget, and the jobs they make.

Why a plan and jobs: the study is many independent training runs (one SFT run per variant and seed, one GRPO
run from each SFT checkpoint, one report over all of them). Writing each run down as a job — the command
line of an existing entry point (`scripts/train_sft.py`, `scripts/train_grpo.py`,
`scripts/predict_report.py`) with its run directory and the jobs it waits for — lets the same plan run in
local processes or on a Slurm cluster, and lets a rerun recognise what is already done. No training happens
here: the trainers are the ones every user runs.

The variants echo the paper's contrasts (../shared/notes/paper.md): unique examples once against half of them
twice (same compute), repetition until overfitting, less data, and SFT on short traces only. A variant's data
is a share of the reference variant's unique examples (`sft_steps` x `sft_batch_size`); its step count
follows from share x epochs. All runs of one seed draw their problems from one fixed `data_seed`, so every
checkpoint is measured on the same held-out problems, before and after RL; the seed changes the training
(initial weights, data order, sampling).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from nemo_quagmire.config.run import CONF_DIR, MAX_NUM_SAMPLES, FrozenConfig
from nemo_quagmire.data.synthetic import MAX_DIGITS

__all__ = [
    "STUDY_CONF_DIR",
    "Job",
    "StudyConfig",
    "Variant",
    "load_study_config",
    "plan_jobs",
    "report_job",
    "sft_run_name",
]

STUDY_CONF_DIR = CONF_DIR / "study"
SCRIPTS_DIR = CONF_DIR.parent / "scripts"
JobKind = Literal["sft", "grpo", "report"]


class Variant(FrozenConfig):
    """One SFT recipe: how much of the reference data, how many passes, which traces."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Run name stem, e.g. half-2ep.")
    data: float = Field(gt=0.0, le=1.0, description="Share of the reference variant's unique examples.")
    epochs: PositiveInt = Field(description="Passes over those examples.")
    short_only: bool = Field(
        default=False, description="Train on short traces only (operands of <= short_max_digits digits)."
    )
    contrast: str = Field(default="", description="What the variant stands for (shown in the summary).")


class StudyConfig(FrozenConfig):
    """A whole study: the variants, how many seeds, the SFT and GRPO budgets and the proxies' sampling."""

    variants: tuple[Variant, ...] = Field(min_length=3, description="At least 3: the predictor fits a line.")
    seeds: PositiveInt = Field(default=1, description="Training seeds per variant (0, 1, ...).")
    sft_steps: PositiveInt = Field(
        default=250, description="Steps of the reference variant (data 1.0, 1 epoch); the others scale."
    )
    sft_batch_size: PositiveInt = 64
    sft_lr: PositiveFloat = 2.0e-3
    grpo_steps: PositiveInt = Field(default=30, description="GRPO steps from every SFT checkpoint.")
    problems: PositiveInt = Field(default=64, description="Held-out problems of pass@k, before and after RL.")
    samples: int = Field(
        default=64, ge=2, le=MAX_NUM_SAMPLES, description="Samples per problem: pass@1 ... pass@<samples>."
    )
    heldout_examples: PositiveInt = Field(default=256, description="Held-out examples of the held-out loss.")
    min_digits: int = Field(default=2, ge=1, le=MAX_DIGITS, description="The task's operand lengths.")
    max_digits: int = Field(default=4, ge=1, le=MAX_DIGITS)
    short_max_digits: int = Field(
        default=3, ge=1, le=MAX_DIGITS, description="Longest operand of the short-only variants' SFT data."
    )
    data_seed: int = Field(default=0, ge=0, description="Problem draw shared by every run.")
    sft_checkpoint_interval: PositiveInt = Field(default=100, description="A killed run resumes from here.")
    grpo_checkpoint_interval: PositiveInt = 10
    report_bootstrap: PositiveInt = 2000

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if not self.min_digits <= self.short_max_digits <= self.max_digits:
            raise ValueError(
                f"short_max_digits={self.short_max_digits} must lie in [min_digits, max_digits] = "
                f"[{self.min_digits}, {self.max_digits}]"
            )
        if self.heldout_examples < self.problems:
            raise ValueError(
                f"heldout_examples={self.heldout_examples} < problems={self.problems}: pass@k reads the "
                "first `problems` held-out problems; raise heldout_examples"
            )
        for variant in self.variants:
            if self.num_examples(variant) < self.sft_batch_size:
                raise ValueError(
                    f"variant {variant.name}: data {variant.data} of {self.sft_steps} x "
                    f"{self.sft_batch_size} examples is under one batch; raise sft_steps or the data share"
                )
        return self

    def num_examples(self, variant: Variant) -> int:
        """Unique SFT examples of `variant`: a whole number of batches."""
        return round(variant.data * self.sft_steps) * self.sft_batch_size

    def sft_steps_of(self, variant: Variant) -> int:
        return self.num_examples(variant) // self.sft_batch_size * variant.epochs

    def select(self, names: list[str]) -> StudyConfig:
        """The study restricted to the named variants, in the given order.

        Raises:
            ValueError: an unknown name (listing the known ones), or fewer than 3 names.
        """
        known = {v.name: v for v in self.variants}
        if unknown := [n for n in names if n not in known]:
            raise ValueError(f"unknown variant(s) {unknown}; this plan has {list(known)}")
        return StudyConfig.model_validate(
            {**self.model_dump(), "variants": [known[n].model_dump() for n in names]}
        )


def load_study_config(path: str | Path, overrides: dict | None = None) -> StudyConfig:
    """A study YAML (conf/study/*.yaml, or any path) with `overrides` applied on top, validated.

    Raises:
        OSError, yaml.YAMLError: an unreadable file.
        pydantic.ValidationError: a bad key or value.
    """
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return StudyConfig.model_validate({**raw, **(overrides or {})})


@dataclass(frozen=True)
class Job:
    """One command of the study.

    Attributes:
        name: unique, path-like (`sft/half-2ep-s0`); names the stage marker and the log.
        kind: sft | grpo | report.
        argv: the command (the interpreter, an entry script, its arguments).
        run_dir: where the command writes.
        after: names of the jobs that must be done first.
        cost: relative run time (steps), to start long jobs first.
        seed: the training seed (report: the number of seeds).
    """

    name: str
    kind: JobKind
    argv: tuple[str, ...]
    run_dir: Path
    after: tuple[str, ...]
    cost: float
    seed: int


def sft_run_name(variant: Variant, seed: int) -> str:
    return f"{variant.name}-s{seed}"


def _validation(cfg: StudyConfig, steps: int) -> list[str]:
    return [
        "validation.at_start=false",  # SFT starts from random weights; GRPO from a validated checkpoint
        f"validation.interval={steps}",  # so: once, at the end
        f"validation.num_problems={cfg.problems}",
        f"validation.num_samples={cfg.samples}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    ]


def _task(cfg: StudyConfig, short_only: bool = False) -> list[str]:
    task = [
        f"data.synthetic.seed={cfg.data_seed}",
        f"data.synthetic.min_digits={cfg.min_digits}",
        f"data.synthetic.max_digits={cfg.max_digits}",
        f"data.num_heldout={cfg.heldout_examples}",
    ]
    return task + ([f"data.synthetic.sft_max_digits={cfg.short_max_digits}"] if short_only else [])


def plan_jobs(cfg: StudyConfig, study_dir: Path, python: str = sys.executable) -> list[Job]:
    """Every job of the study in `study_dir` (absolute paths: jobs may run elsewhere, e.g. on Slurm).

    Layout: `sft/<variant>-s<seed>/`, `grpo/<variant>-s<seed>/` (run directories), `report/` (the predictor
    report over all of them). Jobs are listed seed by seed, so a study cut short has whole seeds.
    """
    study_dir = study_dir.resolve()
    jobs: list[Job] = []
    for seed in range(cfg.seeds):
        for variant in cfg.variants:
            run = sft_run_name(variant, seed)
            steps = cfg.sft_steps_of(variant)
            sft_dir = study_dir / "sft" / run
            sft = Job(
                name=f"sft/{run}",
                kind="sft",
                argv=(
                    python,
                    str(SCRIPTS_DIR / "train_sft.py"),
                    f"run_dir={sft_dir}",
                    f"seed={seed}",
                    f"data.num_sft={cfg.num_examples(variant)}",
                    f"sft.epochs={variant.epochs}",
                    f"sft.global_batch_size={cfg.sft_batch_size}",
                    f"optim.lr={cfg.sft_lr}",
                    *_task(cfg, variant.short_only),
                    *_validation(cfg, steps),
                    f"checkpoint.interval={cfg.sft_checkpoint_interval}",
                    "checkpoint.keep_last=1",
                ),
                run_dir=sft_dir,
                after=(),
                cost=float(steps),
                seed=seed,
            )
            grpo_dir = study_dir / "grpo" / run
            grpo = Job(
                name=f"grpo/{run}",
                kind="grpo",
                argv=(
                    python,
                    str(SCRIPTS_DIR / "train_grpo.py"),
                    f"run_dir={grpo_dir}",
                    f"seed={seed}",
                    f"max_steps={cfg.grpo_steps}",
                    "sft_warmup.steps=0",
                    f"checkpoint.load_from={sft_dir / 'checkpoints' / f'step_{steps:08d}'}",
                    "data.num_sft=1",  # no warm-up: the SFT split is not used
                    *_task(cfg),
                    *_validation(cfg, cfg.grpo_steps),
                    f"checkpoint.interval={cfg.grpo_checkpoint_interval}",
                    "checkpoint.keep_last=1",
                ),
                run_dir=grpo_dir,
                after=(sft.name,),
                cost=3.0 * cfg.grpo_steps,  # a GRPO step (rollouts + update) costs ~3 SFT steps
                seed=seed,
            )
            jobs += [sft, grpo]
    jobs.append(report_job(cfg, study_dir, jobs, python))
    return jobs


def report_job(cfg: StudyConfig, study_dir: Path, jobs: Sequence[Job], python: str = sys.executable) -> Job:
    """The predictor report over the SFT -> GRPO pairs among `jobs` (every GRPO job and the SFT job it
    waits for), in `<study_dir>/report`."""
    by_name = {job.name: job for job in jobs}
    grpo = [job for job in jobs if job.kind == "grpo"]
    sft_dirs = [str(by_name[name].run_dir) for job in grpo for name in job.after]
    report_dir = study_dir.resolve() / "report"
    return Job(
        name="report",
        kind="report",
        argv=(
            python,
            str(SCRIPTS_DIR / "predict_report.py"),
            "--sft-runs",
            *sft_dirs,
            "--rl-runs",
            *(str(job.run_dir) for job in grpo),
            "--out",
            str(report_dir),
            "--bootstrap",
            str(cfg.report_bootstrap),
        ),
        run_dir=report_dir,
        after=tuple(job.name for job in grpo),
        cost=1.0,
        seed=cfg.seeds,
    )
