"""A real byte-level BPE tokenizer with a chat template, trained here on the synthetic task's text and saved
as a Hugging Face directory (no hub on this machine). Its vocabulary (VOCAB_SIZE ids) is deliberately not a
multiple of 128, so NeMo and Megatron-Bridge pad the model's vocabulary past it, as they do for real
tokenizers."""

from __future__ import annotations

from pathlib import Path

from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_splits

VOCAB_SIZE = 300  # 256 bytes + 3 special tokens + 41 merges; NeMo pads it to 384
SPECIAL = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(directory: Path) -> Path:
    """Train the tokenizer on synthetic prompts and responses; save tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    splits = generate_splits(SyntheticTaskConfig(), seed=11, num_sft=2000, num_rl=0, num_heldout=0)
    text = [r["prompt"] + r["response"] for r in splits.sft_records()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
    assert len(wrapped) == VOCAB_SIZE, len(wrapped)
    wrapped.save_pretrained(directory)
    return directory
