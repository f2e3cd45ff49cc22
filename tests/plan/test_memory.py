"""Memory planner: parameter state by hand, activations against Korthikanti et al. 2022 Table 2, what TP, PP
and the distributed optimizer divide, published layouts that fit or do not, the rollout KV cache, and the
parallel layout against megatron's documented rank example."""

from __future__ import annotations

import pydantic
import pytest

from nemo_quagmire.config.model import ModelConfig, count_parameters, get_model_preset
from nemo_quagmire.plan.memory import (
    GIB,
    H100_80GB_BYTES,
    ParallelLayout,
    RolloutSetup,
    TrainingSetup,
    format_plan,
    layer_activation_bytes,
    plan_memory,
    suggest_changes,
)

TINY = get_model_preset("tiny")
LLAMA = get_model_preset("llama3_8b")
NEMO = get_model_preset("mistral_nemo_12b")

# The paper's model: multi-head attention with head_dim = h/a, dropout on, and a SwiGLU width f = 8h/3, at
# which the SwiGLU MLP keeps 6sbf = 16sbh bytes, exactly the GeLU MLP's 4sbh-wide activations (2 x 8sbh).
PAPER_MODEL = ModelConfig(
    num_layers=4,
    hidden_size=96,
    ffn_hidden_size=256,  # 8 * 96 / 3
    num_attention_heads=8,
    vocab_size=64,
    max_position_embeddings=512,
    attention_dropout=0.1,
    hidden_dropout=0.1,
)
S, B = 64, 2


def _paper_bytes(t: int, *, sequence_parallel: bool, selective: bool) -> float:
    """Korthikanti et al. 2022, Table 2, per layer."""
    s, b, h, a = S, B, 96, 8
    sbh = s * b * h
    attention = 0 if selective else 5 * a * s / (h * t)
    if sequence_parallel:
        return sbh * (34 / t + attention)
    return sbh * (10 + 24 / t + attention)


@pytest.mark.parametrize("t", [1, 2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("selective", [False, True])
def test_layer_activations_equal_the_papers_table_2(t, sequence_parallel, selective):
    got = layer_activation_bytes(
        PAPER_MODEL,
        seq_length=S,
        micro_batch_size=B,
        tp=t,
        sequence_parallel=sequence_parallel,
        recompute="selective" if selective else "none",
        attention_kernel="unfused",
    )
    assert got == pytest.approx(_paper_bytes(t, sequence_parallel=sequence_parallel, selective=selective))


@pytest.mark.parametrize(
    ("t", "sequence_parallel", "expected_split"), [(1, False, 1), (4, False, 1), (4, True, 4)]
)
def test_full_recompute_keeps_each_layers_input(t, sequence_parallel, expected_split):
    # Table 2, full recomputation: 2sbh per layer; sequence parallelism splits that input over TP.
    got = layer_activation_bytes(
        PAPER_MODEL,
        seq_length=S,
        micro_batch_size=B,
        tp=t,
        sequence_parallel=sequence_parallel,
        recompute="full",
    )
    assert got == 2 * S * B * 96 / expected_split


def test_gqa_shrinks_only_the_saved_keys_and_values():
    # 8 query heads of d=12; with 2 KV groups K and V each keep 2sb*d*(8-2) bytes fewer, all inside TP.
    gqa = PAPER_MODEL.replace(num_query_groups=2)
    for t in (1, 2):
        common = dict(seq_length=S, micro_batch_size=B, tp=t, attention_kernel="unfused")
        saved = layer_activation_bytes(PAPER_MODEL, **common) - layer_activation_bytes(gqa, **common)
        assert saved == pytest.approx(2 * (2 * S * B * 12 * (8 - 2)) / t)


def test_fused_attention_keeps_softmax_statistics_instead_of_scores():
    # Unfused with dropout: 5as^2b (scores, mask, dropped-out scores); fused: fp32 log-sum-exp, 4asb.
    a = 8
    common = dict(seq_length=S, micro_batch_size=B, tp=2)
    unfused = layer_activation_bytes(PAPER_MODEL, attention_kernel="unfused", **common)
    fused = layer_activation_bytes(PAPER_MODEL, attention_kernel="fused", **common)
    assert unfused - fused == pytest.approx((5 * a * S * S * B - 4 * a * S * B) / 2)
    # Without attention dropout only the softmax output (2as^2b) is kept.
    no_dropout = PAPER_MODEL.replace(attention_dropout=0.0)
    dropped = layer_activation_bytes(PAPER_MODEL, attention_kernel="unfused", **common)
    kept = layer_activation_bytes(no_dropout, attention_kernel="unfused", **common)
    assert dropped - kept == pytest.approx(3 * a * S * S * B / 2)


def test_fp8_keeps_gemm_inputs_in_one_byte():
    # QKV and fc1 inputs (sbh each, replicated without SP) and the fc2 input (sbf) drop from 2 B to 1 B; the
    # attention output gains a 1 B FP8 copy (sb*a*d): net -2sbh - (sbf - sbh) / t at h = a*d.
    bf16 = PAPER_MODEL.replace(params_dtype="bf16")
    fp8 = bf16.replace(fp8="delayed")
    sb, h, f, t = S * B, 96, 256, 2
    common = dict(seq_length=S, micro_batch_size=B, tp=t)
    saved = layer_activation_bytes(bf16, **common) - layer_activation_bytes(fp8, **common)
    assert saved == pytest.approx(2 * sb * h + (sb * f - sb * h) / t)


def test_tiny_parameter_memory_by_hand():
    # Tiny: h=128, ffn 344, 4 heads of 32, 2 KV heads, vocab 100, 4 layers, untied, fp32.
    # Per layer: q, o 128*128 each; k, v 128*64 each; MLP 3*128*344; norms 2*128 -> 181,504.
    per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 344 + 2 * 128
    total = 4 * per_layer + 2 * 100 * 128 + 128
    assert total == count_parameters(TINY).total == 751_744
    stage = plan_memory(TINY, TrainingSetup(seq_length=128)).worst_stage
    assert stage.parameters == total
    # fp32 model: 4 B weights, 4 B gradients, Adam m and v 8 B (no master copy).
    assert (stage.bytes_of("weights"), stage.bytes_of("gradients"), stage.bytes_of("optimizer")) == (
        4 * total,
        4 * total,
        8 * total,
    )
    # bf16: 2 B weights, fp32 gradients 4 B (or bf16 2 B), optimizer 12 B (fp32 master + m + v).
    bf16 = TINY.replace(params_dtype="bf16")
    stage = plan_memory(bf16, TrainingSetup(seq_length=128)).worst_stage
    assert (stage.bytes_of("weights"), stage.bytes_of("gradients"), stage.bytes_of("optimizer")) == (
        2 * total,
        4 * total,
        12 * total,
    )
    stage = plan_memory(bf16, TrainingSetup(seq_length=128, grad_reduce_in_fp32=False)).worst_stage
    assert stage.bytes_of("gradients") == 2 * total


def test_tiny_tp_and_pp_shards_by_hand():
    # TP=2: linear weights and both vocab tables halve, the two RMSNorms per layer and the final norm do not.
    linear = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 344
    tp2 = plan_memory(TINY, TrainingSetup(tp=2, seq_length=128)).worst_stage
    assert tp2.parameters == 4 * (linear // 2 + 256) + 2 * 100 * 128 // 2 + 128
    # PP=2: two layers per stage; embedding on stage 0, final norm and output layer on stage 1.
    stages = plan_memory(TINY, TrainingSetup(pp=2, seq_length=128)).stages
    assert [s.parameters for s in stages] == [2 * (linear + 256) + 12_800, 2 * (linear + 256) + 12_800 + 128]
    assert [s.first_layer for s in stages] == [0, 2]


def test_tied_embedding_has_a_second_copy_on_the_last_stage_only_with_pp():
    tied = TINY.replace(tie_word_embeddings=True)
    table = 100 * 128
    one_stage = plan_memory(tied, TrainingSetup(seq_length=128)).worst_stage
    assert one_stage.parameters == count_parameters(tied).total  # one table serves both ends
    last = plan_memory(tied, TrainingSetup(pp=2, seq_length=128)).stages[-1]
    first = plan_memory(tied, TrainingSetup(pp=2, seq_length=128)).stages[0]
    assert last.parameters - first.parameters == 128  # both hold a table; the last adds the final norm
    assert first.parameters == 2 * count_parameters(tied).per_layer + table


def test_distributed_optimizer_divides_only_the_optimizer_state_by_dp_times_cp():
    base = dict(tp=2, seq_length=4096)
    off = plan_memory(LLAMA, TrainingSetup(dp=8, distributed_optimizer=False, **base)).worst_stage
    on = plan_memory(LLAMA, TrainingSetup(dp=8, **base)).worst_stage
    with_cp = plan_memory(LLAMA, TrainingSetup(dp=4, cp=2, **base)).worst_stage
    assert on.bytes_of("optimizer") == off.bytes_of("optimizer") // 8
    assert with_cp.bytes_of("optimizer") == off.bytes_of("optimizer") // 8
    for key in ("weights", "gradients"):
        assert on.bytes_of(key) == off.bytes_of(key) == with_cp.bytes_of(key)


@pytest.mark.parametrize("name", ["qwen3_4b", "llama3_8b", "mistral_nemo_12b"])
def test_more_tp_means_less_per_gpu_state_and_activations(name):
    model = get_model_preset(name)
    stages = [
        plan_memory(model, TrainingSetup(tp=t, seq_length=4096, sequence_parallel=t > 1)).worst_stage
        for t in (1, 2, 4, 8)
    ]
    for key in ("weights", "gradients", "optimizer", "activations", "logits"):
        values = [s.bytes_of(key) for s in stages]
        assert values == sorted(values, reverse=True) and len(set(values)) == 4, (key, values)


def test_more_pp_means_fewer_layers_but_more_micro_batches_in_flight_on_the_first_stage():
    plans = {pp: plan_memory(NEMO, TrainingSetup(pp=pp, seq_length=4096)) for pp in (1, 2, 4)}
    weights = [plans[pp].stages[0].bytes_of("weights") for pp in (1, 2, 4)]
    assert weights == sorted(weights, reverse=True)
    # 1F1B: stage i holds PP - i micro-batches of L/PP layers, so the first stage's layer activations stay
    # L x (one micro-batch) whatever PP is; only the last stage holds the logits.
    four = plans[4]
    assert [s.in_flight_microbatches for s in four.stages] == [4, 3, 2, 1]
    per_layer = layer_activation_bytes(NEMO, seq_length=4096, micro_batch_size=1)
    assert four.stages[0].bytes_of("activations") == pytest.approx(4 * 10 * per_layer, abs=1)
    assert [s.bytes_of("logits") > 0 for s in four.stages] == [False, False, False, True]
    # Fewer micro-batches than stages bound what is in flight.
    two = plan_memory(NEMO, TrainingSetup(pp=4, seq_length=4096, num_microbatches=2))
    assert [s.in_flight_microbatches for s in two.stages] == [2, 2, 2, 1]


def test_recomputation_lowers_activations():
    values = {
        recompute: plan_memory(
            NEMO, TrainingSetup(tp=4, seq_length=4096, recompute=recompute)
        ).worst_stage.bytes_of("activations")
        for recompute in ("none", "selective", "full")
    }
    assert values["none"] > values["selective"] > values["full"]
    # Full recomputation keeps 2sbh per layer (40 layers, b=1, s=4096, h=5120, no SP) plus one layer
    # rematerialised during the backward, plus the final-norm and output-layer inputs (4sbh).
    sbh = 4096 * 5120
    one_layer = layer_activation_bytes(NEMO, seq_length=4096, micro_batch_size=1, tp=4)
    assert values["full"] == pytest.approx(40 * 2 * sbh + one_layer + 4 * sbh, abs=1)


def test_llama3_8b_published_layouts_fit():
    # TP=2, DP=8, distributed optimizer, bf16, seq 4096, micro-batch 1, selective recompute: ~43 GiB.
    plan = plan_memory(LLAMA, TrainingSetup(tp=2, dp=8, seq_length=4096, recompute="selective"))
    assert plan.fits() and plan.headroom_bytes() > 20 * GIB
    # TP=1 fits with bf16 gradients (~64 GiB); with fp32 gradients it is at the edge (~79 GiB of 79.6).
    bf16_grads = TrainingSetup(tp=1, dp=8, seq_length=4096, recompute="selective", grad_reduce_in_fp32=False)
    assert plan_memory(LLAMA, bf16_grads).fits()


def test_nemo_12b_on_one_gpu_without_distributed_optimizer_does_not_fit_and_says_why():
    plan = plan_memory(NEMO, TrainingSetup(seq_length=4096, distributed_optimizer=False))
    params = count_parameters(NEMO).total
    # 2 B weights + 4 B fp32 gradients + 12 B optimizer = 18 B/param (16 B with bf16 gradients): > 195 GB.
    assert plan.worst_stage.bytes_of("optimizer") == 12 * params
    assert plan.total_bytes > 18 * params > 195e9
    assert not plan.fits()
    text = format_plan(plan)
    assert "DOES NOT FIT in 79.6 GiB per GPU" in text
    assert "largest items: optimizer (fp32 master + Adam m, v) 136.9 GiB" in text
    assert "try:" in text and "distributed optimizer" in text and "TP 1 -> 2" in text
    assert "(fits)" in text  # a combination of the suggestions that fits


def test_suggestions_are_replanned_and_each_saves_memory():
    plan = plan_memory(NEMO, TrainingSetup(seq_length=4096, distributed_optimizer=False))
    suggestions = suggest_changes(plan)
    assert suggestions
    totals = [s.plan.total_bytes for s in suggestions]
    assert totals == sorted(totals) and max(totals) < plan.total_bytes
    # With fused attention selective recomputation saves only the softmax statistics: not worth suggesting.
    assert not any("selective" in s.description for s in suggestions)


def _nemo_rollout(**changes: object) -> RolloutSetup:
    return RolloutSetup(num_prompts=128, group_size=16, max_total_length=4096, **changes)


@pytest.mark.parametrize(
    "training",
    [
        TrainingSetup(tp=4, dp=4, seq_length=4096, sequence_parallel=True, recompute="selective"),
        TrainingSetup(tp=2, pp=2, dp=4, seq_length=4096, sequence_parallel=True, num_microbatches=8),
    ],
)
def test_nemo_12b_on_two_8_gpu_nodes_with_colocated_vllm_fits(training):
    for rollout in (
        _nemo_rollout(gpu_memory_utilization=0.35, tensor_parallel_size=2),
        _nemo_rollout(kv_cache_bytes=16 * GIB, tensor_parallel_size=2),
    ):
        plan = plan_memory(NEMO, training, rollout)
        assert plan.fits(), format_plan(plan)
        assert not plan.layout.tp_crosses_nodes
        assert "fits in 79.6 GiB per GPU" in format_plan(plan)


def test_vllm_pool_is_its_weights_workspace_and_kv_cache():
    rollout = _nemo_rollout(gpu_memory_utilization=0.35, tensor_parallel_size=2)
    stage = plan_memory(NEMO, TrainingSetup(tp=4, dp=4, seq_length=4096), rollout).worst_stage
    pool = sum(stage.bytes_of(k) for k in ("rollout_weights", "rollout_workspace", "rollout_kv_cache"))
    assert pool == int(0.35 * H100_80GB_BYTES)
    # Weights at vLLM's TP=2: the whole model (both vocab tables, all layers), bf16, halved but the norms.
    assert stage.bytes_of("rollout_weights") == pytest.approx(count_parameters(NEMO).total, rel=1e-4)


def test_kv_cache_formula_with_a_rollout_tp_other_than_training_tp():
    # No budget: exactly the batch. 16 GPUs / vLLM TP 2 = 8 engines, 2048 sequences -> 256 each of 4096
    # tokens; per GPU 2 (K, V) x 40 layers x 8/2 KV heads x 128 x 2 B per token.
    stage = plan_memory(
        NEMO, TrainingSetup(tp=4, dp=4, seq_length=4096), _nemo_rollout(tensor_parallel_size=2)
    )
    assert stage.worst_stage.bytes_of("rollout_kv_cache") == 2 * 40 * 4 * 128 * 2 * 256 * 4096
    # vLLM TP 4 exceeds tiny's 2 KV heads: each GPU keeps one (replicated), not half of one.
    tiny = plan_memory(
        TINY,
        TrainingSetup(dp=4, seq_length=128),
        RolloutSetup(num_prompts=4, group_size=2, max_total_length=128, tensor_parallel_size=4),
    )
    # 4 GPUs / TP 4 = 1 engine holding 8 sequences; 4 layers, 1 KV head of 32, bf16.
    assert tiny.worst_stage.bytes_of("rollout_kv_cache") == 2 * 4 * 1 * 32 * 2 * 8 * 128
    assert not tiny.notes  # exactly the batch: every sequence fits at once, and TP 4 stays in a node
    across = plan_memory(
        TINY,
        TrainingSetup(dp=4, seq_length=128, gpus_per_node=2),
        RolloutSetup(num_prompts=4, group_size=2, max_total_length=128, tensor_parallel_size=4),
    )
    assert any("spans nodes" in note for note in across.notes)


def test_in_process_generation_kv_cache_exists_only_during_rollouts():
    training = TrainingSetup(tp=2, pp=2, dp=2, seq_length=2048)
    plan = plan_memory(
        LLAMA, training, RolloutSetup(engine="megatron", num_prompts=8, group_size=4, max_total_length=2048)
    )
    stage = plan.worst_stage
    # Each of 2 DP replicas generates 16 sequences; per GPU 16 layers (PP 2) x 8/2 KV heads x 128 x 2 B x 2.
    assert stage.bytes_of("rollout_kv_cache") == 2 * 16 * 4 * 128 * 2 * 16 * 2048
    assert stage.bytes_of("rollout_weights") == 0  # generation runs on the training weights
    resident = stage.phase_bytes("resident")
    assert stage.peak_bytes == resident + max(stage.phase_bytes("training"), stage.phase_bytes("rollout"))
    assert stage.peak_bytes < resident + stage.phase_bytes("training") + stage.phase_bytes("rollout")


def test_sleeping_between_phases_lowers_the_peak_to_the_larger_phase():
    training = TrainingSetup(tp=4, dp=4, seq_length=4096)
    awake = plan_memory(NEMO, training, _nemo_rollout(gpu_memory_utilization=0.35))
    asleep = plan_memory(
        NEMO, training, _nemo_rollout(gpu_memory_utilization=0.35, sleep_between_phases=True)
    )
    stage = asleep.worst_stage
    train_phase = sum(stage.bytes_of(k) for k in ("gradients", "optimizer", "activations", "logits"))
    rollout_phase = int(0.35 * H100_80GB_BYTES)
    resident = stage.bytes_of("weights") + stage.bytes_of("overhead")
    assert asleep.total_bytes == resident + max(train_phase, rollout_phase)
    assert asleep.total_bytes < awake.total_bytes


def test_a_vllm_pool_smaller_than_its_weights_is_a_problem():
    plan = plan_memory(
        NEMO,
        TrainingSetup(tp=4, dp=2, seq_length=4096),
        _nemo_rollout(gpu_memory_utilization=0.1, tensor_parallel_size=1),
    )
    assert not plan.fits() and "no room for a KV cache" in plan.problems[0]
    assert "problem: vLLM gpu_memory_utilization=0.1" in format_plan(plan)


def test_layout_matches_megatrons_documented_example():
    # megatron.core.parallel_state.initialize_model_parallel's docstring: 16 GPUs, TP 2, PP 4 -> TP groups
    # [g0, g1], [g2, g3], ...; pipeline groups [g0, g4, g8, g12], ...; data-parallel groups [g0, g2],
    # [g1, g3], [g4, g6], ... So stage 0 is ranks 0-3 and replica 0 (dp rank 0) is g0, g1, g4, g5, g8, g9,
    # g12, g13.
    layout = ParallelLayout(tp=2, pp=4, cp=1, dp=2, gpus_per_node=8)
    assert layout.tp_groups[:3] == ((0, 1), (2, 3), (4, 5))
    assert layout.pipeline_stages[0] == (0, 1, 2, 3) and layout.pipeline_stages[3] == (12, 13, 14, 15)
    assert layout.dp_replicas == ((0, 1, 4, 5, 8, 9, 12, 13), (2, 3, 6, 7, 10, 11, 14, 15))
    assert not layout.tp_crosses_nodes
    assert "replica 0: [0-1,4-5,8-9,12-13]" in layout.describe()
    # Its context-parallel example: 8 GPUs, TP 4, CP 2 -> chunks on GPUs 0-3 and 4-7, one model replica.
    with_cp = ParallelLayout(tp=4, pp=1, cp=2, dp=1, gpus_per_node=8)
    assert with_cp.tp_groups == ((0, 1, 2, 3), (4, 5, 6, 7)) and with_cp.dp_replicas == (tuple(range(8)),)


def test_every_rank_is_in_exactly_one_group_of_each_kind():
    layout = ParallelLayout(tp=2, pp=3, cp=2, dp=2, gpus_per_node=8)
    for groups in (layout.tp_groups, layout.pipeline_stages, layout.dp_replicas):
        assert sorted(rank for group in groups for rank in group) == list(range(24))


@pytest.mark.parametrize(("tp", "gpus_per_node", "crosses"), [(8, 8, False), (16, 8, True), (4, 6, True)])
def test_tp_across_node_boundaries_is_warned(tp, gpus_per_node, crosses):
    layout = ParallelLayout(tp=tp, pp=1, cp=1, dp=2, gpus_per_node=gpus_per_node)
    assert layout.tp_crosses_nodes is crosses
    assert ("CROSS NODES" in layout.describe()) is crosses
    assert any("NVLink" in w for w in layout.warnings) is crosses


def test_format_plan_lists_items_in_gib_with_one_decimal():
    plan = plan_memory(LLAMA, TrainingSetup(tp=2, dp=8, seq_length=4096, recompute="selective"))
    text = format_plan(plan)
    weights = plan.worst_stage.bytes_of("weights")
    assert f"{weights / GIB:.1f}" in text and "weights (bf16)" in text
    assert "world 16 GPU(s) = TP 2 x PP 1 x CP 1 x DP 8 on 2 node(s)" in text
    assert f"{plan.total_bytes / GIB:.1f} GiB needed" in text


def test_verdict_at_the_edge_of_capacity():
    training = TrainingSetup(tp=2, dp=8, seq_length=4096)
    needed = plan_memory(LLAMA, training).total_bytes
    roomy = plan_memory(LLAMA, training, gpu_memory_bytes=needed + GIB)
    assert roomy.fits() and roomy.headroom_bytes() == GIB and "(tight:" in format_plan(roomy)
    short = plan_memory(LLAMA, training, gpu_memory_bytes=needed - 1)
    assert not short.fits() and short.headroom_bytes() == -1 and "DOES NOT FIT" in format_plan(short)
    assert roomy.fits(needed - 1) is False  # an explicit capacity overrides the planned GPU's


def test_bad_inputs_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="num_layers=40 is not divisible by pp=3"):
        plan_memory(NEMO, TrainingSetup(pp=3, seq_length=4096))
    with pytest.raises(pydantic.ValidationError, match="give vLLM one of them"):
        _nemo_rollout(gpu_memory_utilization=0.3, kv_cache_bytes=GIB)
    with pytest.raises(ValueError, match="rollout tensor_parallel_size=3 cannot serve"):
        plan_memory(NEMO, TrainingSetup(tp=2, dp=3, seq_length=4096), _nemo_rollout(tensor_parallel_size=3))
    with pytest.raises(pydantic.ValidationError, match="cp=2 needs attention_kernel='fused'"):
        TrainingSetup(cp=2, seq_length=4096, attention_kernel="unfused")
