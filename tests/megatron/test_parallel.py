"""validate_layout: every megatron divisibility rule fails before any process group exists, naming the fix."""

from __future__ import annotations

import pydantic
import pytest

from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.config.parallel import ParallelConfig
from nemo_quagmire.megatron.parallel import Layout, validate_layout

TINY = get_model_preset("tiny")  # 4 layers, 4 heads, 2 query groups, ffn 344, vocab 100


def _parallel(
    tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None, sp: bool = False
) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        data_parallel_size=dp,
        sequence_parallel=sp,
    )


@pytest.mark.parametrize(
    ("world", "parallel", "expected"),
    [
        (1, _parallel(), Layout(tp=1, pp=1, cp=1, dp=1)),
        (8, _parallel(tp=2, pp=2), Layout(tp=2, pp=2, cp=1, dp=2)),
        (4, _parallel(tp=2, dp=2), Layout(tp=2, pp=1, cp=1, dp=2)),
    ],
)
def test_valid_layouts_resolve_the_data_parallel_size(world, parallel, expected):
    assert validate_layout(TINY, parallel, world) == expected
    assert expected.world_size == world


@pytest.mark.parametrize(
    ("model", "parallel", "world", "backend", "fragments"),
    [
        (
            TINY.replace(num_query_groups=1),
            _parallel(tp=2),
            2,
            None,
            ["parallel.tensor_model_parallel_size=2 does not divide num_query_groups (KV heads)=1; valid: 1"],
        ),
        (
            TINY.replace(num_attention_heads=2, num_query_groups=2, kv_channels=64),
            _parallel(tp=4),
            4,
            None,
            [
                "tensor_model_parallel_size=4 does not divide num_attention_heads=2, num_query_groups (KV "
                "heads)=2; valid: 1, 2"
            ],
        ),
        (
            TINY,
            _parallel(pp=3),
            3,
            None,
            ["pipeline_model_parallel_size=3 does not divide num_layers=4; valid: 1, 2, 4"],
        ),
        (
            TINY.replace(vocab_size=101),
            _parallel(tp=2),
            2,
            None,
            ["does not divide vocab_size=101; valid: 1 (or pad the embedding table to 102 rows"],
        ),
        (
            TINY.replace(ffn_hidden_size=343),
            _parallel(tp=2),
            2,
            None,
            ["tensor_model_parallel_size=2 does not divide ffn_hidden_size=343; valid: 1"],
        ),
        (TINY, _parallel(tp=2), 3, None, ["world size 3 is not divisible by TP x PP x CP = 2 x 1 x 1 = 2"]),
        (
            TINY,
            _parallel(tp=2, dp=2),
            2,
            None,
            ["data_parallel_size=2 but world size 2", "launch 4 processes"],
        ),
        (TINY, _parallel(cp=2), 2, "gloo", ["context_parallel_size=2 is unsupported on gloo"]),
        (TINY, _parallel(tp=2, sp=True), 2, "gloo", ["sequence_parallel=True needs Transformer Engine"]),
    ],
)
def test_invalid_layouts_name_values_and_fix(model, parallel, world, backend, fragments):
    with pytest.raises(ValueError) as info:
        validate_layout(model, parallel, world, backend=backend)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_the_valid_tensor_parallel_sizes_are_common_to_every_split_dimension():
    # Mistral-NeMo-12B: 32 heads, 8 KV heads, ffn 14336, vocab 131072 -> TP in 1, 2, 4, 8.
    nemo = get_model_preset("mistral_nemo_12b")
    with pytest.raises(ValueError) as info:
        validate_layout(nemo, _parallel(tp=3), 3)
    assert (
        "parallel.tensor_model_parallel_size=3 does not divide num_attention_heads=32, num_query_groups "
        "(KV heads)=8, ffn_hidden_size=14336, vocab_size=131072; valid: 1, 2, 4, 8 (or pad"
    ) in str(info.value)
    with pytest.raises(
        ValueError, match=r"=16 does not divide num_query_groups \(KV heads\)=8; valid: 1, 2, 4, 8$"
    ):
        validate_layout(nemo, _parallel(tp=16), 16)  # 16 divides the heads, the MLP width and the vocabulary


def test_all_problems_are_reported_together():
    with pytest.raises(ValueError) as info:
        validate_layout(TINY.replace(vocab_size=101), _parallel(tp=2, pp=3), 5)
    assert str(info.value).count("\n") == 3  # TP (vocab), layers, world size


def test_context_parallel_is_allowed_on_nccl():
    assert validate_layout(TINY, _parallel(cp=2), 2, backend="nccl").cp == 2


def test_parallel_config_rejects_unknown_and_nonpositive_fields():
    with pytest.raises(pydantic.ValidationError, match="tensor_parallel_size"):
        ParallelConfig(tensor_parallel_size=2)
    with pytest.raises(pydantic.ValidationError):
        ParallelConfig(pipeline_model_parallel_size=0)
