"""Typed configuration of a GRPO run: one schema per component, composed into `GRPORunConfig`.

Hydra composes the YAML in conf/ (`python scripts/train_grpo.py --config-name=nemo12b key=value ...`); the
result is validated here before anything heavy starts, so a typo'd key or an impossible value stops the run
with the key, the value and the fix (`extra="forbid"` everywhere).

Defaults follow the common published GRPO settings (the paper does not list its own): group size 8,
clip 0.2 / 0.28 (DAPO's clip-higher), no KL penalty, token-mean aggregation, lr 1e-6 on 4-12B models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from nemo_quagmire.algorithms.advantages import get_advantage_estimator
from nemo_quagmire.algorithms.losses import AggMode, KLEstimator
from nemo_quagmire.config.model import ModelConfig
from nemo_quagmire.config.optim import OptimConfig
from nemo_quagmire.config.parallel import ParallelConfig, model_split_problems
from nemo_quagmire.config.run import (
    HELDOUT_MISSING,
    TOKENIZER_MISSING,
    CheckpointConfig,
    LoggingConfig,
    ValidationConfig,
    check_files_used,
    data_parallel_problems,
    model_from_preset,
)
from nemo_quagmire.config.run import FrozenConfig as _Config
from nemo_quagmire.config.sft import SFTConfig, SFTDataConfig, SFTRunConfig
from nemo_quagmire.data.synthetic import SyntheticTaskConfig
from nemo_quagmire.eval.benchmarks import PromptTemplate

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "GRPOConfig",
    "GRPORunConfig",
    "LoggingConfig",
    "SFT_WARMUP_SUBDIR",
    "RolloutConfig",
    "SFTWarmupConfig",
    "ValidationConfig",
    "VLLMConfig",
]

SFT_WARMUP_SUBDIR = "sft_warmup"  # <run_dir>/sft_warmup: the warm-up's own run directory


class GRPOConfig(_Config):
    """The algorithm: how many samples, which advantages, which loss."""

    prompts_per_step: PositiveInt = Field(default=16, description="Prompts per rollout batch (all DP ranks).")
    group_size: PositiveInt = Field(default=8, description="Completions per prompt (G); 8-16 is usual.")
    advantage_estimator: str = Field(
        default="grpo", description="grpo | dr_grpo | rloo (or a registered one)."
    )
    advantage_eps: PositiveFloat = Field(default=1e-6, description="Added to the group std (grpo estimator).")
    clip_low: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="PPO clip below 1 (ratio >= 1 - clip_low)."
    )
    clip_high: float = Field(default=0.28, ge=0.0, description="Clip above 1; DAPO's clip-higher uses 0.28.")
    dual_clip: float | None = Field(default=None, gt=1.0, description="Dual-clip c for negative advantages.")
    loss_agg: AggMode = Field(
        default="token-mean",
        description="How token losses combine (DAPO token-mean; Dr.GRPO seq-mean-token-sum-norm).",
    )
    token_sum_normalizer: PositiveInt | None = Field(
        default=None, description="Dr.GRPO's constant for seq-mean-token-sum-norm (e.g. the max new tokens)."
    )
    kl_coef: NonNegativeFloat = Field(default=0.0, description="Reference-KL weight; 0 = no reference model.")
    kl_estimator: KLEstimator = Field(
        default="k3", description="KL estimator of the reference penalty (Schulman's k1/k2/k3)."
    )
    num_minibatches: PositiveInt = Field(
        default=1, description="Policy updates per rollout batch (1 = on-policy, ratio exactly 1)."
    )
    micro_batch_size: PositiveInt = Field(default=1, description="Rows per forward/backward micro-batch.")
    packing: Literal["none", "packed"] = Field(
        default="none",
        description="Rows of the policy update and of the old/reference log-prob passes: 'packed' puts "
        "short sequences side by side in one row (first-fit decreasing, attention kept within each "
        "sequence; needs megatron's local attention and PP=1); 'none' pads every sequence to the batch's "
        "longest.",
    )
    dynamic_sampling: bool = Field(
        default=False, description="Drop groups whose rewards are all equal (DAPO); they carry no gradient."
    )
    mask_truncated: bool = Field(
        default=False, description="Exclude completions cut at max_new_tokens from the loss (DAPO overlong)."
    )
    tis_cap: PositiveFloat | None = Field(
        default=None,
        description="Truncated importance-sampling cap for rollout/trainer log-prob mismatch (vLLM, FP8 "
        "rollouts); 2.0 is common. None = off (right for the in-process engine, whose log-probs match).",
    )
    format_reward: float = Field(
        default=0.0, description="Added to the reward when a \\boxed{} answer exists."
    )

    @field_validator("advantage_estimator")
    @classmethod
    def _registered(cls, name: str) -> str:
        get_advantage_estimator(name)  # an unknown name fails here, listing the registered ones
        return name

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        if self.loss_agg == "seq-mean-token-sum-norm" and self.token_sum_normalizer is None:
            raise ValueError(
                "grpo.loss_agg=seq-mean-token-sum-norm needs grpo.token_sum_normalizer (Dr.GRPO's constant, "
                "e.g. rollout.max_new_tokens)"
            )
        if self.loss_agg != "seq-mean-token-sum-norm" and self.token_sum_normalizer is not None:
            raise ValueError(
                f"grpo.token_sum_normalizer only applies to loss_agg=seq-mean-token-sum-norm, not "
                f"{self.loss_agg!r}; remove it"
            )
        if self.group_size < 2:
            raise ValueError(
                f"grpo.group_size={self.group_size}: GRPO compares completions of the same prompt, so a "
                "group needs at least 2 (8-16 is usual)"
            )
        return self


class VLLMConfig(_Config):
    """vLLM rollouts (production): the policy's weights are pushed after every update."""

    tensor_parallel_size: PositiveInt = Field(default=1, description="GPUs per vLLM engine (vLLM's own TP).")
    gpu_memory_utilization: float = Field(
        default=0.35, gt=0.0, lt=1.0, description="Share of each GPU vLLM may take (ignored on CPU)."
    )
    colocated: bool = Field(default=True, description="Share the training GPUs (sleep between rollouts).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="vLLM's weight dtype; auto = the checkpoint's."
    )
    enforce_eager: bool = Field(
        default=False, description="No CUDA graphs: faster start-up, slower decoding."
    )
    in_process: bool = Field(
        default=False,
        description="Run vLLM's engine core inside the vLLM server process (with tensor_parallel_size=1 its "
        "worker too: no further processes, seconds to start on CPU); for CPU/CI.",
    )
    num_engines: PositiveInt | None = Field(
        default=None,
        description="Engines in the run, a multiple of the data-parallel size (engines never serve two "
        "replicas). None = one per replica (separate GPUs) or every GPU busy (colocated).",
    )
    python: str | None = Field(
        default=None,
        description="Python that runs the vLLM server process (e.g. /opt/vllm/bin/python in docker/); None = "
        "$NEMO_QUAGMIRE_VLLM_PYTHON, else the trainer's own.",
    )


class RolloutConfig(_Config):
    """How completions are sampled."""

    engine: Literal["megatron", "vllm"] = Field(
        default="megatron",
        description="megatron = in-process on the policy (CPU default); vllm = production.",
    )
    temperature: PositiveFloat = Field(
        default=1.0, description="Rollout sampling temperature (the trainer's log-probs use it too)."
    )
    top_p: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Keep 1.0: the trainer cannot reproduce nucleus renormalisation.",
    )
    max_new_tokens: PositiveInt = Field(default=1024, description="Completion budget of a rollout.")
    max_prompt_tokens: PositiveInt = Field(
        default=1024, description="Longest prompt in tokens (sizes the KV cache and the memory plan)."
    )
    vllm: VLLMConfig = VLLMConfig()


class DataConfig(_Config):
    """Where prompts come from: the embedded synthetic task, or a JSONL of {problem, answer} math prompts."""

    task: Literal["synthetic", "jsonl"] = Field(
        default="synthetic", description="synthetic = the embedded arithmetic task; jsonl = data.train_file."
    )
    synthetic: SyntheticTaskConfig = SyntheticTaskConfig()
    num_sft: PositiveInt = Field(default=20000, description="Synthetic SFT examples (warm-up).")
    num_rl: PositiveInt = Field(default=4000, description="Synthetic RL prompts.")
    num_heldout: PositiveInt = Field(default=256, description="Synthetic held-out problems (validation).")
    train_file: str | None = Field(default=None, description="JSONL of {id, problem, answer} for task=jsonl.")
    tokenizer: str | None = Field(
        default=None,
        description="HF tokenizer directory for task=jsonl; None = the tokenizer of checkpoint.load_from (an "
        "HF directory, or the run dir of a checkpoint). The synthetic task has its own.",
    )
    prompt_template: PromptTemplate = Field(
        default="chat",
        description="Math prompts as a chat-template user turn, or plain 'Problem: ... Solution:'.",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.task == "jsonl" and self.train_file is None:
            raise ValueError("data.task=jsonl needs data.train_file (JSONL of {id, problem, answer})")
        check_files_used(self)
        return self


class SFTWarmupConfig(_Config):
    """A short SFT on the task before GRPO (the embedded default starts from a random tiny model): an SFT run
    (`trainer.sft.SFTTrainer`) in `<run_dir>/sft_warmup`, one example per row, no validation."""

    steps: NonNegativeInt = Field(default=0, description="0 = none (start from checkpoint.load_from).")
    batch_size: PositiveInt = Field(default=64, description="SFT examples per warm-up step, all ranks.")
    optim: OptimConfig = Field(
        default=OptimConfig(lr=1e-3, weight_decay=0.0, lr_warmup_steps=10),
        description="The warm-up's optimizer and LR schedule (its own: SFT wants a far larger lr than GRPO).",
    )


class GRPORunConfig(_Config):
    """Everything a GRPO run needs. `model` is a preset name plus overrides, or a full model config."""

    run_dir: str = Field(
        default="runs/grpo", description="Metrics, checkpoints, logs and samples of the run."
    )
    seed: int = Field(default=1234, description="Seeds weights, prompt draws and sampling (exact resume).")
    max_steps: PositiveInt = Field(default=100, description="GRPO steps (one rollout batch each).")
    dry_run: bool = Field(default=False, description="Validate, print layout and memory plan, exit.")
    gpus_per_node: PositiveInt = Field(default=8, description="For the layout and memory plan.")
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    optim: OptimConfig = OptimConfig()
    grpo: GRPOConfig = GRPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    data: DataConfig = DataConfig()
    sft_warmup: SFTWarmupConfig = SFTWarmupConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    validation: ValidationConfig = ValidationConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_preset(cls, value: Any) -> Any:
        return model_from_preset(value)

    @property
    def validation_max_new_tokens(self) -> int:
        """Completion budget of validation: ``validation.max_new_tokens``, else the rollouts'."""
        return self.validation.max_new_tokens or self.rollout.max_new_tokens

    def sft_warmup_run(self) -> SFTRunConfig:
        """The SFT run of the warm-up: this run's model, layout, seed and initial weights; `sft_warmup`'s
        steps, batch and optimizer; rows of one example padded to the step's longest, `grpo.micro_batch_size`
        of them per micro-batch; a checkpoint at the end, no validation, no logging backends."""
        return SFTRunConfig(
            run_dir=str(Path(self.run_dir) / SFT_WARMUP_SUBDIR),
            seed=self.seed,
            gpus_per_node=self.gpus_per_node,
            model=self.model,
            parallel=self.parallel,
            optim=self.sft_warmup.optim,
            sft=SFTConfig(
                global_batch_size=self.sft_warmup.batch_size,
                micro_batch_size=self.grpo.micro_batch_size,
                epochs=None,
                max_steps=self.sft_warmup.steps,
                seq_length=self.model.max_position_embeddings,
                packing="none",
            ),
            data=SFTDataConfig(synthetic=self.data.synthetic, num_sft=self.data.num_sft),
            checkpoint=CheckpointConfig(
                interval=self.sft_warmup.steps, keep_last=1, load_from=self.checkpoint.load_from
            ),
            validation=ValidationConfig(
                interval=self.sft_warmup.steps, at_start=False, benchmarks=(), heldout_loss=False
            ),
            logging=LoggingConfig(tensorboard=False, progress_bar=self.logging.progress_bar),
        )

    @model_validator(mode="after")
    def _check(self) -> GRPORunConfig:
        if problems := model_split_problems(self.model, self.parallel):
            raise ValueError("the model does not split over the parallel layout: " + "; ".join(problems))
        if self.grpo.dynamic_sampling and self.grpo.num_minibatches > 1:
            raise ValueError(
                "grpo.dynamic_sampling with grpo.num_minibatches > 1 is not supported: the kept rows vary "
                "per step and cannot be split evenly; use num_minibatches=1"
            )
        if self.grpo.packing == "packed" and self.parallel.context_parallel_size > 1:
            raise ValueError(
                "grpo.packing=packed needs megatron's local attention (it keeps attention within each "
                "sequence by an explicit mask), and parallel.context_parallel_size > 1 needs Transformer "
                "Engine attention; set grpo.packing=none or parallel.context_parallel_size=1"
            )
        if self.grpo.packing == "packed" and self.parallel.pipeline_model_parallel_size > 1:
            raise ValueError(
                "grpo.packing=packed makes micro-batches of different shapes, which pipeline stages cannot "
                "exchange; set grpo.packing=none or parallel.pipeline_model_parallel_size=1"
            )
        if self.rollout.engine == "megatron" and self.parallel.pipeline_model_parallel_size > 1:
            raise ValueError(
                "rollout.engine=megatron generates on the policy in-process, which needs "
                "parallel.pipeline_model_parallel_size=1 (got "
                f"{self.parallel.pipeline_model_parallel_size}); set rollout.engine=vllm (the policy's "
                "weights are pushed to vLLM after every update) or parallel.pipeline_model_parallel_size=1"
            )
        if self.data.task == "jsonl" and self.sft_warmup.steps:
            raise ValueError(
                "sft_warmup applies to the synthetic task only; with data.task=jsonl start from an SFT "
                "checkpoint (checkpoint.load_from) and set sft_warmup.steps=0"
            )
        if self.validation.heldout_source_missing(synthetic_task=self.data.task == "synthetic"):
            raise ValueError(HELDOUT_MISSING)
        self.validation.check_benchmarks_encodable(synthetic_task=self.data.task == "synthetic")
        if self.data.task == "jsonl" and self.data.tokenizer is None and self.checkpoint.load_from is None:
            raise ValueError(TOKENIZER_MISSING)
        if self.parallel.data_parallel_size is not None:
            if problems := data_parallel_problems(self, self.parallel.data_parallel_size):
                raise ValueError("; ".join(problems))
        if self.sft_warmup.steps:
            self.sft_warmup_run()  # the warm-up is an SFT run: its schema's rules hold at the door too
        return self
