"""The character tokenizer: id layout, round trips on all generated text, strict unknown characters,
padding against hand-built tensors, SFT masks, and save/load."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_quagmire.data.synthetic import SyntheticTaskConfig, generate_problems
from nemo_quagmire.data.tokenizer import SPECIAL_TOKENS, TASK_ALPHABET, CharTokenizer

TOKENIZER = CharTokenizer()
HARDEST = SyntheticTaskConfig(min_digits=1, max_digits=9, operations=("add", "sub", "mul"))


def _generated_texts() -> list[str]:
    problems = generate_problems(HARDEST, "sft", 500, seed=0)
    return [p.prompt for p in problems] + [p.response for p in problems]


def test_id_layout():
    # 3 special tokens + 24 characters = 27 ids, padded to an even 28 with one unused id.
    assert len(TASK_ALPHABET) == 24
    assert (TOKENIZER.pad_id, TOKENIZER.bos_id, TOKENIZER.eos_id) == (0, 1, 2)
    assert TOKENIZER.vocab_size == 28 and TOKENIZER.vocab_size % 2 == 0
    assert TOKENIZER.encode(TASK_ALPHABET, add_bos=False) == list(range(3, 27))


def test_the_alphabet_is_exactly_the_tasks_characters():
    assert set("".join(_generated_texts())) == set(TASK_ALPHABET)


def test_round_trip_on_all_generated_text():
    for text in _generated_texts():
        ids = TOKENIZER.encode(text, add_bos=True, add_eos=True)
        assert len(ids) == len(text) + 2 and ids[0] == TOKENIZER.bos_id and ids[-1] == TOKENIZER.eos_id
        assert TOKENIZER.decode(ids) == text
        assert TOKENIZER.decode(torch.tensor(ids)) == text


def test_bos_and_eos_flags():
    assert TOKENIZER.encode("1+1=", add_bos=False) == TOKENIZER.encode("1+1=")[1:]
    assert TOKENIZER.encode("", add_bos=False, add_eos=True) == [TOKENIZER.eos_id]
    assert TOKENIZER.encode_prompt("12+3=") == TOKENIZER.encode("12+3=", add_bos=True, add_eos=False)


def test_unknown_characters_raise_naming_them():
    with pytest.raises(ValueError, match=r"character '\.' at index 3 of '1\+2\.5=' is not in the tokenizer"):
        TOKENIZER.encode("1+2.5=")
    with pytest.raises(ValueError, match=r"character '\\t'"):
        TOKENIZER.encode("\t")


def test_decode_special_and_unused_ids():
    ids = [TOKENIZER.bos_id, *TOKENIZER.encode("7", add_bos=False), 27, TOKENIZER.eos_id, TOKENIZER.pad_id]
    assert TOKENIZER.decode(ids) == "7"
    assert TOKENIZER.decode(ids, skip_special=False) == "<bos>7<unused27><eos><pad>"
    with pytest.raises(ValueError, match=r"token id 28 is outside the vocabulary \[0, 28\)"):
        TOKENIZER.decode([5, 28])
    with pytest.raises(ValueError, match="token id -1"):
        TOKENIZER.decode([-1])
    with pytest.raises(ValueError, match=r"\(1-D\), got a tensor of shape \(1, 2\)"):
        TOKENIZER.decode(torch.tensor([[5, 6]]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_encode_pads_like_hand_built_tensors(side):
    texts = ["1+1=", "123+45=", "9="]
    batch = TOKENIZER.batch_encode(texts, padding_side=side, add_eos=True)
    rows = [TOKENIZER.encode(t, add_eos=True) for t in texts]
    width = max(map(len, rows))  # 123+45= with BOS and EOS: 9
    assert width == 9
    pad = TOKENIZER.pad_id
    expected = [
        ([pad] * (width - len(r)) + r) if side == "left" else (r + [pad] * (width - len(r))) for r in rows
    ]
    mask = [
        ([0] * (width - len(r)) + [1] * len(r)) if side == "left" else ([1] * len(r) + [0] * (width - len(r)))
        for r in rows
    ]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    assert batch.input_ids.tolist() == expected
    assert batch.attention_mask.tolist() == mask
    for row, text in zip(batch.input_ids, texts, strict=True):
        assert TOKENIZER.decode(row) == text


def test_batch_encode_rejects_bad_arguments():
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        TOKENIZER.batch_encode(["1="], padding_side="middle")
    with pytest.raises(ValueError, match="at least one text"):
        TOKENIZER.batch_encode([], padding_side="left")


def test_encode_example_masks_the_response_and_eos():
    prompt, response = "12+3=", "\n2+3+0=5 5\n1+0+0=1 15\n\\boxed{15}"
    ids, mask = TOKENIZER.encode_example(prompt, response)
    assert ids == TOKENIZER.encode(prompt + response, add_eos=True)
    assert mask == [0] * (1 + len(prompt)) + [1] * (len(response) + 1)
    assert ids[: 1 + len(prompt)] == TOKENIZER.encode_prompt(prompt)  # generation starts where SFT did
    assert TOKENIZER.decode([i for i, m in zip(ids, mask, strict=True) if m]) == response


def test_custom_alphabets():
    odd = CharTokenizer("ab")  # 3 + 2 = 5 ids -> padded to 6
    assert odd.vocab_size == 6 and odd.decode([5], skip_special=False) == "<unused5>"
    even = CharTokenizer("abc")  # 3 + 3 = 6 ids, no padding
    assert even.vocab_size == 6 and even.decode([5]) == "c"
    assert CharTokenizer("".join(chr(32 + i) for i in range(95))).vocab_size == 98  # printable ASCII
    with pytest.raises(ValueError, match=r"repeats \['a'\]"):
        CharTokenizer("aba")
    with pytest.raises(ValueError, match="alphabet is empty"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="needs 130 ids, over 128"):
        CharTokenizer("".join(chr(256 + i) for i in range(126)))


def test_save_and_load(tmp_path):
    path = TOKENIZER.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    state = json.loads(path.read_text())
    assert state["alphabet"] == TASK_ALPHABET and state["vocab_size"] == 28
    assert state["special_tokens"] == list(SPECIAL_TOKENS)
    loaded = CharTokenizer.load(tmp_path)
    assert loaded == TOKENIZER and loaded.encode("\\boxed{12}") == TOKENIZER.encode("\\boxed{12}")
    custom = CharTokenizer("xyz\n")
    custom.save(tmp_path / "custom")
    assert CharTokenizer.load(tmp_path / "custom").alphabet == "xyz\n"
    assert CharTokenizer.load(tmp_path / "custom") != TOKENIZER


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "hf"}, "not a nemo_quagmire.char_tokenizer file of version 1"),
        ({"version": 2}, "not a nemo_quagmire.char_tokenizer file of version 1"),
        ({"alphabet": ["a"]}, "'alphabet' must be a string"),
        ({"vocab_size": 100}, "differ from this version's"),
        ({"special_tokens": ["<pad>", "<eos>", "<bos>"]}, "differ from this version's"),
    ],
)
def test_load_rejects_a_foreign_or_changed_file(tmp_path, change, message):
    path = TOKENIZER.save(tmp_path)
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(ValueError, match=message):
        CharTokenizer.load(tmp_path)


def test_load_errors_for_missing_or_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        CharTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        CharTokenizer.load(tmp_path)
