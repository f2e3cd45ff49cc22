"""Per-GPU memory plan of a GRPO job on megatron-core, computed from the configs alone (no GPU, no torch).

A layout that does not fit fails minutes into a job (after the rollout engine started and the weights
loaded) with an out-of-memory error that names no cause. ``plan_memory`` runs in the dry run instead: it
itemises what each GPU holds, takes the worst pipeline stage, says whether it fits and, if not, which
changes would make it fit, each re-planned rather than guessed.

What is counted, per GPU (all assumptions are here; the numbers are estimates, not measurements):

* **Parameter state**, Megatron mixed precision (Megatron-LM ``theoretical_memory_usage.py``): bf16 weights
  (2 B/param), gradients accumulated in fp32 (4 B, ``grad_reduce_in_fp32``, this project's default) or bf16
  (2 B), optimizer state 12 B (fp32 master copy, Adam m and v), or 8 B for an fp32 model (no master copy).
  The distributed optimizer divides the optimizer state, and only it, by DP x CP (megatron shards over the
  data-parallel group with context parallelism). TP divides the linear weights, the embedding and the output
  layer; norm weights are replicated. PP gives each stage num_layers / PP layers; the first stage also holds
  the embedding, the last the final norm and the output layer (with tied embeddings and PP > 1, megatron
  keeps a second copy of the embedding there, with its own gradient and optimizer state).
* **FP8** (Transformer Engine): weights stay bf16 with fp32 master copies, so the parameter state does not
  shrink; TE additionally caches each linear weight's FP8 copy and its transpose across micro-batches
  (+2 B per linear-layer parameter, megatron's ``disable_parameter_transpose_cache=False``). Activations
  shrink partly: the saved inputs of the QKV, fc1 and fc2 GEMMs are kept in FP8 (1 B instead of 2), while
  the attention output stays in bf16 for the attention backward and gains an FP8 copy for the projection.
* **Activations**, Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (arXiv 2205.05198), Table 2, per layer ``sbh(34 + 5as/h)`` bytes, rebuilt term by term so that it adapts:
  grouped-query attention shrinks the saved K and V to ``g*d`` columns; the SwiGLU MLP keeps its 2f-wide
  input and f-wide output (``6sbf``; equal to the paper's GeLU ``16sbh`` at the usual f = 8h/3); dropout
  masks exist only when dropout > 0 (this project trains with 0); fused attention (TE/flash, the GPU path)
  keeps fp32 softmax statistics ``4asb`` instead of the unfused ``5as^2b`` scores; QK-norm keeps its inputs.
  Norm inputs, the QKV and fc1 inputs and dropout masks are split by TP only under sequence parallelism,
  everything inside the TP region always. Selective recomputation is megatron's default (``core_attn``):
  the core-attention internals are recomputed. Full recomputation keeps each layer's input (``2sbh``) and,
  during the backward, one layer's activations rematerialised at a time. Context parallelism divides s.
* **Pipeline**: 1F1B; stage i holds the activations of min(PP - i, micro-batches) micro-batches, so the
  first stage holds PP of them. The last stage also holds the final-norm and output-layer inputs.
* **Logits**: on the last stage, one micro-batch's ``[s, b, V/TP]`` logits in bf16 plus the fp32 copy the
  log-prob computation makes and keeps for the backward (``logits.float()`` then megatron's vocab-parallel
  cross-entropy, in place): 6 B per logit; a sampling temperature other than 1 adds a transient 4 B more.
  The GRPO step's entropy metric runs before that copy exists, without gradient, on chunks of 2^22 logits
  (``logprobs.token_entropy_from_logits``): a transient of at most 64 MiB on top of the 2 B bf16 logits,
  so below the 6 B per logit counted here once a micro-batch holds 16M logits (s 4096 x V/TP 4k), and
  within the overhead allowance below that; not counted separately.
* **Rollout**, colocated on the same GPUs. vLLM: its own weight copy sharded by the rollout TP (which may
  differ from training TP), a workspace (activations at ``max_num_batched_tokens``, sampler, CUDA graphs)
  and the KV cache, ``2 * layers * kv_heads * head_dim * bytes`` per token, split by the rollout TP (KV
  heads are replicated when the rollout TP exceeds them). With ``gpu_memory_utilization`` vLLM reserves that
  fraction of the GPU for all three and gives the remainder to the KV cache. In-process generation
  (megatron) reuses the training weights; its KV cache is split like the model (TP and PP).
* **Reference model** for the KL term: weights only, sharded like the policy.
* **Overhead**: a fixed allowance for the CUDA context, cuBLAS/TE workspaces, NCCL buffers and allocator
  fragmentation (3 GiB by default).

Phases: activations and logits exist only during the training step; an in-process KV cache only during
generation; so the peak is ``resident + max(training, rollout)``. vLLM reserves its memory for the whole
job unless it sleeps during training (vLLM sleep mode, with the trainer moving gradients and optimizer state
to the CPU during generation, as NeMo-RL's colocated mode does): ``RolloutSetup.sleep_between_phases``.

Not counted: communication and pipeline send/receive buffers beyond the overhead, optimizer-step temporaries,
interleaved pipeline schedules, mixture-of-experts, padding of megatron's gradient buckets, and the
weight-transfer buffers of a refit. Megatron's rank order is ``tp-cp-ep-dp-pp`` (TP fastest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from nemo_quagmire.config.model import ModelConfig, Recompute, count_parameters

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

GIB = 2**30
# What an 80 GB H100 (SXM or PCIe) reports as total memory (nvidia-smi: 81559 MiB = 79.6 GiB); vLLM's
# gpu_memory_utilization is a fraction of this.
H100_80GB_BYTES = 81_559 * 2**20
# Changes that save less than this are not suggested (the report shows GiB with one decimal).
MIN_SAVING_BYTES = GIB // 10
# Headroom below which a plan that fits is flagged as tight (the estimate is not exact).
TIGHT_HEADROOM_BYTES = 4 * GIB

AttentionKernel = Literal["fused", "unfused"]
Phase = Literal["resident", "training", "rollout"]
SetupT = TypeVar("SetupT", bound=BaseModel)


class TrainingSetup(BaseModel):
    """The training side of the job: parallel sizes (names as in ``megatron.parallel.Layout``), batch
    shape and memory-saving options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: PositiveInt = Field(default=1, description="Tensor-parallel size.")
    pp: PositiveInt = Field(default=1, description="Pipeline-parallel size.")
    cp: PositiveInt = Field(default=1, description="Context-parallel size (splits each sequence).")
    dp: PositiveInt = Field(default=1, description="Data-parallel size (model replicas).")
    gpus_per_node: PositiveInt = Field(default=8, description="GPUs per node (one NVLink domain).")
    sequence_parallel: bool = Field(
        default=False, description="Split norm and dropout activations along the sequence inside TP regions."
    )
    seq_length: PositiveInt = Field(description="Training sequence length: prompt + response, padded.")
    micro_batch_size: PositiveInt = Field(default=1, description="Sequences per micro-batch.")
    num_microbatches: PositiveInt | None = Field(
        default=None,
        description="Micro-batches per optimizer step on one DP rank; bounds the micro-batches in flight "
        "under 1F1B. None = at least PP (the worst case).",
    )
    recompute: Recompute = Field(
        default="none",
        description="Activation recomputation: 'selective' recomputes core attention (megatron default "
        "module), 'full' recomputes whole layers from their inputs.",
    )
    distributed_optimizer: bool = Field(
        default=True, description="Shard master weights and Adam m, v over DP x CP (ZeRO-1)."
    )
    grad_reduce_in_fp32: bool = Field(
        default=True, description="Accumulate and reduce gradients in fp32 (4 B/param) rather than bf16."
    )
    attention_kernel: AttentionKernel = Field(
        default="fused",
        description="'fused' = TE/flash attention (GPU path, no s x s scores kept); 'unfused' = megatron's "
        "local attention (the paper's 5as^2b).",
    )
    reference_model: bool = Field(
        default=False, description="Keep a frozen reference policy for the KL term."
    )
    overhead_bytes: NonNegativeInt = Field(
        default=3 * GIB,
        description="CUDA context, library workspaces, NCCL buffers and allocator fragmentation.",
    )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @model_validator(mode="after")
    def _check(self) -> TrainingSetup:
        if self.cp > 1 and self.attention_kernel == "unfused":
            raise ValueError(
                f"cp={self.cp} needs attention_kernel='fused': megatron-core runs context parallelism only "
                "in Transformer Engine attention; set cp: 1 or attention_kernel: fused"
            )
        if self.seq_length % self.cp:
            raise ValueError(
                f"seq_length={self.seq_length} is not divisible by cp={self.cp}; pad sequences to a multiple "
                f"of {self.cp}"
            )
        return self


class RolloutSetup(BaseModel):
    """Generation on the training GPUs: colocated vLLM, or in-process generation on the training weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["vllm", "megatron"] = Field(
        default="vllm", description="'vllm' (own weight copy and KV pool) or 'megatron' (training weights)."
    )
    num_prompts: PositiveInt = Field(description="Prompts per rollout batch.")
    group_size: PositiveInt = Field(description="Responses sampled per prompt (GRPO group).")
    max_total_length: PositiveInt = Field(description="Longest prompt + response, in tokens.")
    tensor_parallel_size: PositiveInt | None = Field(
        default=None, description="vLLM's TP; None = the training TP. In-process generation uses training TP."
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="vLLM's fraction of GPU memory for its weights, workspace and KV cache (colocated: "
        "0.3-0.5). Exclusive with kv_cache_bytes; neither = exactly the KV the batch needs.",
    )
    kv_cache_bytes: PositiveInt | None = Field(
        default=None, description="Explicit KV-cache budget per GPU (vLLM kv_cache_memory_bytes)."
    )
    kv_cache_dtype: Literal["bf16", "fp8"] = Field(default="bf16", description="KV-cache element type.")
    workspace_bytes: NonNegativeInt = Field(
        default=2 * GIB,
        description="vLLM's non-KV memory besides weights: activations at max_num_batched_tokens, sampler, "
        "CUDA graphs.",
    )
    sleep_between_phases: bool = Field(
        default=False,
        description="vLLM sleeps during training (weights offloaded, KV cache freed) and the trainer moves "
        "gradients and optimizer state to the CPU during generation: the phases no longer add up.",
    )

    @model_validator(mode="after")
    def _check(self) -> RolloutSetup:
        if self.gpu_memory_utilization is not None and self.kv_cache_bytes is not None:
            raise ValueError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} and kv_cache_bytes="
                f"{self.kv_cache_bytes} both set; give vLLM one of them"
            )
        if self.engine == "megatron" and self.gpu_memory_utilization is not None:
            raise ValueError(
                "gpu_memory_utilization is a vLLM setting; in-process (engine='megatron') generation takes "
                "kv_cache_bytes or sizes the KV cache from the batch"
            )
        return self

    @property
    def num_sequences(self) -> int:
        return self.num_prompts * self.group_size


@dataclass(frozen=True)
class MemoryItem:
    """One line of the breakdown: ``key`` is stable (tests, scripts), ``label`` and ``detail`` are for
    people."""

    key: str
    label: str
    bytes: int
    phase: Phase
    detail: str


@dataclass(frozen=True)
class StageMemory:
    """What one GPU of pipeline stage ``stage`` holds."""

    stage: int
    first_layer: int
    num_layers: int
    parameters: int
    in_flight_microbatches: int
    items: tuple[MemoryItem, ...]

    def bytes_of(self, key: str) -> int:
        """Bytes of the item ``key`` (0 when this stage has none)."""
        return sum(item.bytes for item in self.items if item.key == key)

    def phase_bytes(self, phase: Phase) -> int:
        return sum(item.bytes for item in self.items if item.phase == phase)

    @property
    def peak_bytes(self) -> int:
        """Resident memory plus the larger of the training and rollout phases."""
        return self.phase_bytes("resident") + max(self.phase_bytes("training"), self.phase_bytes("rollout"))


@dataclass(frozen=True)
class ParallelLayout:
    """Which global ranks form the TP groups, PP stages and DP replicas, and where node boundaries fall.

    Megatron's rank order is tp-cp-ep-dp-pp: ``rank = tp_rank + TP * (cp_rank + CP * (dp_rank + DP *
    pp_rank))``, so TP groups are runs of consecutive ranks and nodes hold consecutive ranks.
    """

    tp: int
    pp: int
    cp: int
    dp: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def num_nodes(self) -> int:
        return -(-self.world_size // self.gpus_per_node)

    def rank(self, *, tp_rank: int, cp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (cp_rank + self.cp * (dp_rank + self.dp * pp_rank))

    @property
    def tp_groups(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(range(start, start + self.tp)) for start in range(0, self.world_size, self.tp))

    @property
    def pipeline_stages(self) -> tuple[tuple[int, ...], ...]:
        per_stage = self.tp * self.cp * self.dp
        return tuple(tuple(range(p * per_stage, (p + 1) * per_stage)) for p in range(self.pp))

    @property
    def dp_replicas(self) -> tuple[tuple[int, ...], ...]:
        return tuple(
            tuple(
                sorted(
                    self.rank(tp_rank=t, cp_rank=c, dp_rank=d, pp_rank=p)
                    for t in range(self.tp)
                    for c in range(self.cp)
                    for p in range(self.pp)
                )
            )
            for d in range(self.dp)
        )

    @property
    def tp_crosses_nodes(self) -> bool:
        return any(
            group[0] // self.gpus_per_node != group[-1] // self.gpus_per_node for group in self.tp_groups
        )

    @property
    def warnings(self) -> tuple[str, ...]:
        found = []
        if self.tp_crosses_nodes:
            found.append(
                f"TP={self.tp} groups cross node boundaries ({self.gpus_per_node} GPUs per node): every "
                "layer all-reduces over the inter-node network; keep TP within a node's NVLink domain (TP "
                f"dividing {self.gpus_per_node}) and scale with PP or DP instead"
            )
        if self.world_size % self.gpus_per_node and self.world_size > self.gpus_per_node:
            found.append(
                f"world size {self.world_size} is not a multiple of {self.gpus_per_node} GPUs per node: the "
                "last node is partly idle"
            )
        return tuple(found)

    def describe(self) -> str:
        """Human-readable layout: sizes, nodes, and the ranks of each group (long lists abbreviated)."""
        lines = [
            f"world {self.world_size} GPU(s) = TP {self.tp} x PP {self.pp} x CP {self.cp} x DP {self.dp} on "
            f"{self.num_nodes} node(s) of {self.gpus_per_node} GPUs (rank order tp-cp-dp-pp)",
            f"  TP groups ({len(self.tp_groups)}): "
            + _abbreviate([_ranks(g) for g in self.tp_groups])
            + (" -- CROSS NODES" if self.tp_crosses_nodes else " (within a node)"),
            f"  PP stages ({self.pp}): "
            + _abbreviate([f"stage {i}: {_ranks(g)}" for i, g in enumerate(self.pipeline_stages)]),
            f"  DP replicas ({self.dp}): "
            + _abbreviate([f"replica {i}: {_ranks(g)}" for i, g in enumerate(self.dp_replicas)]),
        ]
        lines += [f"  WARNING: {warning}" for warning in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of every pipeline stage of one job; the worst stage decides whether it fits."""

    model: ModelConfig
    training: TrainingSetup
    rollout: RolloutSetup | None
    gpu_memory_bytes: int
    layout: ParallelLayout
    stages: tuple[StageMemory, ...]
    notes: tuple[str, ...]
    problems: tuple[str, ...]

    @property
    def worst_stage(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.peak_bytes)

    @property
    def items(self) -> tuple[MemoryItem, ...]:
        """The breakdown of the worst stage."""
        return self.worst_stage.items

    @property
    def total_bytes(self) -> int:
        """Peak per-GPU bytes of the worst stage."""
        return self.worst_stage.peak_bytes

    def headroom_bytes(self, capacity_bytes: int | None = None) -> int:
        """Capacity minus the peak (negative when it does not fit); capacity defaults to the planned GPU."""
        return (capacity_bytes or self.gpu_memory_bytes) - self.total_bytes

    def fits(self, capacity_bytes: int | None = None) -> bool:
        """True when the worst stage's peak is within ``capacity_bytes`` and nothing else rules it out."""
        return not self.problems and self.headroom_bytes(capacity_bytes) >= 0


@dataclass(frozen=True)
class Suggestion:
    """A change to the setup and the plan it gives."""

    description: str
    plan: MemoryPlan


def layer_activation_bytes(
    cfg: ModelConfig,
    *,
    seq_length: int,
    micro_batch_size: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: Recompute = "none",
    attention_kernel: AttentionKernel = "fused",
) -> float:
    """Bytes one transformer layer keeps for the backward pass, for one micro-batch, on one GPU.

    Korthikanti et al. 2022, Table 2, rebuilt term by term (module docstring). For multi-head attention with
    head_dim = h/a, a SwiGLU width f = 8h/3, dropout > 0 and unfused attention it equals the paper's
    ``sbh(10 + 24/t + 5as/(ht))`` (``sbh/t * (34 + 5as/h)`` with sequence parallelism; without the ``as``
    term under selective recomputation; ``2sbh`` (``/t`` with sequence parallelism) under full recomputation).

    Args:
        cfg: the model; FP8 (``cfg.fp8``) and the dropout probabilities change the saved tensors.
        seq_length: tokens per sequence on this GPU (already divided by the context-parallel size).
        micro_batch_size: sequences per micro-batch.
        tp: tensor-parallel size.
        sequence_parallel: whether the norm/dropout region is split along the sequence over TP.
        recompute: activation recomputation.
        attention_kernel: fused (flash/TE) or unfused attention.
    """
    s, b, h = seq_length, micro_batch_size, cfg.hidden_size
    a, g, d, f = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim, cfg.ffn_hidden_size
    sb = s * b
    sequence_split = tp if sequence_parallel else 1
    if recompute == "full":
        return 2 * sb * h / sequence_split  # the layer input, bf16
    gemm_input = 1 if cfg.fp8 else 2  # TE keeps the saved GEMM inputs in FP8
    hidden_masks = 2 * sb * h if cfg.hidden_dropout > 0 else 0  # after attention and after MLP, 1 B each
    # Replicated over TP unless sequence parallel: the two norm inputs, the QKV and fc1 inputs, dropout masks.
    outside_tp = 4 * sb * h + 2 * gemm_input * sb * h + hidden_masks
    inside_tp = (
        2 * sb * (a * d + g * d)  # Q and K (GQA: K has g heads)
        + 2 * sb * g * d  # V
        + 2 * sb * a * d  # attention output: the projection's input, kept in bf16 for the attention backward
        + (sb * a * d if cfg.fp8 else 0)  # its FP8 copy for the projection GEMM
        + (2 * sb * (a * d + g * d) if cfg.qk_layernorm else 0)  # Q and K before their norms
        + 2 * sb * 2 * f  # SwiGLU input: gate and up projections
        + gemm_input * sb * f  # SwiGLU output = fc2 input
    )
    if recompute == "none":
        if attention_kernel == "unfused":
            # softmax output 2as^2b; with dropout also its mask as^2b and the dropped-out scores 2as^2b
            inside_tp += (5 if cfg.attention_dropout > 0 else 2) * a * s * s * b
        else:
            inside_tp += 4 * a * s * b  # fp32 softmax statistics (log-sum-exp per query and head)
    return outside_tp / sequence_split + inside_tp / tp


def plan_memory(
    model: ModelConfig,
    training: TrainingSetup,
    rollout: RolloutSetup | None = None,
    *,
    gpu_memory_bytes: int = H100_80GB_BYTES,
) -> MemoryPlan:
    """Plan the per-GPU memory of every pipeline stage (module docstring for what is counted).

    Args:
        model: the policy (its ``params_dtype`` and ``fp8`` set the precision).
        training: parallel sizes, batch shape and memory options of the trainer.
        rollout: generation on the same GPUs, or None (no rollout memory: generation runs elsewhere).
        gpu_memory_bytes: memory of one GPU; vLLM's ``gpu_memory_utilization`` is a fraction of it.

    Returns:
        The plan; ``plan.fits()`` and ``format_plan(plan)`` give the verdict.

    Raises:
        ValueError: a split that does not divide the model (run ``megatron.parallel.validate_layout``
            first for the full list) or a rollout TP vLLM cannot use.
    """
    _check_divisible(model, training)
    layout = ParallelLayout(training.tp, training.pp, training.cp, training.dp, training.gpus_per_node)
    rollout_items, notes, problems = _rollout_items(model, training, rollout, gpu_memory_bytes)
    stages = tuple(
        _stage_memory(model, training, rollout, stage, rollout_items) for stage in range(training.pp)
    )
    return MemoryPlan(
        model=model,
        training=training,
        rollout=rollout,
        gpu_memory_bytes=gpu_memory_bytes,
        layout=layout,
        stages=stages,
        notes=notes,
        problems=problems,
    )


def _check_divisible(model: ModelConfig, training: TrainingSetup) -> None:
    clashes = [
        f"{name}={value} is not divisible by {by_name}={by}"
        for name, value, by_name, by in (
            ("num_attention_heads", model.num_attention_heads, "tp", training.tp),
            ("num_query_groups", model.query_groups, "tp", training.tp),
            ("ffn_hidden_size", model.ffn_hidden_size, "tp", training.tp),
            ("vocab_size", model.vocab_size, "tp", training.tp),
            ("num_layers", model.num_layers, "pp", training.pp),
        )
        if value % by
    ]
    if clashes:
        raise ValueError(
            "cannot plan memory for this split: "
            + "; ".join(clashes)
            + " (nemo_quagmire.megatron.parallel.validate_layout lists the valid sizes)"
        )


def _weight_bytes(model: ModelConfig) -> int:
    return 4 if model.params_dtype == "fp32" else 2


def _norm_parameters_per_layer(model: ModelConfig) -> int:
    return 2 * model.hidden_size + (2 * model.head_dim if model.qk_layernorm else 0)


def _parameters_per_gpu(
    model: ModelConfig, *, tp: int, num_layers: int, embedding: bool, output: bool, final_norm: bool
) -> tuple[int, int]:
    """``(all, linear-layer)`` parameters one TP rank holds for the given parts (norms replicated)."""
    count = count_parameters(model)
    norms = _norm_parameters_per_layer(model)
    linear = (count.per_layer - norms) // tp * num_layers
    table = model.vocab_size * model.hidden_size // tp
    total = (
        linear + norms * num_layers + table * (embedding + output) + (model.hidden_size if final_norm else 0)
    )
    return total, linear


def _stage_memory(
    model: ModelConfig,
    training: TrainingSetup,
    rollout: RolloutSetup | None,
    stage: int,
    rollout_items: tuple[MemoryItem, ...],
) -> StageMemory:
    tp, pp = training.tp, training.pp
    first, last = stage == 0, stage == pp - 1
    layers = model.num_layers // pp
    # PP = 1 with tied embeddings: one table serves both ends; PP > 1: the last stage keeps its own copy.
    output = last and not (model.tie_word_embeddings and pp == 1)
    params, linear = _parameters_per_gpu(
        model, tp=tp, num_layers=layers, embedding=first, output=output, final_norm=last
    )
    weight_b = _weight_bytes(model)
    grad_b = 4 if (training.grad_reduce_in_fp32 or weight_b == 4) else 2
    optim_b = 12 if weight_b == 2 else 8
    optim_shards = training.dp * training.cp if training.distributed_optimizer else 1
    offload = rollout is not None and rollout.sleep_between_phases
    state_phase: Phase = "training" if offload else "resident"
    precision = "fp32" if weight_b == 4 else "bf16"
    counted = f"{_count(params)} params"
    items = [
        MemoryItem(
            "weights", f"weights ({precision})", params * weight_b, "resident", f"{counted} x {weight_b} B"
        ),
        MemoryItem(
            "gradients",
            f"gradients ({'fp32' if grad_b == 4 else 'bf16'})",
            params * grad_b,
            state_phase,
            f"{counted} x {grad_b} B",
        ),
        MemoryItem(
            "optimizer",
            "optimizer (fp32 master + Adam m, v)" if optim_b == 12 else "optimizer (Adam m, v)",
            params * optim_b // optim_shards,
            state_phase,
            f"{counted} x {optim_b} B" + (f" / DP x CP {optim_shards}" if optim_shards > 1 else ""),
        ),
    ]
    if model.fp8:
        items.append(
            MemoryItem(
                "fp8_weight_cache",
                "FP8 weight cache",
                2 * linear,
                "resident",
                f"{_count(linear)} linear params x 2 B (FP8 copy + transpose)",
            )
        )
    in_flight = min(pp - stage, training.num_microbatches or pp)
    items.append(
        _activations_item(model, training, first=first, last=last, layers=layers, in_flight=in_flight)
    )
    if last:
        s_local = training.seq_length // training.cp
        logits = 6 * s_local * training.micro_batch_size * model.vocab_size // tp
        items.append(
            MemoryItem(
                "logits",
                "logits + cross-entropy",
                logits,
                "training",
                f"s {s_local} x b {training.micro_batch_size} x V/TP {model.vocab_size // tp} x 6 B "
                "(bf16 + fp32)",
            )
        )
    if training.reference_model:
        items.append(
            MemoryItem("reference_weights", "reference model", params * weight_b, "resident", "weights only")
        )
    items += rollout_items
    items.append(MemoryItem("overhead", "CUDA/NCCL overhead", training.overhead_bytes, "resident", "fixed"))
    return StageMemory(
        stage=stage,
        first_layer=stage * layers,
        num_layers=layers,
        parameters=params,
        in_flight_microbatches=in_flight,
        items=tuple(items),
    )


def _activations_item(
    model: ModelConfig, training: TrainingSetup, *, first: bool, last: bool, layers: int, in_flight: int
) -> MemoryItem:
    s_local = training.seq_length // training.cp
    b, h, tp = training.micro_batch_size, model.hidden_size, training.tp
    sequence_split = tp if training.sequence_parallel else 1
    common = dict(
        seq_length=s_local,
        micro_batch_size=b,
        tp=tp,
        sequence_parallel=training.sequence_parallel,
        attention_kernel=training.attention_kernel,
    )
    per_layer = layer_activation_bytes(model, recompute=training.recompute, **common)
    ends = 0.0
    if first and model.hidden_dropout > 0:
        ends += s_local * b * h / sequence_split  # embedding dropout mask
    if last:
        ends += 4 * s_local * b * h / sequence_split  # final-norm input and output-layer input
    total = in_flight * (layers * per_layer + ends)
    detail = f"{in_flight} micro-batch(es) x {layers} layers x {per_layer / 2**20:.0f} MiB"
    if training.recompute == "full":
        total += layer_activation_bytes(model, recompute="none", **common)
        detail += " + 1 layer recomputed"
    recompute = "no" if training.recompute == "none" else training.recompute
    label = f"activations ({recompute} recompute{', SP' if training.sequence_parallel else ''})"
    return MemoryItem("activations", label, math.ceil(total), "training", detail)


def _rollout_items(
    model: ModelConfig, training: TrainingSetup, rollout: RolloutSetup | None, gpu_memory_bytes: int
) -> tuple[tuple[MemoryItem, ...], tuple[str, ...], tuple[str, ...]]:
    """Rollout memory per GPU (the same on every stage), notes on KV concurrency, and blocking problems."""
    if rollout is None:
        return (), (), ()
    kv_b = 2 if rollout.kv_cache_dtype == "bf16" else 1
    g, d, length = model.query_groups, model.head_dim, rollout.max_total_length
    if rollout.engine == "megatron":
        if rollout.tensor_parallel_size not in (None, training.tp):
            raise ValueError(
                f"rollout tensor_parallel_size={rollout.tensor_parallel_size} differs from training tp="
                f"{training.tp}; in-process generation runs on the training shards: leave it unset"
            )
        # Each DP replica generates its share; its KV is split like the model: layers over PP, heads over TP.
        engines, heads_per_gpu = training.dp, g // training.tp
        kv_per_token = 2 * (model.num_layers // training.pp) * heads_per_gpu * d * kv_b
        where = f"per DP replica (TP {training.tp}, PP {training.pp})"
    else:
        tp_r = rollout.tensor_parallel_size or training.tp
        _check_rollout_tp(model, tp_r, training.world_size)
        engines = training.world_size // tp_r
        heads_per_gpu = g // tp_r if tp_r <= g else 1  # vLLM replicates KV heads beyond their number
        kv_per_token = 2 * model.num_layers * heads_per_gpu * d * kv_b
        where = f"per vLLM engine (TP {tp_r}, {engines} engines)"
    sequences = -(-rollout.num_sequences // engines)
    phase: Phase = "rollout" if rollout.sleep_between_phases or rollout.engine == "megatron" else "resident"
    kv = rollout.kv_cache_bytes or sequences * length * kv_per_token
    kv_detail = "explicit budget" if rollout.kv_cache_bytes else "exactly the batch"
    items: list[MemoryItem] = []
    problems: list[str] = []
    if rollout.engine == "vllm":
        weights, _ = _parameters_per_gpu(
            model,
            tp=tp_r,
            num_layers=model.num_layers,
            embedding=True,
            output=not model.tie_word_embeddings,
            final_norm=True,
        )
        weight_bytes = weights * _weight_bytes(model)
        workspace = rollout.workspace_bytes
        items.append(
            MemoryItem("rollout_weights", "vLLM weights", weight_bytes, phase, f"{_count(weights)} params")
        )
        items.append(MemoryItem("rollout_workspace", "vLLM workspace", workspace, phase, "activations etc."))
        if rollout.gpu_memory_utilization is not None:
            pool = int(rollout.gpu_memory_utilization * gpu_memory_bytes)
            kv = max(0, pool - weight_bytes - workspace)
            kv_detail = f"rest of {rollout.gpu_memory_utilization} x {_gib(gpu_memory_bytes)} GiB"
            if kv == 0:
                problems.append(
                    f"vLLM gpu_memory_utilization={rollout.gpu_memory_utilization} reserves {_gib(pool)} "
                    f"GiB, less than its weights ({_gib(weight_bytes)} GiB) plus workspace "
                    f"({_gib(workspace)} GiB): no room for a KV cache; raise it or the rollout TP"
                )
    items.append(
        MemoryItem(
            "rollout_kv_cache",
            "rollout KV cache",
            kv,
            phase,
            f"{kv_detail}; {kv_per_token / 1024:.0f} KiB/token",
        )
    )
    concurrent = kv // (length * kv_per_token)
    notes = []
    if concurrent < sequences:
        notes.append(
            f"the KV cache holds {concurrent} of the {sequences} sequences {where} at full length "
            f"({length} tokens) at once; the rest wait (slower rollouts, not an OOM)"
        )
    if rollout.engine == "vllm" and tp_r > training.gpus_per_node:
        notes.append(
            f"vLLM tensor_parallel_size={tp_r} spans nodes of {training.gpus_per_node} GPUs: every decoded "
            "token all-reduces over the network; keep the rollout TP within a node"
        )
    return tuple(items), tuple(notes), tuple(problems)


def _check_rollout_tp(model: ModelConfig, tp_r: int, world_size: int) -> None:
    clashes = []
    if world_size % tp_r:
        clashes.append(f"the {world_size} training GPUs do not split into engines of TP {tp_r}")
    if model.num_attention_heads % tp_r:
        clashes.append(f"num_attention_heads={model.num_attention_heads} is not divisible by it")
    g = model.query_groups
    if g % tp_r and tp_r % g:
        clashes.append(f"num_query_groups={g} neither divides nor is divisible by it")
    if clashes:
        raise ValueError(
            f"rollout tensor_parallel_size={tp_r} cannot serve this model: " + "; ".join(clashes)
        )


def suggest_changes(plan: MemoryPlan) -> tuple[Suggestion, ...]:
    """Single changes that lower the peak, each re-planned, best first.

    Candidates: raise TP (within a node) or PP, the distributed optimizer or more DP replicas for it,
    sequence parallelism, more recomputation, a smaller micro-batch, bf16 gradients, and for vLLM a lower
    ``gpu_memory_utilization`` (the largest that fits), a larger rollout TP, or sleeping between phases.
    Changes to TP or PP keep the GPU count when DP can shrink; the description says when they need more GPUs.
    When the plan has a problem (a vLLM pool too small for its weights) every change that removes it counts.
    """
    model, training, rollout = plan.model, plan.training, plan.rollout
    candidates: list[tuple[str, TrainingSetup, RolloutSetup | None]] = []

    def with_training(description: str, **changes: object) -> None:
        changed = _replace(training, changes)
        if changed is not None:
            candidates.append((description, changed, rollout))

    def with_rollout(description: str, **changes: object) -> None:
        changed = _replace(rollout, changes)
        if changed is not None:
            candidates.append((description, training, changed))

    for name, size in (("tp", training.tp), ("pp", training.pp)):
        if training.dp % 2 == 0:
            where, dp = f"DP {training.dp} -> {training.dp // 2}, same GPUs", training.dp // 2
        else:
            where, dp = f"{2 * training.world_size} GPUs", training.dp
        with_training(f"{name.upper()} {size} -> {2 * size} ({where})", **{name: 2 * size, "dp": dp})
    if not training.distributed_optimizer:
        if training.dp * training.cp > 1:
            with_training("enable the distributed optimizer", distributed_optimizer=True)
        else:
            dp = max(2, training.gpus_per_node // (training.tp * training.pp * training.cp))
            world = training.world_size * dp
            with_training(
                f"distributed optimizer over DP {dp} ({world} GPUs)",
                distributed_optimizer=True,
                dp=dp,
            )
    else:
        with_training(
            f"DP {training.dp} -> {2 * training.dp} ({2 * training.world_size} GPUs)", dp=2 * training.dp
        )
    if training.tp > 1 and not training.sequence_parallel:
        with_training("enable sequence parallelism", sequence_parallel=True)
    for recompute in {"none": ("selective", "full"), "selective": ("full",)}.get(training.recompute, ()):
        with_training(
            f"{recompute} activation recomputation (model.recompute={recompute})", recompute=recompute
        )
    if training.micro_batch_size > 1:
        smaller = training.micro_batch_size // 2
        with_training(f"micro-batch {training.micro_batch_size} -> {smaller}", micro_batch_size=smaller)
    if training.grad_reduce_in_fp32 and model.params_dtype == "bf16":
        with_training(
            "bf16 gradient accumulation (grad_reduce_in_fp32=False; less exact)", grad_reduce_in_fp32=False
        )
    if rollout is not None and rollout.engine == "vllm":
        utilization = rollout.gpu_memory_utilization
        if utilization is not None:
            lower = math.floor((utilization + plan.headroom_bytes() / plan.gpu_memory_bytes) * 20) / 20
            if 0 < lower < utilization:
                with_rollout(
                    f"vLLM gpu_memory_utilization {utilization} -> {lower}", gpu_memory_utilization=lower
                )
        tp_r = rollout.tensor_parallel_size or training.tp
        if 2 * tp_r <= training.gpus_per_node and training.world_size % (2 * tp_r) == 0:
            with_rollout(f"vLLM tensor_parallel_size {tp_r} -> {2 * tp_r}", tensor_parallel_size=2 * tp_r)
        if not rollout.sleep_between_phases:
            with_rollout(
                "sleep vLLM during training, offload gradients and optimizer during rollouts",
                sleep_between_phases=True,
            )
    suggestions = []
    for description, new_training, new_rollout in candidates:
        try:
            new_plan = plan_memory(model, new_training, new_rollout, gpu_memory_bytes=plan.gpu_memory_bytes)
        except ValueError:
            continue  # the change does not divide this model
        if new_plan.layout.tp_crosses_nodes or new_plan.problems:
            continue
        if plan.problems or new_plan.total_bytes <= plan.total_bytes - MIN_SAVING_BYTES:
            suggestions.append(Suggestion(description, new_plan))
    return tuple(sorted(suggestions, key=lambda suggestion: suggestion.plan.total_bytes))


def _replace(setup: SetupT, changes: dict[str, object]) -> SetupT | None:
    """A validated copy of ``setup`` with ``changes`` (pydantic's model_copy skips validation); None when
    the change breaks one of the setup's cross-field rules."""
    try:
        return type(setup).model_validate({**setup.model_dump(), **changes})
    except ValueError:
        return None


def _combined_fix(plan: MemoryPlan, max_steps: int = 4) -> tuple[list[str], MemoryPlan] | None:
    """Greedy chain of suggestions (best first each time) until the plan fits; None if it never does."""
    steps: list[str] = []
    for _ in range(max_steps):
        options = suggest_changes(plan)
        if not options:
            return None
        steps.append(options[0].description)
        plan = options[0].plan
        if plan.fits():
            return steps, plan
    return None


def format_plan(plan: MemoryPlan) -> str:
    """A text report: layout, the worst stage's breakdown (GiB, one decimal), every stage's peak, and a
    plain verdict; when it does not fit, the largest items and concrete changes with their new peaks."""
    stage = plan.worst_stage
    count = count_parameters(plan.model)
    lines = [
        f"model: {_count(count.total)} parameters, {plan.model.num_layers} layers, "
        f"{plan.model.params_dtype}{', FP8 ' + plan.model.fp8 if plan.model.fp8 else ''}; "
        f"sequence {plan.training.seq_length}, micro-batch {plan.training.micro_batch_size}",
        plan.layout.describe(),
        "",
        f"per-GPU memory, pipeline stage {stage.stage} of {len(plan.stages)} (layers {stage.first_layer}-"
        f"{stage.first_layer + stage.num_layers - 1}{_stage_ends(stage.stage, len(plan.stages))}):",
        f"  {'item':<42}{'GiB':>7}  {'phase':<9} how",
    ]
    for item in stage.items:
        if item.bytes:
            lines.append(f"  {item.label:<42}{_gib(item.bytes):>7}  {item.phase:<9} {item.detail}")
    resident, training, rollout = (stage.phase_bytes(p) for p in ("resident", "training", "rollout"))
    lines.append(
        f"  {'peak = resident + max(training, rollout)':<42}{_gib(stage.peak_bytes):>7}  "
        f"({_gib(resident)} + max({_gib(training)}, {_gib(rollout)}))"
    )
    if len(plan.stages) > 1:
        lines.append("  per stage: " + ", ".join(f"{s.stage}: {_gib(s.peak_bytes)}" for s in plan.stages))
    lines += [f"  note: {note}" for note in plan.notes]
    capacity = _gib(plan.gpu_memory_bytes)
    if plan.fits():
        headroom = plan.headroom_bytes()
        verdict = (
            f"fits in {capacity} GiB per GPU: {_gib(plan.total_bytes)} GiB needed, {_gib(headroom)} GiB "
            "headroom"
        )
        if headroom < TIGHT_HEADROOM_BYTES:
            verdict += " (tight: the estimate is not exact; keep a few GiB spare)"
        return "\n".join([*lines, "", verdict])
    lines.append("")
    if plan.headroom_bytes() < 0:
        largest = sorted(stage.items, key=lambda item: item.bytes, reverse=True)[:3]
        lines.append(
            f"DOES NOT FIT in {capacity} GiB per GPU: {_gib(plan.total_bytes)} GiB needed; largest items: "
            + ", ".join(f"{item.label} {_gib(item.bytes)} GiB" for item in largest)
        )
    else:
        lines.append(f"DOES NOT FIT: {_gib(plan.total_bytes)} GiB of {capacity} GiB per GPU, but:")
    lines += [f"  problem: {problem}" for problem in plan.problems]
    suggestions = suggest_changes(plan)
    if suggestions:
        lines.append("try:")
        for suggestion in suggestions[:5]:
            verdict = "fits" if suggestion.plan.fits() else "still too big"
            lines.append(f"  - {suggestion.description}: {_gib(suggestion.plan.total_bytes)} GiB ({verdict})")
    combined = _combined_fix(plan)
    if combined and len(combined[0]) > 1:
        steps, fixed = combined
        lines.append(f"  - together: {' + '.join(steps)}: {_gib(fixed.total_bytes)} GiB (fits)")
    return "\n".join(lines)


def _stage_ends(stage: int, num_stages: int) -> str:
    ends = (["embedding"] if stage == 0 else []) + (["output layer"] if stage == num_stages - 1 else [])
    return f", {' + '.join(ends)}" if ends else ""


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f}"


def _count(n: int) -> str:
    """``12_247_782_400`` -> ``"12.2B"``, ``751_744`` -> ``"752K"``."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _ranks(ranks: tuple[int, ...]) -> str:
    """``(0, 1, 2, 3, 8, 9)`` -> ``"0-3,8-9"``."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return "[" + ",".join(f"{lo}-{hi}" if hi > lo else f"{lo}" for lo, hi in runs) + "]"


def _abbreviate(parts: list[str], keep: int = 4) -> str:
    if len(parts) <= keep + 1:
        return " ".join(parts)
    return " ".join(parts[: keep - 1]) + f" ... ({len(parts) - keep} more) " + parts[-1]
