"""The dry run of an SFT config: validate the parallel layout, then plan memory per GPU, without a GPU.

`python scripts/train_sft.py --config-name=nemo12b dry_run=true` calls `plan_sft_run`: the same layout checks
as start-up and the same memory model as the GRPO dry run (`nemo_quagmire.plan.memory`), without rollouts.
Rows are `sft.seq_length` tokens; packed rows use megatron's local (unfused) attention, whose s x s scores
the plan counts.
"""

from __future__ import annotations

from nemo_quagmire.config.sft import SFTRunConfig
from nemo_quagmire.megatron.parallel import validate_layout
from nemo_quagmire.plan.memory import TrainingSetup, format_plan, plan_memory


def plan_sft_run(cfg: SFTRunConfig) -> tuple[str, bool]:
    """The dry-run report of `cfg` and whether every GPU fits.

    Raises:
        ValueError: the parallel layout is invalid (every violated rule is listed with its fix).
    """
    par, sft = cfg.parallel, cfg.sft
    dp = par.data_parallel_size or 1
    world = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size * dp
    layout = validate_layout(cfg.model, par, world, backend="nccl")
    rows_per_rank = sft.global_batch_size // dp  # at most one example per row
    training = TrainingSetup(
        tp=layout.tp,
        pp=layout.pp,
        cp=layout.cp,
        dp=layout.dp,
        gpus_per_node=cfg.gpus_per_node,
        sequence_parallel=par.sequence_parallel,
        seq_length=sft.seq_length,
        micro_batch_size=sft.micro_batch_size,
        num_microbatches=max(1, -(-rows_per_rank // sft.micro_batch_size)),
        distributed_optimizer=cfg.optim.use_distributed_optimizer,
        recompute=cfg.model.recompute,
        attention_kernel="unfused" if sft.packing == "packed" else "fused",
    )
    plan = plan_memory(cfg.model, training)
    header = (
        f"SFT dry run of {cfg.run_dir}: world size {layout.world_size} "
        f"(TP {layout.tp} x PP {layout.pp} x CP {layout.cp} x DP {layout.dp}), "
        f"{sft.global_batch_size} examples per step in rows of {sft.seq_length} tokens ({sft.packing})"
    )
    if par.data_parallel_size is None:
        header += (
            "\n(parallel.data_parallel_size is unset: planned for 1 replica; set it to plan the real job)"
        )
    return f"{header}\n{format_plan(plan)}", plan.fits()
