"""The optimizer and learning-rate schedule of a training run (SFT and GRPO share the schema).

Pure pydantic: ``nemo_quagmire.megatron.train_step`` maps it onto megatron's optimizer and LR scheduler.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

__all__ = ["OptimConfig"]


class OptimConfig(BaseModel):
    """Adam(W) through megatron's optimizer, with megatron's LR schedule (linear warm-up from 0, then
    decay)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: PositiveFloat = Field(default=1e-6, description="Peak learning rate (GRPO on 4-12B: ~1e-6).")
    min_lr: NonNegativeFloat = Field(default=0.0, description="Floor of the decay.")
    weight_decay: NonNegativeFloat = Field(default=0.01, description="Decoupled (AdamW); not on norms.")
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="Adam decay of the gradient mean.")
    adam_beta2: float = Field(
        default=0.999, ge=0.0, lt=1.0, description="Adam decay of the squared-gradient mean."
    )
    adam_eps: PositiveFloat = Field(default=1e-8, description="Added to the Adam denominator.")
    clip_grad: NonNegativeFloat = Field(default=1.0, description="Global grad-norm clip; 0 = off.")
    lr_warmup_steps: NonNegativeInt = Field(
        default=0,
        description="Linear warm-up from 0 (the first step runs at lr 0 when > 0, as in Megatron-LM).",
    )
    lr_decay_steps: NonNegativeInt | None = Field(
        default=None,
        description="Step at which the decay reaches min_lr; needed unless lr_decay_style is constant.",
    )
    lr_decay_style: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="Shape of the decay from lr to min_lr after the warm-up."
    )
    use_distributed_optimizer: bool = Field(
        default=True, description="Shard optimizer state over data-parallel ranks (ZeRO-1)."
    )
    max_consecutive_nonfinite: PositiveInt = Field(
        default=3,
        description="Stop the run after this many steps in a row whose updates were all skipped for a "
        "NaN/Inf loss or gradient (a single one is skipped with a warning).",
    )

    @model_validator(mode="after")
    def _check_schedule(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} exceeds lr={self.lr}")
        if self.lr_decay_style != "constant":
            if self.lr_decay_steps is None or self.lr_decay_steps <= self.lr_warmup_steps:
                raise ValueError(
                    f"lr_decay_style={self.lr_decay_style!r} needs lr_decay_steps > lr_warmup_steps="
                    f"{self.lr_warmup_steps}, got {self.lr_decay_steps}; set it to the total number of steps"
                )
        return self
