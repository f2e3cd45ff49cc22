"""Each default lives in one place: conf/grpo_base.yaml and conf/sft/sft_base.yaml list every key of their
schema (so any can be overridden on the command line) with exactly the schema's default, so a run built in
Python (`GRPORunConfig(model=...)`) and one launched from the command line start from the same values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from pydantic import BaseModel

from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.config.model import get_model_preset
from nemo_quagmire.config.run import CONF_DIR
from nemo_quagmire.config.sft import SFT_CONF_DIR, SFTRunConfig

BASES = [(GRPORunConfig, CONF_DIR / "grpo_base.yaml"), (SFTRunConfig, SFT_CONF_DIR / "sft_base.yaml")]
NOT_SCHEMA_KEYS = {"defaults", "hydra"}  # Hydra's own sections


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return list(value) if isinstance(value, tuple) else value


def default_mismatches(default: BaseModel, section: dict, prefix: str = "") -> list[str]:
    """`key: yaml=... schema=...` for every leaf of `section` that differs from `default`, and every field of
    `default` that `section` leaves out."""
    problems = []
    for name in type(default).model_fields:
        key = f"{prefix}{name}"
        if name not in section:
            problems.append(
                f"{key}: missing from the YAML (schema default {_plain(getattr(default, name))!r})"
            )
            continue
        value, expected = section[name], getattr(default, name)
        if isinstance(expected, BaseModel) and isinstance(value, dict):
            problems += default_mismatches(expected, value, f"{key}.")
            continue
        if _plain(value) != _plain(expected):
            problems.append(f"{key}: yaml={value!r} schema={_plain(expected)!r}")
    problems += [
        f"{prefix}{name}: not a schema key" for name in section if name not in type(default).model_fields
    ]
    return problems


@pytest.mark.parametrize(("schema", "path"), BASES, ids=lambda x: getattr(x, "name", ""))
def test_every_key_of_the_base_yaml_is_the_schema_default(schema: type[BaseModel], path: Path):
    section = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    section = {k: v for k, v in section.items() if k not in NOT_SCHEMA_KEYS}
    model = section.pop("model")  # required: a preset, plus the fields the base sets explicitly
    preset = get_model_preset(model.pop("preset"))
    default = schema.model_construct(model=preset)  # every other field at its default
    problems = default_mismatches(default, {**section, "model": preset})
    problems += [
        f"model.{k}: yaml={v!r}, preset={getattr(preset, k)!r}"
        for k, v in model.items()
        if getattr(preset, k) != v
    ]
    assert not problems, f"{path.name} disagrees with {schema.__name__}:\n" + "\n".join(problems)


def test_the_check_names_a_disagreeing_and_a_missing_key():
    from nemo_quagmire.config.run import CheckpointConfig

    section = {"interval": 7, "keep_last": 2, "resume": "auto", "typo": 1}
    assert default_mismatches(CheckpointConfig(), section, "checkpoint.") == [
        "checkpoint.interval: yaml=7 schema=50",
        "checkpoint.load_from: missing from the YAML (schema default None)",
        "checkpoint.typo: not a schema key",
    ]
