"""Planning a job before it runs: per-GPU memory of a GRPO layout, from the configs alone (no GPU needed)."""

from nemo_quagmire.plan.memory import (
    GIB,
    H100_80GB_BYTES,
    MemoryItem,
    MemoryPlan,
    ParallelLayout,
    RolloutSetup,
    StageMemory,
    Suggestion,
    TrainingSetup,
    format_plan,
    layer_activation_bytes,
    plan_memory,
    suggest_changes,
)

__all__ = [
    "GIB",
    "H100_80GB_BYTES",
    "MemoryItem",
    "MemoryPlan",
    "ParallelLayout",
    "RolloutSetup",
    "StageMemory",
    "Suggestion",
    "TrainingSetup",
    "format_plan",
    "layer_activation_bytes",
    "plan_memory",
    "suggest_changes",
]
