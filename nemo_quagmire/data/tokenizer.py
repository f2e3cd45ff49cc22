"""A character-level tokenizer over a fixed alphabet, for the tiny models of the embedded default.

Why characters: the synthetic task's reasoning is digit by digit, and one token per character lets a
0.75M-parameter model see each digit, with a vocabulary of a few dozen ids instead of a BPE table of 32k.

Ids: 0 PAD, 1 BOS, 2 EOS, then the alphabet's characters in order, then unused ids up to an even vocabulary
(megatron-core shards the embedding across tensor-parallel ranks; the model may pad its table further). The
default alphabet `TASK_ALPHABET` is exactly the characters of the synthetic task (24): vocab_size 28, id 27
unused. There is no UNK: a character outside the alphabet raises, because mapping it to UNK would train the
model on text it can never reproduce (decode(encode(x)) != x). Keeping the alphabet to the task's characters
also means the model cannot write a decimal point or thousands separator, so every answer it can box is graded
the same by `synthetic.verify` and the project's grader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from nemo_quagmire.utils.io import atomic_write

__all__ = ["SPECIAL_TOKENS", "TASK_ALPHABET", "CharTokenizer", "EncodedBatch"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
TASK_ALPHABET = "\n *+-=0123456789\\bdeox{}"
TOKENIZER_FILE = "tokenizer.json"
_FORMAT = "nemo_quagmire.char_tokenizer"
_VERSION = 1


class EncodedBatch(NamedTuple):
    """Padded token ids and the mask of real tokens."""

    input_ids: torch.Tensor  # [B, T] int64, pad_id at padded positions
    attention_mask: torch.Tensor  # [B, T] int64, 1 = real token, 0 = padding


class CharTokenizer:
    """One id per character of `alphabet`, plus PAD/BOS/EOS and unused ids up to an even `vocab_size`.

    Args:
        alphabet: the characters to encode, each once, in id order (default: the synthetic task's).

    Raises:
        ValueError: the alphabet is empty, repeats a character, or would need more than 128 ids.
    """

    def __init__(self, alphabet: str = TASK_ALPHABET):
        if not alphabet:
            raise ValueError("alphabet is empty; pass the characters to encode")
        if repeated := sorted({c for c in alphabet if alphabet.count(c) > 1}):
            raise ValueError(f"alphabet repeats {repeated}; list each character once")
        self.alphabet = alphabet
        self.pad_id, self.bos_id, self.eos_id = range(len(SPECIAL_TOKENS))
        self._char_ids = {char: len(SPECIAL_TOKENS) + i for i, char in enumerate(alphabet)}
        used = len(SPECIAL_TOKENS) + len(alphabet)
        self.vocab_size = used + used % 2
        if self.vocab_size > 128:
            raise ValueError(f"alphabet of {len(alphabet)} characters needs {self.vocab_size} ids, over 128")
        self._tokens = [*SPECIAL_TOKENS, *alphabet] + [f"<unused{i}>" for i in range(used, self.vocab_size)]

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self.alphabet!r}, vocab_size={self.vocab_size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.alphabet == self.alphabet

    def __hash__(self) -> int:
        return hash(self.alphabet)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally between BOS and EOS.

        Raises:
            ValueError: `text` has a character outside the alphabet (named with its position).
        """
        try:
            ids = [self._char_ids[char] for char in text]
        except KeyError:
            index = next(i for i, char in enumerate(text) if char not in self._char_ids)
            raise ValueError(
                f"character {text[index]!r} at index {index} of {text[max(0, index - 20) : index + 20]!r} is "
                f"not in the tokenizer's alphabet {self.alphabet!r}; build a CharTokenizer whose alphabet "
                "includes it"
            ) from None
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of `ids` (a sequence or a 1-D tensor). With `skip_special`, PAD/BOS/EOS and unused ids are
        dropped; otherwise they appear as `<pad>`, `<bos>`, `<eos>`, `<unusedN>`.

        Raises:
            ValueError: an id is outside [0, vocab_size), or `ids` is a tensor that is not 1-D.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (1-D), got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        first_char = len(SPECIAL_TOKENS)
        last_char = first_char + len(self.alphabet)
        pieces = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if not skip_special or first_char <= i < last_char:
                pieces.append(self._tokens[i])
        return "".join(pieces)

    def encode_prompt(self, prompt: str) -> list[int]:
        """The ids a model generates from: BOS + prompt, no template (the prefix `encode_example` trains)."""
        return self.encode(prompt, add_bos=True)

    def encode_example(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """An SFT sequence BOS + prompt + response + EOS and its loss mask (1 on response and EOS tokens).

        Returns:
            (ids, loss_mask), both of length len(prompt) + len(response) + 2.
        """
        prompt_ids = self.encode_prompt(prompt)
        response_ids = self.encode(response, add_bos=False, add_eos=True)
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)

    def batch_encode(
        self,
        texts: Sequence[str],
        *,
        padding_side: Literal["left", "right"],
        add_bos: bool = True,
        add_eos: bool = False,
    ) -> EncodedBatch:
        """Encode `texts` and pad them to the longest with PAD.

        Args:
            texts: B strings (B >= 1).
            padding_side: "left" for generation prompts (all prompts end at the last column), "right" for
                training sequences.
            add_bos, add_eos: as in `encode`.

        Returns:
            `EncodedBatch(input_ids, attention_mask)`, both int64 of shape [B, T], T = the longest encoding.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not texts:
            raise ValueError("batch_encode needs at least one text")
        encoded = [self.encode(text, add_bos=add_bos, add_eos=add_eos) for text in texts]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)  # [B, T]
        for row, ids in enumerate(encoded):
            columns = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, columns] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, columns] = 1
        return EncodedBatch(input_ids, attention_mask)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/tokenizer.json` atomically (so a checkpoint carries its tokenizer); returns it."""
        path = Path(directory) / TOKENIZER_FILE
        state = {
            "format": _FORMAT,
            "version": _VERSION,
            "alphabet": self.alphabet,
            "special_tokens": list(SPECIAL_TOKENS),
            "vocab_size": self.vocab_size,
        }
        with atomic_write(path) as handle:
            json.dump(state, handle, indent=2)
            handle.write("\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CharTokenizer:
        """Read a tokenizer written by `save`.

        Raises:
            FileNotFoundError: no `tokenizer.json` in `directory`.
            ValueError: the file is not a tokenizer of this format and version, or its layout differs.
        """
        path = Path(directory) / TOKENIZER_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
        if not isinstance(state, dict) or state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise ValueError(f"{path}: not a {_FORMAT} file of version {_VERSION}")
        if not isinstance(state.get("alphabet"), str):
            raise ValueError(f"{path}: 'alphabet' must be a string")
        tokenizer = cls(state["alphabet"])
        saved = (state.get("special_tokens"), state.get("vocab_size"))
        if saved != (list(SPECIAL_TOKENS), tokenizer.vocab_size):
            raise ValueError(
                f"{path}: special tokens / vocab_size {saved} differ from this version's "
                f"{(list(SPECIAL_TOKENS), tokenizer.vocab_size)}; the token ids would not match the model"
            )
        return tokenizer
