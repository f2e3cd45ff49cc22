"""Typed configuration of an SFT run, composed into `SFTRunConfig` (the same sections as a GRPO run where the
two overlap: model, parallel, optim, checkpoint, validation, logging).

Hydra composes the YAML in conf/sft/ (`python scripts/train_sft.py --config-name=nemo12b key=value ...`);
the result is validated here before anything heavy starts, and a wrong key or value names the key, the
value and the fix.

Defaults: the paper's SFT runs differ in epochs, example counts and learning rate, and compare checkpoints by
held-out loss and pass@large-k; the shipped configs log both at every validation. Common settings for 4-12B
math SFT: global batch 128-256 examples, lr 1e-5 to 2e-5 with warm-up and cosine decay, 2-4 epochs, packed
rows of 8-16k tokens.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from nemo_quagmire.config.model import ModelConfig
from nemo_quagmire.config.optim import OptimConfig
from nemo_quagmire.config.parallel import ParallelConfig, model_split_problems
from nemo_quagmire.config.run import (
    CONF_DIR,
    HELDOUT_MISSING,
    TOKENIZER_MISSING,
    CheckpointConfig,
    FrozenConfig,
    LoggingConfig,
    ValidationConfig,
    check_files_used,
    data_parallel_problems,
    model_from_preset,
)
from nemo_quagmire.data.synthetic import SyntheticTaskConfig
from nemo_quagmire.eval.benchmarks import PromptTemplate

__all__ = ["SFT_CONF_DIR", "Packing", "SFTConfig", "SFTDataConfig", "SFTRunConfig"]

SFT_CONF_DIR = CONF_DIR / "sft"
Packing = Literal["packed", "buckets", "none"]  # how SFT examples become rows (data.batching)


class SFTConfig(FrozenConfig):
    """Batching, length and packing, and how long to train."""

    global_batch_size: PositiveInt = Field(
        default=64, description="Examples per optimizer step, over all data-parallel ranks."
    )
    micro_batch_size: PositiveInt = Field(default=8, description="Rows per forward/backward pass.")
    epochs: PositiveInt | None = Field(
        default=1, description="Passes over the data (the last partial batch of an epoch is dropped)."
    )
    max_steps: PositiveInt | None = Field(
        default=None, description="Optimizer steps; when set it replaces epochs (the data repeats as needed)."
    )
    seq_length: PositiveInt = Field(
        default=4096,
        description="Tokens per row: a packed row's capacity; longer examples are dropped (with a warning).",
    )
    packing: Packing = Field(
        default="packed",
        description="packed = several examples per row, attention within each (megatron's local attention "
        "only); buckets = one per row, sorted by length (any attention, e.g. Transformer Engine); none = one "
        "per row in data order.",
    )

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set sft.epochs or sft.max_steps (how long to train)")
        return self


class SFTDataConfig(FrozenConfig):
    """Where the examples come from: the embedded synthetic task, or a JSONL of {prompt, response}."""

    task: Literal["synthetic", "jsonl"] = Field(
        default="synthetic", description="synthetic = the embedded arithmetic task; jsonl = data.train_file."
    )
    synthetic: SyntheticTaskConfig = SyntheticTaskConfig()
    num_sft: PositiveInt = Field(default=20000, description="Synthetic SFT examples.")
    num_heldout: PositiveInt = Field(
        default=256, description="Synthetic held-out problems (held-out loss and Pass@k on 'synthetic')."
    )
    train_file: str | None = Field(default=None, description="JSONL of {prompt, response} for task=jsonl.")
    tokenizer: str | None = Field(
        default=None,
        description="HF tokenizer directory for task=jsonl; None = the tokenizer of checkpoint.load_from (an "
        "HF directory, or the run dir of a checkpoint). The synthetic task has its own.",
    )
    prompt_template: PromptTemplate = Field(
        default="plain",
        description="plain = BOS + prompt text; chat = the prompt as one user turn of the tokenizer's chat "
        "template. Benchmark prompts for Pass@k are written the same way.",
    )

    @model_validator(mode="after")
    def _check(self) -> SFTDataConfig:
        if self.task == "jsonl" and self.train_file is None:
            raise ValueError("data.task=jsonl needs data.train_file (JSONL of {prompt, response})")
        if self.task == "synthetic" and self.prompt_template == "chat":
            raise ValueError("data.prompt_template=chat needs an HF tokenizer (data.task=jsonl); use plain")
        check_files_used(self)
        return self


class SFTRunConfig(FrozenConfig):
    """Everything an SFT run needs. `model` is a preset name plus overrides, or a full model config."""

    run_dir: str = Field(default="runs/sft", description="Metrics, checkpoints, logs and samples of the run.")
    seed: int = Field(default=1234, description="Seeds weights, data order and sampling (exact resume).")
    dry_run: bool = Field(default=False, description="Validate, print layout and memory plan, exit.")
    gpus_per_node: PositiveInt = Field(default=8, description="For the layout and memory plan.")
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    optim: OptimConfig = OptimConfig(lr=1e-5)
    sft: SFTConfig = SFTConfig()
    data: SFTDataConfig = SFTDataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(interval=100)
    validation: ValidationConfig = ValidationConfig(interval=50, max_new_tokens=1024)
    logging: LoggingConfig = LoggingConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_preset(cls, value: Any) -> Any:
        return model_from_preset(value)

    @model_validator(mode="after")
    def _check(self) -> SFTRunConfig:
        if problems := model_split_problems(self.model, self.parallel):
            raise ValueError("the model does not split over the parallel layout: " + "; ".join(problems))
        if self.sft.packing == "packed" and self.parallel.context_parallel_size > 1:
            raise ValueError(
                "sft.packing=packed needs megatron's local attention (it keeps attention within each example "
                "by an explicit mask), and parallel.context_parallel_size > 1 needs Transformer Engine "
                "attention; set sft.packing=buckets or parallel.context_parallel_size=1"
            )
        if self.sft.seq_length > self.model.max_position_embeddings:
            raise ValueError(
                f"sft.seq_length={self.sft.seq_length} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}; lower sft.seq_length"
            )
        if self.validation.benchmarks and self.validation.max_new_tokens is None:
            raise ValueError(
                "validation.max_new_tokens is unset: Pass@k during SFT needs a completion budget (an SFT run "
                "has no rollout section to take it from); set it, or validation.benchmarks=[]"
            )
        if self.validation.heldout_source_missing(synthetic_task=self.data.task == "synthetic"):
            raise ValueError(HELDOUT_MISSING)
        self.validation.check_benchmarks_encodable(synthetic_task=self.data.task == "synthetic")
        if self.data.task == "jsonl" and self.data.tokenizer is None and self.checkpoint.load_from is None:
            raise ValueError(TOKENIZER_MISSING)
        if self.parallel.data_parallel_size is not None:
            if problems := data_parallel_problems(self, self.parallel.data_parallel_size):
                raise ValueError("; ".join(problems))
        return self
