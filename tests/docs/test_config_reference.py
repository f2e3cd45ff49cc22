"""docs/config-reference.md is generated from the typed configs: it must match them exactly (regenerate with
`python scripts/gen_config_reference.py`), and list every key a composed run config holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from nemo_quagmire.config.grpo import compose_run_config
from nemo_quagmire.config.sft import compose_sft_config

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "config-reference.md"


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", REPO / "scripts" / "gen_config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_matches_the_schemas(generator):
    assert REFERENCE.read_text(encoding="utf-8") == generator.render(), (
        "docs/config-reference.md is stale: run python scripts/gen_config_reference.py"
    )


def _leaf_keys(value: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, item in value.items():
        if isinstance(item, dict) and name != "wandb" and name != "mlflow":  # dict-valued keys are leaves
            keys += _leaf_keys(item, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


@pytest.mark.parametrize(
    ("compose", "name"), [(compose_run_config, "nemo12b"), (compose_sft_config, "nemo12b")]
)
def test_every_key_of_a_composed_config_is_documented(compose, name):
    """Independent of the generator's walk: the keys of a real config, dumped by pydantic."""
    text = REFERENCE.read_text(encoding="utf-8")
    section = text.split("## SFT runs")[1 if compose is compose_sft_config else 0]
    keys = _leaf_keys(compose(name).model_dump())
    assert len(keys) > 50
    missing = [key for key in keys if f"| `{key}` |" not in section]
    assert not missing, f"keys missing from docs/config-reference.md: {missing}"


def test_check_mode_fails_on_a_stale_file(generator, tmp_path, monkeypatch, capsys):
    stale = tmp_path / "config-reference.md"
    stale.write_text(generator.render().replace("| `grpo.group_size` |", "| `grpo.group_sizes` |"))
    monkeypatch.setattr(generator, "OUTPUT", stale)
    monkeypatch.setattr(generator, "REPO", tmp_path)
    assert generator.main(["--check"]) == 1
    assert "is stale" in capsys.readouterr().err
    stale.write_text(generator.render())
    assert generator.main(["--check"]) == 0
