"""Late or inconsistent config errors: every one exits 2 from the training scripts, named by key, before the
process group or the model exists (`parallel_context` is booby-trapped here), and creates no run directory.
The scripts run in-process (`main(argv)` returns the exit code), Hydra's command line included."""

from __future__ import annotations

import json

import pytest

from nemo_quagmire.megatron import parallel
from tests.faults.conftest import load_script, tree


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run got as far as the process group: the error was found too late")

    monkeypatch.setattr(parallel, "parallel_context", refuse)


def _train(script: str, run_dir, *overrides: str) -> int:
    return load_script(script).main([f"run_dir={run_dir}", "logging.progress_bar=false", *overrides])


def _garbage_checkpoint(tmp_path):
    step = tmp_path / "ckpt" / "step_00000010"
    step.mkdir(parents=True)
    (step / "checkpoint_meta.json").write_text("{not json")
    return step


CASES = {
    "unknown advantage estimator": (
        ["grpo.advantage_estimator=ppo_magic"],
        ["grpo.advantage_estimator", "ppo_magic", "known: dr_grpo, grpo, rloo"],
    ),
    "TP=3 outside a dry run": (
        ["parallel.tensor_model_parallel_size=3"],
        ["parallel.tensor_model_parallel_size=3 does not divide num_attention_heads=4", "valid: 1, 2"],
    ),
    "missing load_from": (
        ["checkpoint.load_from={tmp}/nope"],
        ["checkpoint.load_from=", "no such directory"],
    ),
    "load_from is a file": (
        ["checkpoint.load_from={tmp}/random.bin"],
        ["checkpoint.load_from=", "no such dir"],
    ),
    "load_from is a random directory": (
        ["checkpoint.load_from={tmp}"],
        ["neither a checkpoint", "nor an HF"],
    ),
    "load_from with a garbage HF config": (
        ["checkpoint.load_from={tmp}/hf"],
        ["config.json is not a readable JSON file"],
    ),
    "load_from with garbage metadata": (
        ["checkpoint.load_from={tmp}/ckpt/step_00000010"],
        ["checkpoint_meta.json is unreadable"],
    ),
    "missing benchmarks_dir": (
        ["validation.benchmarks=[synthetic,aime24]", "validation.benchmarks_dir={tmp}/nope"],
        ["validation.benchmarks lists ['aime24']"],  # the char tokenizer cannot encode it: config time
    ),
    "SFT warm-up with a jsonl task": (
        [
            "data.task=jsonl",
            "data.train_file={tmp}/random.bin",
            "data.tokenizer={tmp}",
            "validation.benchmarks=[]",
            "validation.heldout_loss=false",
        ],
        ["sft_warmup applies to the synthetic task only"],
    ),
    "unknown key (Hydra)": (["grpo.bogus=1"], ["Could not override 'grpo.bogus'"]),
    "unknown appended key (pydantic)": (["+grpo.bogus=1"], ["grpo.bogus", "unknown key"]),
    "renamed key (Hydra)": (
        ["sft_warmup.lr=1e-3"],
        ["Could not override 'sft_warmup.lr'", "sft_warmup.lr was renamed: use sft_warmup.optim.lr"],
    ),
    "renamed key (pydantic)": (
        ["+grpo.max_consecutive_nonfinite=2"],
        ["grpo.max_consecutive_nonfinite: unknown key", "renamed: use optim.max_consecutive_nonfinite"],
    ),
    "override grammar error (Hydra)": (["max_steps=["], ["no viable alternative"]),
    "run_dir is a file": (["run_dir={tmp}/random.bin"], ["run_dir", "is a file, not a directory"]),
    "prompts per step over an explicit DP size": (
        ["parallel.data_parallel_size=2", "grpo.prompts_per_step=3"],
        ["grpo.prompts_per_step=3 is not divisible by the data-parallel size 2", "use a multiple of 2"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_grpo_config_errors_exit_2_early_and_write_nothing(tmp_path, capsys, case):
    overrides, messages = CASES[case]
    (tmp_path / "random.bin").write_bytes(b"\x00\x01garbage")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{garbage")
    _garbage_checkpoint(tmp_path)
    before = tree(tmp_path)
    code = _train("train_grpo", tmp_path / "run", *(o.format(tmp=tmp_path) for o in overrides))
    err = capsys.readouterr().err
    assert code == 2, err
    assert all(message in err for message in messages), err
    assert "Traceback" not in err
    assert tree(tmp_path) == before  # no run dir, no Hydra output, no log file


def test_missing_benchmarks_dir_with_an_hf_task_is_found_before_the_model(tmp_path, capsys):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"id": "1", "problem": "1+1", "answer": "2", "solution": "", "source": "t"}))
    code = _train(
        "train_grpo",
        tmp_path / "run",
        "data.task=jsonl",
        f"data.train_file={train}",
        f"data.tokenizer={tokenizer}",
        "sft_warmup.steps=0",
        "validation.benchmarks=[aime24]",
        f"validation.benchmarks_dir={tmp_path}/nope",
        "validation.heldout_loss=false",
    )
    err = capsys.readouterr().err
    assert code == 2 and f"validation.benchmarks_dir='{tmp_path}/nope'" in err and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_yaml_syntax_error_exits_2(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("defaults:\n  - tiny\nmax_steps: [1, 2\n")
    code = load_script("train_grpo").main([f"--config-dir={tmp_path}", "--config-name=broken"])
    err = capsys.readouterr().err
    assert code == 2 and "broken" in err and "Traceback" not in err


def test_sft_config_errors_exit_2(tmp_path, capsys):
    code = _train("train_sft", tmp_path / "run", "optim.lr=-1")
    err = capsys.readouterr().err
    assert code == 2 and "optim.lr" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["train_grpo", "train_sft"])
def test_a_light_install_is_told_to_install_the_train_extra(script, tmp_path, monkeypatch, capsys):
    """On the light base (no megatron-core, no Hydra) a training script names the extra to install, exit 2,
    before Hydra is imported or anything is written."""
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def light_install(name, *args, **kwargs):
        return None if name.split(".")[0] in {"megatron", "hydra"} else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", light_install)
    assert _train(script, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "needs the [train] install (hydra, megatron.core missing here)" in err
    assert 'pip install -c constraints.txt -e ".[train]"' in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        (
            "train_grpo",
            "grpo.prompts_per_step=3",
            "grpo.prompts_per_step=3 is not divisible by the data-parallel",
        ),
        (
            "train_sft",
            "sft.global_batch_size=63",
            "sft.global_batch_size=63 is not divisible by the data-parallel",
        ),
    ],
)
def test_a_batch_the_launched_data_parallel_ranks_cannot_share_exits_2_at_preflight(
    tmp_path, capsys, monkeypatch, script, override, message
):
    """Two launched processes leave DP = 2 (data_parallel_size unset): preflight finds the odd batch before
    the process group, where the trainers used to find it (GRPO: at the first step, after the warm-up)."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 would set it
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    code = _train(script, tmp_path / "run", override)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "use a multiple of 2" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
