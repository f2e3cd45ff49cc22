"""Config sections every training run shares (SFT and GRPO): checkpoints, validation, logging, the model.

One schema per section, used by both `SFTRunConfig` and `GRPORunConfig`, so that a key means the same in
both runs and the shared run machinery (`nemo_quagmire.trainer.run`) reads one type. Validation covers both of
the paper's proxies of the post-RL outcome: Pass@k on benchmarks and the loss on held-out examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from nemo_quagmire.config.model import ModelConfig, get_model_preset
from nemo_quagmire.eval.benchmarks import PromptTemplate, check_benchmark_name

__all__ = [
    "CONF_DIR",
    "HELDOUT_MISSING",
    "MAX_NUM_SAMPLES",
    "SYNTHETIC",
    "TOKENIZER_MISSING",
    "CheckpointConfig",
    "FrozenConfig",
    "LoggingConfig",
    "ValidationConfig",
    "check_files_used",
    "data_parallel_problems",
    "model_from_preset",
]

MAX_NUM_SAMPLES = 256  # the paper's n; pass@k estimates at k <= 64 are tight well before it
SYNTHETIC = "synthetic"  # the benchmark name of the embedded task's held-out problems


class FrozenConfig(BaseModel):
    """Base of every config section: immutable, and a key the schema does not know is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckpointConfig(FrozenConfig):
    """Checkpoints under `<run_dir>/checkpoints/step_N`, written atomically."""

    interval: PositiveInt = Field(default=50, description="Save every N steps (and at the end).")
    keep_last: PositiveInt = Field(default=2, description="Checkpoints kept; older ones are deleted.")
    resume: Literal["auto", "never"] = Field(
        default="auto", description="auto = continue from the newest checkpoint of run_dir if there is one."
    )
    load_from: str | None = Field(
        default=None,
        description="Initial weights: an HF directory (config.json + safetensors) or a checkpoint directory "
        "of this project (`<run_dir>/checkpoints/step_N`, e.g. an SFT run's), weights only.",
    )


class ValidationConfig(FrozenConfig):
    """What is measured at the start, every `interval` steps and at the end of a run: Pass@k of sampled
    completions on benchmarks, and the negative log-likelihood of held-out examples (the paper's two
    predictors of the post-RL score)."""

    interval: PositiveInt = Field(default=10, description="Validate every N steps (and at the end).")
    at_start: bool = Field(
        default=True,
        description="Also validate before the first step (never after a resume). A study's runs skip it: an "
        "SFT run's starting point is random, a GRPO run's is the SFT checkpoint the SFT run validated.",
    )
    benchmarks: tuple[str, ...] = Field(
        default=("synthetic",),
        description="'synthetic' and/or benchmark names from the benchmarks dir; empty = no Pass@k.",
    )
    benchmarks_dir: str | None = Field(default=None, description="Default: $NEMO_QUAGMIRE_BENCHMARKS_DIR.")
    num_problems: PositiveInt = Field(default=128, description="Problems per benchmark (the first N).")
    num_samples: int = Field(
        default=4,
        ge=1,
        le=MAX_NUM_SAMPLES,
        description=f"Samples per problem (n <= {MAX_NUM_SAMPLES}); the paper samples 256 and reads pass@64.",
    )
    ks: tuple[PositiveInt, ...] | None = Field(
        default=None, description="ks of pass@k and maj@k; None = 1, 2, 4, ... <= num_samples."
    )
    temperature: NonNegativeFloat = Field(
        default=0.6,
        description="Sampling temperature (0 = greedy); 0.6 with top_p 0.95 is what the DeepSeek-R1 and "
        "Qwen3 model cards recommend for reasoning models. One setting for every checkpoint "
        "(generation_config.json is not read).",
    )
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling mass; 1.0 = off.")
    max_new_tokens: PositiveInt | None = Field(
        default=None, description="Completion budget; None = rollout.max_new_tokens (GRPO runs)."
    )
    rows_per_batch: PositiveInt = Field(
        default=256,
        description="Completions per generation call (problems x samples); large calls keep the engine busy.",
    )
    equal_length_batches: bool = Field(
        default=False,
        description="Batch only prompts of equal length: needed by the in-process engine under Transformer "
        "Engine attention, which cannot mask left padding.",
    )
    grader_workers: PositiveInt = Field(default=1, description="Grading processes (overlapping generation).")
    save_samples: bool = Field(
        default=True, description="Write every graded sample to <run_dir>/eval/step_N/samples.parquet."
    )
    heldout_loss: bool = Field(
        default=True, description="Log val/heldout_loss/{token_mean,seq_mean} at every validation."
    )
    heldout_file: str | None = Field(
        default=None,
        description="JSONL of {prompt, response} (e.g. a held-out split of the SFT data); None = the "
        "synthetic task's held-out split (synthetic runs only).",
    )
    heldout_prompt_template: PromptTemplate | None = Field(
        default=None,
        description="How held-out prompts are tokenized: plain text after BOS, or one chat-template user "
        "turn; None = as the run's own prompts are.",
    )
    heldout_batch_size: PositiveInt = Field(default=32, description="Held-out examples per forward pass.")

    @field_validator("benchmarks")
    @classmethod
    def _plain_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            check_benchmark_name(name)  # a path would load a file outside benchmarks_dir
        return names

    @model_validator(mode="after")
    def _check(self) -> ValidationConfig:
        if self.heldout_file is not None and not self.heldout_loss:
            raise ValueError(
                f"validation.heldout_file={self.heldout_file!r} is set but validation.heldout_loss=false, so "
                "it would be ignored; set heldout_loss=true or remove heldout_file"
            )
        if self.ks is not None and max(self.ks) > self.num_samples:
            raise ValueError(
                f"validation.ks asks for pass@{max(self.ks)} but validation.num_samples={self.num_samples}: "
                f"k cannot exceed n; lower the ks or raise num_samples"
            )
        return self

    def check_benchmarks_encodable(self, synthetic_task: bool) -> None:
        """The synthetic task's character tokenizer encodes its own problems only."""
        if synthetic_task and (math := [name for name in self.benchmarks if name != SYNTHETIC]):
            raise ValueError(
                f"validation.benchmarks lists {math}, but the synthetic task's character tokenizer cannot "
                f"encode math benchmarks; validate on [{SYNTHETIC}] or use data.task=jsonl"
            )

    def heldout_source_missing(self, synthetic_task: bool) -> bool:
        """True if held-out loss is asked for but there is nothing to compute it on."""
        return self.heldout_loss and self.heldout_file is None and not synthetic_task


HELDOUT_MISSING = (
    "validation.heldout_loss is on but validation.heldout_file is unset, and only the synthetic task has a "
    "built-in held-out split; set validation.heldout_file (JSONL of {prompt, response}) or "
    "validation.heldout_loss=false"
)


def check_files_used(data: BaseModel) -> None:
    """A data section's file keys are read only by `task=jsonl`; set under the synthetic task they would be
    silently ignored (training on synthetic data while the user believes it is theirs): an error."""
    if data.task == "jsonl":
        return
    if unused := [key for key in ("train_file", "tokenizer") if getattr(data, key) is not None]:
        raise ValueError(
            f"data.{' and data.'.join(unused)} set but data.task={data.task!r} does not read "
            f"{'them' if len(unused) > 1 else 'it'}; set data.task=jsonl to train on the file, or remove "
            f"{' and '.join(unused)}"
        )


def data_parallel_problems(cfg: BaseModel, data_parallel_size: int) -> list[str]:
    """The rules of an SFT or GRPO run config that need the data-parallel size, one line per problem naming
    the key, its value and the fix: every rank takes an equal share of each batch.

    The one home of these rules: the run schemas call it when `parallel.data_parallel_size` is set (so a dry
    run checks them), `trainer.preflight` with the size the launched world leaves; the trainers trust it.
    """
    dp, problems = data_parallel_size, []
    warmup = getattr(cfg, "sft_warmup", None)
    shares = {
        "grpo.prompts_per_step": getattr(getattr(cfg, "grpo", None), "prompts_per_step", None),
        "sft.global_batch_size": getattr(getattr(cfg, "sft", None), "global_batch_size", None),
        "sft_warmup.batch_size": warmup.batch_size if warmup is not None and warmup.steps else None,
    }
    for key, value in shares.items():
        if value is not None and value % dp:
            problems.append(
                f"{key}={value} is not divisible by the data-parallel size {dp}: every rank takes an equal "
                f"share of each batch; use a multiple of {dp}"
            )
    return problems


TOKENIZER_MISSING = (
    "data.task=jsonl needs a tokenizer: set checkpoint.load_from (an HF directory, or a checkpoint whose run "
    "dir keeps an HF tokenizer; its tokenizer is used) or data.tokenizer (a local HF tokenizer directory)"
)


class LoggingConfig(FrozenConfig):
    tensorboard: bool = Field(default=True, description="Also write <run_dir>/tensorboard/.")
    wandb: dict[str, Any] | None = Field(default=None, description="Kwargs of wandb.init; None = off.")
    mlflow: dict[str, Any] | None = Field(default=None, description="{experiment: name}; None = off.")
    progress_bar: bool = Field(default=True, description="A tqdm bar on rank 0.")


def model_from_preset(value: Any) -> Any:
    """`{preset: tiny, num_layers: 2}` -> the tiny preset with num_layers=2 (a `field_validator` body)."""
    if isinstance(value, dict) and "preset" in value:
        overrides = {k: v for k, v in value.items() if k != "preset"}
        try:
            preset: ModelConfig = get_model_preset(value["preset"])
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        return preset.replace(**overrides)
    return value


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/ (editable installs)
