"""Every YAML in conf/ composes with Hydra and validates into GRPORunConfig; bad values name the key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from pydantic import ValidationError

from nemo_quagmire.config.errors import format_validation_error
from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.config.run import CONF_DIR
from nemo_quagmire.trainer.entry import compose_run_config

CONF = CONF_DIR
RUNNABLE = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "grpo_base")


def _compose(name: str, overrides: list[str] | None = None) -> dict:
    return compose_run_config(name, overrides or []).model_dump()


def test_the_expected_configs_exist():
    assert RUNNABLE == ["llama3_8b", "nemo12b", "qwen3_4b", "tiny"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_config_validates_and_its_header_says_how_to_run_it(name):
    cfg = GRPORunConfig.model_validate(_compose(name))
    header = (CONF / f"{name}.yaml").read_text().split("\n\n")[0]
    assert "scripts/train_grpo.py" in header and ("Hardware" in header or "CPU" in header)
    if name != "tiny":
        assert f"--config-name={name}" in header
    assert cfg.model.num_layers > 0


def test_grpo_base_holds_every_key_of_the_schema():
    """So that any key can be overridden from the command line without Hydra's '+' prefix."""
    base = OmegaConf.to_container(OmegaConf.load(CONF / "grpo_base.yaml"))
    base.pop("hydra")
    base.pop("defaults")  # Hydra's own settings (conf/*_base.yaml: write nothing before validation)
    for section, schema in GRPORunConfig.model_fields.items():
        assert section in base, f"grpo_base.yaml lacks {section}"
        sub = schema.annotation
        if isinstance(base[section], dict) and hasattr(sub, "model_fields") and section != "model":
            assert set(base[section]) == set(sub.model_fields), section


def test_presets_match_the_model_module():
    nemo = GRPORunConfig.model_validate(_compose("nemo12b")).model
    assert nemo.architecture_mismatches(get_model_preset("mistral_nemo_12b")) == {}
    assert nemo.fp8 == "delayed" and nemo.params_dtype == "bf16"
    tiny = GRPORunConfig.model_validate(_compose("tiny")).model
    assert tiny.vocab_size == 28 and tiny.num_layers == get_model_preset("tiny").num_layers


def test_command_line_overrides_reach_the_typed_config():
    cfg = GRPORunConfig.model_validate(_compose("tiny", ["grpo.group_size=4", "+model.num_layers=2"]))
    assert cfg.grpo.group_size == 4 and cfg.model.num_layers == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("grpo.group_sise=4", "grpo.group_sise: unknown key"),
        ("grpo.group_size=1", "grpo.group_size"),
        ("grpo.clip_low=1.5", "grpo.clip_low = 1.5"),
        ("grpo.loss_agg=seq-mean-token-sum-norm", "token_sum_normalizer"),
        ("rollout.engine=sglang", "rollout.engine = 'sglang'"),
        ("model.num_query_groups=3", "num_query_groups=3"),
        ("grpo.packing=padded", "grpo.packing = 'padded'"),
        ("parallel.pipeline_model_parallel_size=2", "grpo.packing=packed makes micro-batches"),
    ],
)
def test_bad_values_name_the_key_and_value(override, expected):
    raw = _compose("tiny")
    section, key = override.split("=")[0].split(".")
    value = override.split("=", 1)[1]
    raw[section][key] = (
        float(value)
        if value.replace(".", "").isdigit() and "." in value
        else (int(value) if value.isdigit() else value)
    )
    with pytest.raises(ValidationError) as info:
        GRPORunConfig.model_validate(raw)
    assert expected in format_validation_error(info.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        GRPORunConfig.model_validate({"model": {"preset": "gpt5"}})
