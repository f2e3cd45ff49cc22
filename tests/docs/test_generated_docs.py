"""The computed parts of docs/ match the code: docs/config-reference.md the config schemas, the dry-run
blocks and the shipped-layout table of docs/scaling.md the planner (regenerate with
`python scripts/gen_docs.py`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from nemo_quagmire.trainer.entry import compose_run_config, compose_sft_config

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "config-reference.md"
SCALING = REPO / "docs" / "scaling.md"
STALE = "stale: run python scripts/gen_docs.py"


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_config_reference_matches_the_schemas(generator):
    assert REFERENCE.read_text(encoding="utf-8") == generator.render_config_reference(), STALE


def _leaf_keys(value: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, item in value.items():
        if isinstance(item, dict) and name not in ("wandb", "mlflow"):  # dict-valued keys are leaves
            keys += _leaf_keys(item, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


@pytest.mark.parametrize("compose", [compose_run_config, compose_sft_config])
def test_every_key_of_a_composed_config_is_documented(compose):
    """Independent of the generator's walk over the schemas: the keys of a real config, dumped by pydantic."""
    grpo_part, sft_part = REFERENCE.read_text(encoding="utf-8").split("## SFT runs")
    section = sft_part if compose is compose_sft_config else grpo_part
    keys = _leaf_keys(compose("nemo12b").model_dump())
    assert len(keys) > 50
    assert [key for key in keys if f"| `{key}` |" not in section] == []


def test_the_scaling_guide_shows_todays_dry_runs(generator):
    text = SCALING.read_text(encoding="utf-8")
    blocks = generator.DRY_RUN_BLOCK.findall(text)
    assert {(script, name) for _, script, name, _, _ in blocks} == {
        (script, name)
        for script in ("train_grpo", "train_sft")
        for name in ("qwen3_4b", "llama3_8b", "nemo12b")
    }
    assert generator.render_scaling(text) == text, STALE


def test_the_scaling_table_quotes_the_plans(generator):
    """The shipped-layout table's peak and headroom columns are the plans' verdict lines."""
    rows = re.findall(
        r"^\| `conf/(sft/)?(\w+)\.yaml`.*\| ([\d.]+) GiB \| ([\d.]+) GiB \|$", SCALING.read_text(), re.M
    )
    assert len(rows) == 6
    for sft, name, peak, headroom in rows:
        report = generator.dry_run_report("train_sft" if sft else "train_grpo", name)
        assert f": {peak} GiB needed, {headroom} GiB headroom" in report, (name, report.splitlines()[-1])


def test_check_mode_fails_on_a_stale_file(generator, tmp_path, monkeypatch, capsys):
    reference, scaling = tmp_path / "config-reference.md", tmp_path / "scaling.md"
    reference.write_text(generator.render_config_reference())
    scaling.write_text(SCALING.read_text().replace("fits in 79.6 GiB", "fits in 80 GiB", 1))
    monkeypatch.setattr(generator, "CONFIG_REFERENCE", reference)
    monkeypatch.setattr(generator, "SCALING", scaling)
    monkeypatch.setattr(generator, "REPO", tmp_path)
    assert generator.main(["--check"]) == 1
    assert "scaling.md is stale" in capsys.readouterr().err
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0
    assert scaling.read_text() == SCALING.read_text()
