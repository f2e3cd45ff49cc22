"""The dry run of a GRPO config: validate the parallel layout, then plan memory per GPU, without a GPU.

`python scripts/train_grpo.py --config-name=nemo12b dry_run=true` calls `plan_grpo_run`: the layout checks
are the ones `initialize_parallel` runs at start-up (so a config that passes here starts), and the memory
plan maps the run config onto `nemo_quagmire.plan.memory`.
"""

from __future__ import annotations

from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.megatron.parallel import validate_layout
from nemo_quagmire.plan.memory import RolloutSetup, TrainingSetup, format_plan, plan_memory


def world_size_of(cfg: GRPORunConfig) -> int:
    """TP x PP x CP x DP of the config; an unset DP (derived from the launch) is planned as 1 replica."""
    par = cfg.parallel
    return (
        par.tensor_model_parallel_size
        * par.pipeline_model_parallel_size
        * par.context_parallel_size
        * (par.data_parallel_size or 1)
    )


def training_setup(cfg: GRPORunConfig) -> TrainingSetup:
    par, grpo = cfg.parallel, cfg.grpo
    dp = par.data_parallel_size or 1
    rows_per_update = grpo.prompts_per_step * grpo.group_size // (dp * grpo.num_minibatches)
    return TrainingSetup(
        tp=par.tensor_model_parallel_size,
        pp=par.pipeline_model_parallel_size,
        cp=par.context_parallel_size,
        dp=dp,
        gpus_per_node=cfg.gpus_per_node,
        sequence_parallel=par.sequence_parallel,
        seq_length=cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens,
        micro_batch_size=grpo.micro_batch_size,
        num_microbatches=max(1, -(-rows_per_update // grpo.micro_batch_size)),
        distributed_optimizer=cfg.optim.use_distributed_optimizer,
        recompute=cfg.model.recompute,
        reference_model=grpo.kl_coef > 0,
        # packed rows keep attention within each sequence through an explicit mask: megatron's local
        # (unfused) attention, whose s x s scores the plan counts (as the SFT plan does)
        attention_kernel="unfused" if grpo.packing == "packed" else "fused",
    )


def rollout_setup(cfg: GRPORunConfig) -> RolloutSetup | None:
    rollout = cfg.rollout
    if rollout.engine == "vllm" and not rollout.vllm.colocated:
        return None  # generation runs on other GPUs
    dp = cfg.parallel.data_parallel_size or 1
    return RolloutSetup(
        engine=rollout.engine,
        num_prompts=max(1, cfg.grpo.prompts_per_step // dp),
        group_size=cfg.grpo.group_size,
        max_total_length=rollout.max_prompt_tokens + rollout.max_new_tokens,
        tensor_parallel_size=rollout.vllm.tensor_parallel_size if rollout.engine == "vllm" else None,
        gpu_memory_utilization=rollout.vllm.gpu_memory_utilization if rollout.engine == "vllm" else None,
    )


def plan_grpo_run(cfg: GRPORunConfig) -> tuple[str, bool]:
    """The dry-run report of `cfg` and whether every GPU fits.

    Raises:
        ValueError: the parallel layout is invalid (every violated rule is listed with its fix).
    """
    layout = validate_layout(cfg.model, cfg.parallel, world_size_of(cfg), backend="nccl")
    plan = plan_memory(cfg.model, training_setup(cfg), rollout_setup(cfg))
    header = (
        f"GRPO dry run of {cfg.run_dir}: world size {layout.tp * layout.pp * layout.cp * layout.dp} "
        f"(TP {layout.tp} x PP {layout.pp} x CP {layout.cp} x DP {layout.dp}), "
        f"{cfg.grpo.prompts_per_step} prompts x {cfg.grpo.group_size} samples per step"
    )
    if cfg.rollout.engine == "vllm":
        header += "\n" + _engine_line(cfg, layout.world_size)
    if cfg.parallel.data_parallel_size is None:
        header += (
            "\n(parallel.data_parallel_size is unset: planned for 1 replica; set it to plan the real job)"
        )
    return f"{header}\n{format_plan(plan)}", plan.fits()


def _engine_line(cfg: GRPORunConfig, world_size: int) -> str:
    """Where the vLLM engines go (``rollout.distributed.plan_engines``; raises on a layout that cannot work).
    Separate engines get their GPUs at launch, from those the trainer ranks leave free on each node."""
    from nemo_quagmire.rollout.distributed import megatron_rank_places, plan_engines

    par, vllm = cfg.parallel, cfg.rollout.vllm
    places = megatron_rank_places(
        world_size,
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.context_parallel_size,
        ranks_per_node=min(world_size, cfg.gpus_per_node),
    )
    slots = plan_engines(
        places,
        engine_tp=vllm.tensor_parallel_size,
        colocated=vllm.colocated,
        num_engines=vllm.num_engines,
        gpus_per_node=cfg.gpus_per_node if vllm.colocated else None,
    )
    where = (
        "colocated, asleep while the trainer trains" if vllm.colocated else "on GPUs the trainer leaves free"
    )
    owners = ", ".join(str(slot.owner) for slot in slots[:8]) + (", ..." if len(slots) > 8 else "")
    return (
        f"vLLM rollout engines: {len(slots)} ({slots[0].parts} per model replica, TP "
        f"{vllm.tensor_parallel_size} each, {where}), owned by ranks {owners}"
    )
