"""Every YAML in conf/sft/ composes with Hydra and validates into SFTRunConfig; the shipped configs fit their
hardware; bad values name the key and the fix."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from pydantic import ValidationError

from nemo_quagmire.config.errors import format_validation_error
from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.config.sft import SFT_CONF_DIR, SFTRunConfig
from nemo_quagmire.plan.sft import plan_sft_run
from nemo_quagmire.trainer.entry import compose_sft_config

RUNNABLE = sorted(p.stem for p in SFT_CONF_DIR.glob("*.yaml") if p.stem != "sft_base")


def test_the_expected_configs_exist():
    assert RUNNABLE == ["llama3_8b", "nemo12b", "qwen3_4b", "tiny"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_config_validates_fits_its_hardware_and_says_how_to_run_it(name):
    cfg = compose_sft_config(name)
    header = (SFT_CONF_DIR / f"{name}.yaml").read_text().split("\n\n")[0]
    assert "scripts/train_sft.py" in header and ("Hardware" in header or "CPU" in header)
    if name != "tiny":
        assert f"--config-name={name}" in header
    report, fits = plan_sft_run(cfg)
    assert fits, report


def test_sft_base_holds_every_key_of_the_schema():
    """So that any key can be overridden from the command line without Hydra's '+' prefix."""
    base = OmegaConf.to_container(OmegaConf.load(SFT_CONF_DIR / "sft_base.yaml"))
    base.pop("hydra")
    base.pop("defaults")  # Hydra's own settings (conf/*_base.yaml: write nothing before validation)
    assert set(base) == set(SFTRunConfig.model_fields)
    for section, schema in SFTRunConfig.model_fields.items():
        sub = schema.annotation
        if isinstance(base[section], dict) and hasattr(sub, "model_fields") and section != "model":
            assert set(base[section]) == set(sub.model_fields), section


def test_tiny_sft_checkpoints_fit_the_tiny_grpo_model():
    """`train_grpo.py checkpoint.load_from=<tiny SFT checkpoint>` needs the same architecture."""
    from nemo_quagmire.trainer.entry import compose_run_config

    sft, grpo = compose_sft_config("tiny").model, compose_run_config("tiny").model
    assert sft.architecture_mismatches(grpo) == {}
    assert sft.num_layers == get_model_preset("tiny").num_layers


def test_command_line_overrides_reach_the_typed_config():
    cfg = compose_sft_config("tiny", ["sft.max_steps=7", "validation.num_samples=16", "+model.num_layers=2"])
    assert (cfg.sft.max_steps, cfg.validation.num_samples, cfg.model.num_layers) == (7, 16, 2)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sft": {"packing": "zip"}}, "sft.packing = 'zip'"),
        ({"sft": {"epochs": None}}, "set sft.epochs or sft.max_steps"),
        ({"sft": {"seq_length": 4096}}, "sft.seq_length=4096 exceeds model.max_position_embeddings=128"),
        ({"validation": {"num_samples": 512}}, "validation.num_samples = 512"),
        ({"validation": {"num_samples": 4, "ks": [1, 8]}}, "pass@8 but validation.num_samples=4"),
        ({"validation": {"max_new_tokens": None}}, "validation.max_new_tokens is unset"),
        ({"data": {"task": "jsonl", "train_file": "t.jsonl", "tokenizer": "tok"}}, "validation.heldout_file"),
        ({"data": {"prompt_template": "chat"}}, "needs an HF tokenizer"),
        # "raw" was the SFT name of "plain" (one name now): the error names the value to use
        (
            {"data": {"prompt_template": "raw"}},
            "data.prompt_template = 'raw': Input should be 'plain' or 'chat'",
        ),
        (
            {"validation": {"heldout_prompt_template": "raw"}},
            "validation.heldout_prompt_template = 'raw': Input should be 'plain' or 'chat'",
        ),
        ({"parallel": {"data_parallel_size": 3}}, "global_batch_size=64 is not divisible"),
        ({"sft": {"epoch": 2}}, "sft.epoch: unknown key"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(overrides, expected):
    raw = compose_sft_config("tiny").model_dump()
    for section, values in overrides.items():
        raw[section] = {**raw[section], **values}
    with pytest.raises(ValidationError) as info:
        SFTRunConfig.model_validate(raw)
    assert expected in format_validation_error(info.value)


def test_grpo_runs_on_math_data_need_a_held_out_file_too():
    raw = {"model": {"preset": "tiny"}, "data": {"task": "jsonl", "train_file": "t", "tokenizer": "tok"}}
    with pytest.raises(ValidationError, match="validation.heldout_file"):
        GRPORunConfig.model_validate(raw)
    GRPORunConfig.model_validate({**raw, "validation": {"heldout_loss": False}})
