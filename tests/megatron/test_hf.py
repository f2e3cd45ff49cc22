"""HF interop (nemo_quagmire.megatron.hf): config mapping, the pure layout mapping, checkpoint checks, and
end-to-end parity with transformers on tiny random Llama / Mistral / Qwen3 checkpoints made here.

References are independent of the code under test: transformers' own forward pass for log-probs, the original
safetensors for round trips, and for the layouts the way megatron's attention and MLP consume their weights
(``SelfAttention.get_query_key_value_tensors`` splits each TP shard of ``linear_qkv`` as
``[groups, (heads/groups + 2) * head_dim]``; ``MLP`` chunks ``linear_fc1``'s output in two, SiLU on the
first).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemo_quagmire.config.model import ModelConfig, get_model_preset
from nemo_quagmire.megatron import hf
from tests.megatron.hf_worker import SCENARIOS, VARIANTS, load_hf_state, make_hf_checkpoint
from tests.megatron.launch import run_two_process_worker

TOL = 1e-4  # fp32 log-prob agreement with transformers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One random checkpoint per variant; Qwen3 is saved in several files (index + shards)."""
    root = tmp_path_factory.mktemp("hf")
    for variant in VARIANTS:
        shard = "100KB" if variant == "qwen3" else None
        make_hf_checkpoint(variant, root / variant, max_shard_size=shard)
    return root


@pytest.fixture(scope="module")
def reference(checkpoints: Path) -> dict:
    """Right-padded tokens [3, 24] with lengths, and transformers' aligned per-token log-probs per variant
    (position 0 and padding = 0, the convention of nemo_quagmire.megatron.logprobs)."""
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([24, 17, 9])
    out = {"tokens": tokens, "lengths": lengths, "reference": {}}
    for variant in VARIANTS:
        model = AutoModelForCausalLM.from_pretrained(checkpoints / variant, dtype=torch.float32).eval()
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens).logits.float(), dim=-1)  # [3, 24, 128]
        picked = logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)  # log p(x_t | x_<t), t >= 1
        aligned = torch.cat([torch.zeros(3, 1), picked], dim=1)
        out["reference"][variant] = aligned.masked_fill(torch.arange(24) >= lengths[:, None], 0.0)
    return out


def _config(**changes) -> ModelConfig:
    base = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    return ModelConfig(**{**base, **changes})


def _random_hf_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in hf.hf_tensor_shapes(cfg).items()}


# --- config.json -> ModelConfig --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_config_from_hf_matches_transformers_config(checkpoints: Path, variant: str):
    from transformers import AutoConfig

    ref = AutoConfig.from_pretrained(checkpoints / variant)
    cfg = hf.model_config_from_hf(checkpoints / variant)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (4, 64, 96)
    assert (cfg.num_attention_heads, cfg.query_groups, cfg.head_dim) == (4, 2, ref.head_dim)
    assert cfg.vocab_size == ref.vocab_size and cfg.max_position_embeddings == ref.max_position_embeddings
    assert cfg.rotary_base == ref.rope_parameters["rope_theta"] and cfg.norm_epsilon == ref.rms_norm_eps
    assert cfg.tie_word_embeddings == ref.tie_word_embeddings
    assert cfg.qk_layernorm == (variant == "qwen3")
    assert cfg.rope_scaling_factor == ref.rope_parameters.get("factor")
    assert cfg.params_dtype == "fp32"


# The public config.json of each preset's model card (transformers-4 format: rope_theta, torch_dtype).
PUBLIC_CONFIGS = {
    "qwen3_4b": {  # Qwen/Qwen3-4B-Base
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "bos_token_id": 151643,
        "eos_token_id": 151643, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
        "intermediate_size": 9728, "max_position_embeddings": 32768, "max_window_layers": 36,
        "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "llama3_8b": {  # meta-llama/Meta-Llama-3-8B (no head_dim key: 4096 / 32)
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 8192,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
    },
    "mistral_nemo_12b": {  # mistralai/Mistral-Nemo-Instruct-2407
        "architectures": ["MistralForCausalLM"], "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
        "intermediate_size": 14336, "max_position_embeddings": 1024000, "model_type": "mistral",
        "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "vocab_size": 131072,
    },
}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(PUBLIC_CONFIGS))
def test_public_configs_map_to_the_presets(preset: str):
    assert hf.model_config_from_hf(PUBLIC_CONFIGS[preset]) == get_model_preset(preset)


@pytest.mark.parametrize(
    ("base", "change", "named"),
    [
        ("mistral_nemo_12b", {"sliding_window": 4096}, "sliding_window=4096"),
        ("qwen3_4b", {"use_sliding_window": True, "sliding_window": 4096}, "sliding_window=4096"),
        ("qwen3_4b", {"layer_types": ["sliding_attention"] * 36}, "sliding_attention"),
        ("llama3_8b", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        ("llama3_8b", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        (
            "llama3_8b",
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
            "low_freq_factor",
        ),
        ("llama3_8b", {"attention_bias": True}, "attention_bias"),
        ("llama3_8b", {"mlp_bias": True}, "mlp_bias"),
        ("llama3_8b", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("llama3_8b", {"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
        ("llama3_8b", {"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ],
)  # fmt: skip
def test_unsupported_configs_are_rejected_by_name(base: str, change: dict, named: str):
    with pytest.raises(ValueError, match=re.escape(named)):
        hf.model_config_from_hf({**PUBLIC_CONFIGS[base], **change})


def test_incomplete_config_names_the_missing_keys():
    config = {k: v for k, v in PUBLIC_CONFIGS["llama3_8b"].items() if k not in ("vocab_size", "hidden_size")}
    with pytest.raises(ValueError, match=r"lacks \['hidden_size', 'vocab_size'\]"):
        hf.model_config_from_hf(config)


def test_llama31_rope_scaling_is_mapped():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    cfg = hf.model_config_from_hf({**PUBLIC_CONFIGS["llama3_8b"], "rope_scaling": scaling})
    assert cfg.rope_scaling_factor == 8.0


def test_repo_ids_are_not_resolved():
    with pytest.raises(FileNotFoundError, match="no hub access"):
        hf.model_config_from_hf("Qwen/Qwen3-4B")


# --- ModelConfig -> config.json ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generated_config_loads_in_transformers_and_maps_back(
    checkpoints: Path, tmp_path: Path, variant: str
):
    from transformers import AutoConfig

    cfg = hf.model_config_from_hf(checkpoints / variant)
    (tmp_path / "config.json").write_text(json.dumps(hf.hf_config_from_model_config(cfg)))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.architectures == ["Qwen3ForCausalLM" if cfg.qk_layernorm else "LlamaForCausalLM"]
    assert loaded.rope_parameters["rope_theta"] == cfg.rotary_base
    assert hf.model_config_from_hf(tmp_path) == cfg


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_with_template_reproduces_the_template(checkpoints: Path, variant: str):
    original = hf.read_hf_config(checkpoints / variant)
    cfg = hf.model_config_from_hf(original)
    assert hf.hf_config_from_model_config(cfg, checkpoints / variant) == original


def test_template_must_be_able_to_describe_the_model():
    with pytest.raises(ValueError, match="only Qwen3 has QK-norm"):
        hf.hf_config_from_model_config(_config(qk_layernorm=True), PUBLIC_CONFIGS["llama3_8b"])
    windowed = {**PUBLIC_CONFIGS["mistral_nemo_12b"], "sliding_window": 4096}
    with pytest.raises(ValueError, match="sliding_window=4096"):  # a window shorter than the context
        hf.hf_config_from_model_config(_config(max_position_embeddings=8192), windowed)


# --- the pure layout mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize("tp_size", [1, 2])
def test_qkv_shard_splits_into_this_ranks_query_groups(tp_size: int):
    cfg = _config(kv_channels=32)  # 4 heads x 32 != hidden 64, as in Qwen3
    state = _random_hf_state(cfg)
    p = "model.layers.2.self_attn."
    q, k, v = (state[p + f"{x}_proj.weight"].view(2, -1, 64) for x in "qkv")  # [groups, rows of group, H]
    groups_per_rank = 2 // tp_size
    for tp_rank in range(tp_size):
        shard = hf.hf_to_megatron_tensors(state, cfg, tp_rank, tp_size, 0, 1)
        qkv = shard["decoder.layers.2.self_attention.linear_qkv.weight"]
        # megatron's view: [groups on this rank, (2 query heads + k + v) * 32, H], split [64, 32, 32]
        mq, mk, mv = qkv.view(groups_per_rank, 4 * 32, 64).split([64, 32, 32], dim=1)
        mine = slice(tp_rank * groups_per_rank, (tp_rank + 1) * groups_per_rank)
        assert torch.equal(mq, q[mine]) and torch.equal(mk, k[mine]) and torch.equal(mv, v[mine])


@pytest.mark.parametrize("tp_size", [1, 2])
def test_tp_sharded_layer_computes_the_hf_layer(tp_size: int):
    """Megatron's column/row-parallel split: summing every rank's partial output gives HF's output (float64,
    so the different summation order stays far below the tolerance)."""
    cfg = _config()
    state = {name: tensor.double() for name, tensor in _random_hf_state(cfg).items()}
    p, m = "model.layers.1.", "decoder.layers.1."
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gate, up, down = (state[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    hf_mlp = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    attn_out = torch.randn(5, 4 * 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hf_proj = attn_out @ state[p + "self_attn.o_proj.weight"].T
    ours_mlp, ours_proj = torch.zeros_like(hf_mlp), torch.zeros_like(hf_proj)  # [tokens, H]
    for r in range(tp_size):
        shard = hf.hf_to_megatron_tensors(state, cfg, r, tp_size, 0, 1)
        g, u = (x @ shard[m + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)  # megatron's GLU
        ours_mlp += (torch.nn.functional.silu(g) * u) @ shard[m + "mlp.linear_fc2.weight"].T
        heads = attn_out.view(5, 4, 16)[:, r * 4 // tp_size : (r + 1) * 4 // tp_size].reshape(5, -1)
        ours_proj += heads @ shard[m + "self_attention.linear_proj.weight"].T
    torch.testing.assert_close(ours_mlp, hf_mlp)
    torch.testing.assert_close(ours_proj, hf_proj)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    ("tp_size", "pp_size", "groups"), [(1, 1, 2), (2, 1, 2), (1, 2, 2), (2, 2, 2), (4, 2, 4)]
)
def test_export_inverts_import_exactly(tp_size: int, pp_size: int, groups: int, tied: bool):
    cfg = _config(num_query_groups=groups, tie_word_embeddings=tied, qk_layernorm=groups == 2)
    state = _random_hf_state(cfg)
    back: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp_size):
        shards = [hf.hf_to_megatron_tensors(state, cfg, r, tp_size, pp_rank, pp_size) for r in range(tp_size)]
        back.update(hf.megatron_to_hf_tensors(shards, cfg, pp_rank, pp_size))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[name], state[name]) for name in state)


def test_transformer_engine_norm_names_are_accepted():
    """TE's fused spec stores the pre-norms inside linear_qkv / linear_fc1 (layer_norm_weight)."""
    cfg = _config()
    state = _random_hf_state(cfg)
    te_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}  # fmt: skip
    shard = hf.hf_to_megatron_tensors(state, cfg, 0, 1, 0, 1)
    te_shard = {}
    for name, tensor in shard.items():
        local = next((name.replace(k, v) for k, v in te_names.items() if name.endswith(k)), name)
        te_shard[local] = tensor
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te_shard
    back = hf.megatron_to_hf_tensors([te_shard], cfg, 0, 1)
    assert all(torch.equal(back[name], state[name]) for name in state)


def test_pipeline_stages_hold_their_layers_and_ends():
    cfg = _config(tie_word_embeddings=True)
    state = _random_hf_state(cfg)
    first = hf.hf_to_megatron_tensors(state, cfg, 0, 1, 0, 2)
    last = hf.hf_to_megatron_tensors(state, cfg, 0, 1, 1, 2)
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert {n.split(".")[2] for n in last if n.startswith("decoder.layers.")} == {"0", "1"}  # local numbers
    # global layer 2 is the last stage's local layer 0
    name = "decoder.layers.0.input_layernorm.weight"
    assert torch.equal(last[name], state["model.layers.2.input_layernorm.weight"])
    # tied: the last stage's output layer is the embedding (megatron keeps a copy there)
    assert torch.equal(last["output_layer.weight"], state["model.embed_tokens.weight"])
    single = hf.shard_spec(cfg, 0, 1, 0, 1)
    assert single.has_embedding and single.has_final_norm and not single.has_output_layer


# --- checkpoint files -----------------------------------------------------------------------------------


def test_check_rejects_a_config_mismatch_naming_fields(checkpoints: Path):
    wrong = hf.model_config_from_hf(checkpoints / "llama").replace(ffn_hidden_size=128)
    with pytest.raises(
        ValueError, match=r"ffn_hidden_size: checkpoint 96, model 128[\s\S]*model_config_from_hf"
    ):
        hf.check_hf_checkpoint(checkpoints / "llama", wrong)


def test_check_names_tensors_with_wrong_shape_missing_or_unexpected(checkpoints: Path, tmp_path: Path):
    state = load_hf_state(checkpoints / "llama")
    state["model.layers.1.mlp.gate_proj.weight"] = torch.zeros(80, 64)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    del state["model.norm.weight"]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # ignored, as transformers does
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((checkpoints / "llama" / "config.json").read_text())
    with pytest.raises(ValueError) as error:
        hf.check_hf_checkpoint(tmp_path, hf.model_config_from_hf(tmp_path))
    message = str(error.value)
    assert "'model.layers.1.mlp.gate_proj.weight' has shape [80, 64], expected [96, 64]" in message
    assert "missing tensor 'model.norm.weight'" in message
    assert "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'" in message
    assert "inv_freq" not in message


def test_sharded_save_loads_in_transformers(checkpoints: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    state = load_hf_state(checkpoints / "mistral")
    files = hf.save_hf_checkpoint(
        state.items(), tmp_path, hf.read_hf_config(checkpoints / "mistral"), max_shard_bytes=100_000
    )
    # 4 layers x 123 kB + 2 x 32 kB vocab tables = 558 kB of fp32, no tensor above 100 kB: six or more files
    assert len(files) >= 6
    assert all(sum(t.numel() * 4 for t in load_file(f).values()) <= 100_000 for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    ref = AutoModelForCausalLM.from_pretrained(checkpoints / "mistral").eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, ref(tokens).logits)


# --- megatron model, one process (TP = PP = 1) ----------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tp1_logprobs_match_transformers_and_export_roundtrips(
    megatron_world1, checkpoints: Path, reference: dict, tmp_path: Path, variant: str
):
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.logprobs import compute_logprobs
    from nemo_quagmire.megatron.model import build_model

    source = checkpoints / variant
    cfg = hf.model_config_from_hf(source)
    chunks = build_model(cfg, ParallelConfig())
    hf.load_hf_weights(chunks, source, cfg)
    ours = compute_logprobs(chunks, reference["tokens"], reference["lengths"], micro_batch_size=2).logprobs
    assert (ours - reference["reference"][variant]).abs().max().item() < TOL

    original = load_hf_state(source)
    streamed = dict(hf.iter_hf_weights(chunks, cfg))
    assert streamed.keys() == original.keys()
    assert all(torch.equal(streamed[n], original[n]) for n in original)
    hf.export_hf(chunks, tmp_path, cfg, source)
    exported = load_hf_state(tmp_path)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[n], original[n]) for n in original)
    assert hf.read_hf_config(tmp_path) == hf.read_hf_config(source)
    assert (tmp_path / "generation_config.json").is_file()  # copied from the template directory


def test_loading_into_a_model_of_another_shape_names_the_parameter(megatron_world1, checkpoints: Path):
    from nemo_quagmire.config.parallel import ParallelConfig
    from nemo_quagmire.megatron.model import build_model

    cfg = hf.model_config_from_hf(checkpoints / "llama")
    chunks = build_model(cfg.replace(ffn_hidden_size=128), ParallelConfig())
    # fc1 stacks gate and up: [2 * 128, 64] in the model, [2 * 96, 64] from the checkpoint
    with pytest.raises(
        ValueError, match=r"'decoder.layers.0.mlp.linear_fc1.weight' is \[256, 64\].*\[192, 64\]"
    ):
        hf.load_hf_weights(chunks, checkpoints / "llama", cfg)


# --- megatron model, two processes: TP = 2, PP = 2 and DP = 2 in one torchrun launch -------------------


@pytest.fixture(scope="module")
def worker_results(checkpoints: Path, reference: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("hf_worker")
    torch.save(reference, work / "inputs.pt")
    out = work / "results.json"
    args = ["--checkpoints", str(checkpoints), "--inputs", str(work / "inputs.pt"), "--out", str(out)]
    return run_two_process_worker(Path(__file__).with_name("hf_worker.py"), args, out)


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_match_transformers_and_roundtrip(worker_results: dict, scenario: str):
    result = worker_results[scenario]
    assert "error" not in result, result.get("error")
    assert result["max_abs_logprob_diff"] < TOL
    assert result["export_bitwise"] and result["config_equal"]
    assert result["iter_bitwise_every_rank"]
    # the PP=2 exports are written in 64 kB files (sharded checkpoint), the others in one file
    assert (result["export_files"] > 1) == scenario.startswith("pp2")
