"""trainer.checkpoint_source: a run's model, tokenizer and HF config come from `checkpoint.load_from`,
resolved at config time; explicit `model.*` keys are checked against it (floats within a tolerance); every
run dir keeps an HF description of its model (`<run_dir>/model`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.megatron.hf import model_config_from_hf
from nemo_quagmire.trainer.checkpoint_source import (
    MODEL_DIR,
    CheckpointSourceError,
    explicit_model_keys,
    load_tokenizer,
    read_checkpoint_source,
    resolve_run_config,
    write_model_dir,
)
from nemo_quagmire.trainer.entry import compose_run_config, compose_sft_config
from tests.checkpoint_meta import write_checkpoint_meta
from tests.hf_models import RMS_NORM_EPS_FLOAT32

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


def _jsonl_run(hf_dir: Path, *overrides: str) -> list[str]:
    return [
        f"checkpoint.load_from={hf_dir}",
        "data.task=jsonl",
        "data.train_file=train.jsonl",
        "validation.heldout_loss=false",
        *overrides,
    ]


def _grpo_jsonl_run(hf_dir: Path, *overrides: str) -> list[str]:
    """`_jsonl_run` for GRPO: tiny.yaml warms up on the synthetic task; a jsonl run starts from load_from."""
    return _jsonl_run(hf_dir, "sft_warmup.steps=0", *overrides)


def test_an_hf_directory_gives_the_model_and_the_tokenizer_without_model_overrides(tiny_chat_model):
    expected = model_config_from_hf(tiny_chat_model)
    grpo = compose_run_config(
        "tiny", _grpo_jsonl_run(tiny_chat_model)
    )  # tiny.yaml's preset and vocab give way
    sft = compose_sft_config("tiny", _jsonl_run(tiny_chat_model, "data.prompt_template=chat"))
    for cfg in (grpo, sft):
        assert cfg.model == expected
        assert cfg.model.norm_epsilon == RMS_NORM_EPS_FLOAT32 and cfg.model.vocab_size == 384
        assert cfg.data.tokenizer == str(tiny_chat_model)
    explicit_tokenizer = compose_run_config(
        "tiny", _grpo_jsonl_run(tiny_chat_model, "data.tokenizer=/elsewhere")
    )
    assert explicit_tokenizer.data.tokenizer == "/elsewhere"  # data.tokenizer wins


def test_explicit_model_keys_are_checked_with_a_float_tolerance_and_precision_keys_apply(tiny_chat_model):
    cfg = compose_run_config(
        "tiny",
        _grpo_jsonl_run(
            tiny_chat_model,
            "+model.norm_epsilon=1e-5",  # stored as float32: 9.999999747378752e-06
            "+model.num_layers=2",
            "+model.kv_channels=32",  # the head dim the HF config implies
            "model.max_position_embeddings=64",  # shorter contexts are allowed
            "+model.params_dtype=bf16",
            "model.recompute=full",
        ),
    )
    assert cfg.model.norm_epsilon == RMS_NORM_EPS_FLOAT32 and cfg.model.num_layers == 2
    assert (cfg.model.max_position_embeddings, cfg.model.params_dtype, cfg.model.recompute) == (
        64,
        "bf16",
        "full",
    )


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["+model.num_layers=3"], ["model.num_layers=3 but", "has 2"]),
        (["+model.norm_epsilon=1e-6"], ["model.norm_epsilon=1e-06 but", "has 9.999999747378752e-06"]),
        (["model.vocab_size=28"], ["model.vocab_size=28 but", "has 384"]),
        (["model.max_position_embeddings=1024"], ["model.max_position_embeddings=1024 but", "has 512"]),
        (["model.preset=llama3_8b"], ["model.hidden_size=4096 but", "has 128", "model.num_layers=32 but"]),
    ],
)
def test_a_real_mismatch_names_the_field_both_values_and_the_fix(tiny_chat_model, overrides, fragments):
    with pytest.raises(CheckpointSourceError) as info:
        compose_run_config("tiny", _grpo_jsonl_run(tiny_chat_model, *overrides))
    message = str(info.value)
    for fragment in fragments + ["drop these model.* overrides", str(tiny_chat_model)]:
        assert fragment in message


def test_an_unknown_model_key_or_preset_is_still_an_error(tiny_chat_model):
    with pytest.raises(ValueError, match="model.num_layer"):
        compose_run_config("tiny", _grpo_jsonl_run(tiny_chat_model, "+model.num_layer=2"))
    with pytest.raises(CheckpointSourceError, match="unknown model preset 'llama9'"):
        compose_run_config("tiny", _grpo_jsonl_run(tiny_chat_model, "model.preset=llama9"))


def test_bad_sources_name_the_problem(tiny_chat_model, tmp_path):
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_chat_model, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointSourceError) as info:
        compose_run_config("tiny", _grpo_jsonl_run(gpt2))
    assert "GPT2LMHeadModel" in str(info.value)
    assert "['LlamaForCausalLM', 'MistralForCausalLM', 'Qwen3ForCausalLM']" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointSourceError, match="neither a checkpoint of this project"):
        compose_run_config("tiny", _grpo_jsonl_run(tmp_path / "empty"))
    missing = {"model": {"preset": "llama3_8b"}, "checkpoint": {"load_from": str(tmp_path / "missing")}}
    with pytest.raises(CheckpointSourceError, match="missing: no such directory"):
        resolve_run_config(missing)  # what train_grpo.py / train_sft.py do
    # A dry run plans on any machine (and composed configs validate): the config's own model stands.
    assert resolve_run_config({**missing, "dry_run": True}) == {**missing, "dry_run": True}
    assert resolve_run_config(missing, missing_ok=True) == missing


def test_a_tensor_parallel_size_that_does_not_divide_the_checkpoint_names_the_valid_ones(tiny_chat_model):
    with pytest.raises(ValueError) as info:
        compose_run_config("tiny", _grpo_jsonl_run(tiny_chat_model, "parallel.tensor_model_parallel_size=4"))
    assert "tensor_model_parallel_size=4 does not divide num_query_groups (KV heads)=2; valid: 1, 2" in str(
        info.value
    )


def test_explicit_model_keys_are_read_from_the_command_line_overrides():
    overrides = ["model.a=1", "+model.b=2", "++model.c=3", "model.d.e=4", "data.model.f=5", "max_steps=2"]
    assert explicit_model_keys(overrides) == {"a", "b", "c"}


def test_a_run_dir_describes_its_model_as_an_hf_directory_without_weights(tiny_chat_model, tmp_path):
    source = read_checkpoint_source(tiny_chat_model)
    run_dir = tmp_path / "run"
    write_model_dir(run_dir, source.model, load_tokenizer(tiny_chat_model), tiny_chat_model)
    write_model_dir(run_dir, source.model, load_tokenizer(tiny_chat_model), tiny_chat_model)  # a resume
    model_dir = run_dir / MODEL_DIR
    assert not list(run_dir.glob(".*partial"))
    assert json.loads((model_dir / "config.json").read_text()) == json.loads(
        (tiny_chat_model / "config.json").read_text()
    )
    assert (model_dir / "generation_config.json").read_text() == (
        tiny_chat_model / "generation_config.json"
    ).read_text()
    original, saved = load_tokenizer(tiny_chat_model), load_tokenizer(model_dir)
    template = dict(tokenize=False, add_generation_prompt=True)
    assert saved.apply_chat_template(MESSAGES, **template) == original.apply_chat_template(
        MESSAGES, **template
    )
    assert (saved.eos_id, saved.bos_id, saved.vocab_size) == (original.eos_id, original.bos_id, 384)

    # A checkpoint of that run reads back as a source: its model, its step, the run's tokenizer.
    checkpoint = run_dir / "checkpoints" / "step_00000007"
    write_checkpoint_meta(checkpoint, 7, source.model)
    again = read_checkpoint_source(checkpoint)
    assert (again.kind, again.step, again.model) == ("run", 7, source.model)
    assert again.hf_tokenizer_dir == model_dir and again.hf_config_file == model_dir / "config.json"


def test_a_synthetic_run_dir_keeps_the_character_tokenizer_and_a_llama_config(tmp_path):
    model = get_model_preset("tiny").replace(vocab_size=28)
    tokenizer = CharTokenizer()
    write_model_dir(tmp_path, model, tokenizer, None)
    assert load_tokenizer(tmp_path / MODEL_DIR) == tokenizer
    assert model_config_from_hf(tmp_path / MODEL_DIR).architecture_mismatches(model) == {}
    generation = json.loads((tmp_path / MODEL_DIR / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    # Math prompts need an HF tokenizer: a source without one (this run's) is refused, naming the fix.
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    write_checkpoint_meta(checkpoint, 1, model)
    with pytest.raises(CheckpointSourceError, match="has none .* set data.tokenizer"):
        resolve_run_config({"checkpoint": {"load_from": str(checkpoint)}, "data": {"task": "jsonl"}})


def test_math_data_without_any_tokenizer_is_a_config_error():
    with pytest.raises(ValueError, match="data.task=jsonl needs a tokenizer: set checkpoint.load_from"):
        compose_run_config(
            "tiny",
            [
                "data.task=jsonl",
                "data.train_file=t.jsonl",
                "validation.heldout_loss=false",
                "sft_warmup.steps=0",
            ],
        )
