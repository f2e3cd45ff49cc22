"""The dry-run planners plan a run with the attention it will use: packed rows (GRPO and SFT) need megatron's
local attention, whose s x s scores take memory that fused attention does not."""

from __future__ import annotations

import pytest

from nemo_quagmire.plan.grpo import plan_grpo_run, training_setup
from nemo_quagmire.plan.memory import plan_memory
from nemo_quagmire.trainer.entry import compose_run_config, compose_sft_config


def test_a_packed_grpo_run_is_planned_with_local_attention():
    packed = compose_run_config("qwen3_4b", ["grpo.packing=packed", "parallel.data_parallel_size=8"])
    padded = compose_run_config("qwen3_4b", ["grpo.packing=none", "parallel.data_parallel_size=8"])
    assert training_setup(packed).attention_kernel == "unfused"
    assert training_setup(padded).attention_kernel == "fused"
    # Same shapes otherwise: the difference is the attention scores the packed run keeps for backward.
    packed_plan = plan_memory(packed.model, training_setup(packed))
    padded_plan = plan_memory(padded.model, training_setup(padded))
    assert packed_plan.worst_stage.peak_bytes > padded_plan.worst_stage.peak_bytes
    assert plan_grpo_run(packed)[0] != plan_grpo_run(padded)[0]
    assert training_setup(compose_run_config("tiny")).attention_kernel == "unfused"  # the embedded run packs


@pytest.mark.parametrize(
    ("compose", "override"),
    [(compose_run_config, "grpo.packing=packed"), (compose_sft_config, "sft.packing=packed")],
)
def test_packed_rows_with_context_parallelism_are_refused_by_the_config(compose, override):
    with pytest.raises(ValueError, match=r"packing=packed needs megatron's local attention"):
        compose("qwen3_4b", [override, "parallel.context_parallel_size=2", "parallel.data_parallel_size=4"])
