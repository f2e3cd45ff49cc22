"""A Hugging Face tokenizer behind the project's small `Tokenizer` interface (encode, decode, pad/eos ids).

Production runs (data.task=jsonl) tokenize with the SFT checkpoint's own tokenizer and chat template. It is
loaded from a local directory only: nothing here reaches a model hub (download the checkpoint first).
transformers is imported lazily: it is part of the `dev` extra and of the NGC container, not of the base
install.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class HFTokenizer:
    """Wraps `transformers.AutoTokenizer` loaded from `directory` (a local path, not a hub id).

    `pad_id` falls back to the EOS id when the tokenizer has no pad token (Llama/Mistral); rows are
    right-padded and masked, so the pad id never enters a loss.

    Raises:
        FileNotFoundError: `directory` does not exist.
        ImportError: transformers is not installed.
        ValueError: the tokenizer has no EOS token.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {path} does not exist; point data.tokenizer at a downloaded HF "
                "checkpoint directory (tokenizer.json / tokenizer_config.json)"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError("HF tokenizers need transformers: pip install -e '.[dev]'") from err
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if self._tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {path} has no EOS token; completions could never stop")
        self.eos_id: int = self._tokenizer.eos_token_id
        pad = self._tokenizer.pad_token_id
        self.pad_id: int = self.eos_id if pad is None else pad
        self.bos_id: int | None = self._tokenizer.bos_token_id
        self.vocab_size: int = len(self._tokenizer)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; BOS is prepended when asked for and the text does not start with it."""
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer's files (tokenizer.json, tokenizer_config.json, chat template) to `directory`,
        as transformers' `save_pretrained` does, so that the directory loads back with this class."""
        self._tokenizer.save_pretrained(str(directory))

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        """The underlying tokenizer's chat template (used by `eval.benchmarks.format_prompt`)."""
        return self._tokenizer.apply_chat_template(messages, **kwargs)
