"""ModelConfig: presets against published parameter counts, validation messages, architecture comparison."""

from __future__ import annotations

import pydantic
import pytest

from nemo_quagmire.config.model import MODEL_PRESETS, ModelConfig, count_parameters, get_model_preset

# Published totals: TRL anchor README (751,744); Qwen3-4B-Base model card "4.0B" and the exact 4,022,468,096
# of its fine-tunes' safetensors; Llama-3-8B "8.03B"; Mistral-NeMo-12B "12.2B".
PUBLISHED_TOTALS = {
    "tiny": (751_744, 0),
    "qwen3_4b": (4_022_468_096, 0),
    "llama3_8b": (8.03e9, 0.005e9),
    "mistral_nemo_12b": (12.2e9, 0.05e9),
}


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_preset_parameter_count_matches_published_total(name):
    expected, tolerance = PUBLISHED_TOTALS[name]
    assert abs(count_parameters(get_model_preset(name)).total - expected) <= tolerance


def test_qwen3_4b_non_embedding_count_is_the_model_cards_3_6b():
    # Tied embeddings: the 151936 x 2560 table is counted once, and is all the model card excludes.
    count = count_parameters(get_model_preset("qwen3_4b"))
    assert count.output == 0
    assert count.non_embedding == count.total - 151936 * 2560
    assert round(count.non_embedding / 1e9, 1) == 3.6


def test_count_by_hand_for_a_small_gqa_qknorm_model():
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=8,
        ffn_hidden_size=12,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=3,
        vocab_size=10,
        max_position_embeddings=16,
        qk_layernorm=True,
    )
    # q 8*12 + k 8*6 + v 8*6 + o 12*8 = 288; mlp 3*8*12 = 288; norms 2*8 + qk 2*3 = 22  -> 598 per layer
    per_layer = 8 * 12 + 8 * 6 + 8 * 6 + 12 * 8 + 3 * 8 * 12 + 2 * 8 + 2 * 3
    assert count_parameters(cfg).total == 10 * 8 + 2 * per_layer + 8 + 10 * 8


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="llama3_8b") as info:
        get_model_preset("llama3_70b")
    assert "llama3_70b" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_query_groups": 3}, "num_attention_heads=4 is not a multiple of num_query_groups=3"),
        ({"hidden_size": 130}, "hidden_size=130 is not divisible by num_attention_heads=4"),
        ({"fp8": "delayed"}, "fp8='delayed' needs params_dtype='bf16'"),
        ({"rotary_percent": 1.5}, "rotary_percent"),
        ({"hidden_sise": 64}, "hidden_sise"),
    ],
)
def test_invalid_configs_name_the_values(changes, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        get_model_preset("tiny").replace(**changes)


def test_configs_are_frozen_and_replace_validates():
    tiny = get_model_preset("tiny")
    with pytest.raises(pydantic.ValidationError):
        tiny.num_layers = 2
    assert tiny.replace(num_layers=2).num_layers == 2
    assert tiny.num_layers == 4


def test_derived_head_dim_and_groups():
    tiny = get_model_preset("tiny")
    assert (tiny.head_dim, tiny.query_groups) == (32, 2)
    mha = tiny.replace(num_query_groups=None)
    assert mha.query_groups == 4
    assert get_model_preset("mistral_nemo_12b").head_dim == 128  # explicit: 5120 / 32 would be 160


def test_architecture_mismatches_ignore_precision_only():
    tiny = get_model_preset("tiny")
    assert tiny.architecture_mismatches(tiny.replace(params_dtype="bf16", hidden_dropout=0.1)) == {}
    assert tiny.architecture_mismatches(tiny.replace(num_layers=2, tie_word_embeddings=True)) == {
        "num_layers": (4, 2),
        "tie_word_embeddings": (False, True),
    }


def test_float_fields_compare_within_a_float32_round_trip():
    import numpy as np

    from nemo_quagmire.config.model import NON_ARCHITECTURE_FIELDS, ModelConfig

    base = get_model_preset("llama3_8b")  # norm_epsilon 1e-5
    stored = base.replace(norm_epsilon=float(np.float32(1e-5)))  # 9.999999747378752e-06
    assert stored.norm_epsilon != base.norm_epsilon and base.architecture_mismatches(stored) == {}
    assert base.architecture_mismatches(base.replace(norm_epsilon=1e-6)) == {"norm_epsilon": (1e-5, 1e-6)}
    assert base.architecture_mismatches(base.replace(rotary_base=500_001.0)) == {
        "rotary_base": (500_000.0, 500_001.0)
    }
    assert NON_ARCHITECTURE_FIELDS <= set(ModelConfig.model_fields)  # a renamed field must not slip through
