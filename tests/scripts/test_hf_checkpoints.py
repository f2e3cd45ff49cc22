"""A real HF chat model as first-class input, end to end through the scripts (tests/hf_models.py makes it):

- `train_grpo.py` (and an SFT run from the config `train_sft.py` composes) with `checkpoint.load_from=<HF
  dir>` and no `+model.*` overrides; each run dir then holds the tokenizer (with its chat template) and the
  HF config;
- `evaluate.py --checkpoint <run checkpoint>` without `--tokenizer`;
- `export_hf.py`: the export of an imported HF checkpoint is the original bit for bit, and a trained
  checkpoint exports (`megatron.hf.export_hf`, as the script) to a directory transformers loads with the
  log-probs of our model;
- bad input to the training scripts (an unsupported architecture, a TP that does not divide the heads) exits 2
  before any process group starts.

Subprocess launches cost ~10 s of imports each, so independent ones run side by side and in-process work
(the SFT run, the reference log-probs) overlaps them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.hf_models import RMS_NORM_EPS_FLOAT32

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
TOY_MATH = SCRIPTS / "examples" / "benchmarks"

_spec = importlib.util.spec_from_file_location("evaluate", SCRIPTS / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
sys.modules["evaluate"] = evaluate  # its dataclasses look their module up
_spec.loader.exec_module(evaluate)

pytestmark = pytest.mark.slow

# Small budgets: 2 steps of 2 prompts x 2 completions of <= 8 tokens; the runs validate on held-out loss only
# (evaluate.py below samples and grades).
VALIDATION = [
    "validation.benchmarks=[]",
    "validation.interval=2",
    "checkpoint.interval=2",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]
GRPO_RUN = [
    "max_steps=2",
    "sft_warmup.steps=0",  # tiny.yaml warms up on the synthetic task; this run starts from the HF model
    "data.task=jsonl",
    f"data.train_file={TOY_MATH / 'toy_math.jsonl'}",
    "grpo.prompts_per_step=2",
    "grpo.group_size=2",
    "rollout.max_new_tokens=8",
    "rollout.max_prompt_tokens=256",
]
SFT_RUN = [
    "sft.max_steps=2",
    "sft.global_batch_size=2",
    "sft.micro_batch_size=2",
    "sft.seq_length=128",
    "data.task=jsonl",
    "data.prompt_template=chat",
]
HELDOUT = [
    {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5, so the answer is \\boxed{5}."},
    {"prompt": "What is 10 + 7?", "response": "10 + 7 = 17, so the answer is \\boxed{17}."},
]


def _launch(script: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen, expected_code: int = 0) -> tuple[str, str]:
    out, err = process.communicate(timeout=600)
    assert process.returncode == expected_code, err[-4000:]
    return out, err


def _import_as_checkpoint(hf_dir: Path, run_dir: Path) -> Path:
    """import(x): what a run does with checkpoint.load_from=hf_dir (MegatronPolicy.load_weights, its model
    dir), saved as a step-0 checkpoint without any training in between."""
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.checkpoint import save_checkpoint
    from nemo_quagmire.megatron.policy import MegatronPolicy
    from nemo_quagmire.trainer.checkpoint_source import (
        load_tokenizer,
        read_checkpoint_source,
        write_model_dir,
    )

    model_cfg = read_checkpoint_source(hf_dir).model
    policy = MegatronPolicy(model_cfg, ParallelConfig(), seed=None)  # weights loaded next
    policy.load_weights(hf_dir)
    write_model_dir(run_dir, model_cfg, load_tokenizer(hf_dir), hf_dir)
    return save_checkpoint(run_dir / "checkpoints", 0, policy.chunks, model_cfg=model_cfg)


def _load(checkpoint: Path) -> list[torch.nn.Module]:
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.checkpoint import load_checkpoint
    from nemo_quagmire.megatron.model import build_model
    from nemo_quagmire.trainer.checkpoint_source import read_checkpoint_source

    model_cfg = read_checkpoint_source(checkpoint).model
    model = build_model(model_cfg, ParallelConfig())
    load_checkpoint(checkpoint, model, model_cfg=model_cfg, restore_rng=False)
    return model


def _our_logprobs(model: list[torch.nn.Module], tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    from nemo_quagmire.megatron.logprobs import compute_logprobs

    return compute_logprobs(model, tokens, lengths, micro_batch_size=4).logprobs


def _transformers_logprobs(hf_dir: Path, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Aligned per-token log-probs (0 at position 0 and padding), as nemo_quagmire.megatron.logprobs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits.float(), dim=-1)  # [B, T, V]
    picked = logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [B, T-1]
    aligned = torch.cat([torch.zeros(len(tokens), 1), picked], dim=1)
    return aligned.masked_fill(torch.arange(tokens.shape[1]) >= lengths[:, None], 0.0)


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_hf_checkpoints_train_evaluate_and_export_through_the_scripts(
    tiny_chat_model, tmp_path, megatron_world1
):
    from transformers import AutoTokenizer

    from nemo_quagmire.megatron.hf import export_hf
    from nemo_quagmire.trainer.build import build_sft_trainer
    from nemo_quagmire.trainer.entry import compose_sft_config

    hf_dir = tiny_chat_model
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in HELDOUT))
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in HELDOUT * 2))
    unsupported = tmp_path / "gpt2"
    shutil.copytree(hf_dir, unsupported)
    config = json.loads((hf_dir / "config.json").read_text())
    (unsupported / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    grpo_dir, sft_dir = tmp_path / "grpo", tmp_path / "sft"
    common = [f"checkpoint.load_from={hf_dir}", f"validation.heldout_file={heldout}", *VALIDATION]
    sft_run = [*common, *SFT_RUN, f"data.train_file={sft_data}"]
    launches = {
        # No +model.* overrides; the user's 1e-05 is accepted against the stored 9.999999747378752e-06.
        "grpo": _launch(
            "train_grpo.py", [*common, *GRPO_RUN, f"run_dir={grpo_dir}", "+model.norm_epsilon=1e-5"]
        ),
        "unsupported": _launch(
            "train_grpo.py", [f"checkpoint.load_from={unsupported}", *GRPO_RUN, f"run_dir={tmp_path / 'x'}"]
        ),
        "tp3": _launch(
            "train_sft.py", [*sft_run, f"run_dir={tmp_path / 'y'}", "parallel.tensor_model_parallel_size=3"]
        ),
    }
    # Meanwhile in this process: import(x) as a step-0 checkpoint, exported by the script; and the SFT run,
    # from the config train_sft.py composes (the same resolution of checkpoint.load_from).
    imported, export_imported = _import_as_checkpoint(hf_dir, tmp_path / "imported"), tmp_path / "export-0"
    launches["export-0"] = _launch(
        "export_hf.py", ["--checkpoint", str(imported), "--out", str(export_imported)]
    )
    build_sft_trainer(compose_sft_config("tiny", [*sft_run, f"run_dir={sft_dir}"])).fit()

    # Bad input: exit 2 with the problem named, before any process group started.
    _, err = _finish(launches["unsupported"], 2)
    assert "architectures=['GPT2LMHeadModel']" in err
    assert "LlamaForCausalLM" in err and "Qwen3ForCausalLM" in err
    _, err = _finish(launches["tp3"], 2)
    assert "parallel.tensor_model_parallel_size=3 does not divide num_attention_heads=4" in err
    assert "valid: 1, 2" in err
    assert "Traceback" not in err and "parallel state" not in err

    _finish(launches["grpo"])
    grpo_checkpoint = grpo_dir / "checkpoints" / "step_00000002"
    sft_checkpoint = sft_dir / "checkpoints" / "step_00000002"
    eval_out = tmp_path / "eval"
    evaluation = _launch(
        "evaluate.py",
        ["--checkpoint", str(grpo_checkpoint), "--benchmarks", "toy_math", "--benchmarks-dir", str(TOY_MATH)]
        + ["--n", "2", "--max-new-tokens", "8", "--heldout", str(heldout), "--heldout-template", "chat"]
        + ["--grader-workers", "1", "--out", str(eval_out)],
    )

    # Both run dirs hold what evaluation needs: the model config and the source's tokenizer and template.
    source_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    template = dict(tokenize=False, add_generation_prompt=True)
    expected_prompt = source_tokenizer.apply_chat_template(messages, **template)
    for checkpoint in (grpo_checkpoint, sft_checkpoint):
        model_cfg, step = evaluate.model_config_of(checkpoint)
        assert step == 2 and model_cfg.num_layers == 2 and model_cfg.norm_epsilon == RMS_NORM_EPS_FLOAT32
        args = evaluate.parse_args(["--checkpoint", str(checkpoint), "--out", "unused"])
        tokenizer = evaluate.load_tokenizer(args, checkpoint)
        assert tokenizer.apply_chat_template(messages, **template) == expected_prompt

    # export(import(x)) == x: every tensor bit for bit, the same config.json, the tokenizer and template.
    _finish(launches["export-0"])
    original, exported = _tensors(hf_dir), _tensors(export_imported)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[name], original[name]) for name in original)
    assert json.loads((export_imported / "config.json").read_text()) == config
    generation = json.loads((export_imported / "generation_config.json").read_text())
    assert (generation["temperature"], generation["top_p"]) == (0.6, 0.95)
    exported_tokenizer = AutoTokenizer.from_pretrained(export_imported)
    assert exported_tokenizer.apply_chat_template(messages, **template) == expected_prompt

    # A trained checkpoint, exported as export_hf.py does, loads in transformers with our model's log-probs.
    from nemo_quagmire.trainer.checkpoint_source import read_checkpoint_source

    export_sft = tmp_path / "export-sft"
    model = _load(sft_checkpoint)
    export_hf(model, export_sft, read_checkpoint_source(sft_checkpoint).model, sft_dir / "model")
    encoded = [
        exported_tokenizer.encode(text, add_special_tokens=False) for text in (expected_prompt + "5", "7")
    ]
    lengths = torch.tensor([len(ids) for ids in encoded])
    tokens = torch.zeros(len(encoded), int(lengths.max()), dtype=torch.long)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)] = torch.tensor(ids)
    ours = _our_logprobs(model, tokens, lengths)
    theirs = _transformers_logprobs(export_sft, tokens, lengths)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert not torch.equal(
        _tensors(export_sft)["model.norm.weight"], original["model.norm.weight"]
    )  # trained

    _finish(evaluation)
    metrics = json.loads((eval_out / "metrics.json").read_text())
    assert metrics["step"] == 2 and "val/toy_math/pass@2" in metrics["metrics"]
    assert metrics["metrics"]["val/heldout_loss/num_sequences"] == 2
