"""Held-out loss as a training callback: the policy's negative log-likelihood of held-out reasoning examples.

Why: the paper finds the SFT model's cross-entropy on held-out reasoning examples (a held-out split of the SFT
data) predicts its post-RL score far better than its SFT benchmark score, when runs share a data
distribution. It is logged at every validation of SFT and GRPO runs, and `scripts/evaluate.py` computes it
for any checkpoint.

What is reported, over response tokens only (the prompt is context; EOS counts, as in SFT):

- `val/heldout_loss/token_mean`: total NLL / total response tokens (long examples weigh more);
- `val/heldout_loss/seq_mean`: the mean over examples of each example's mean token NLL (every example
  weighs the same). The paper does not say which it uses, so both are logged.

Both are exact over data-parallel ranks: each rank sums NLL and counts over its share, the four sums are
all-reduced once and divided once (averaging per-rank means would weigh ranks, not tokens). Sums are float64.

Bad input fails at construction, before any forward pass: a line that is not a JSON object, a missing or
non-string `prompt` / `response`, or an empty response is named as `file:line`; an example longer than the
model's context is named too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from nemo_quagmire.data.batching import EncodedExample, encode_example
from nemo_quagmire.eval.benchmarks import PromptTemplate
from nemo_quagmire.trainer.callbacks import Callback, PolicyHandle, Tokenizer
from nemo_quagmire.utils.errors import InputError
from nemo_quagmire.utils.json_lines import iter_json_lines

__all__ = ["HeldOutDataError", "HeldOutLossCallback", "heldout_nll_sums", "read_heldout_examples"]

PREFIX = "val/heldout_loss"


class HeldOutDataError(InputError):
    """A held-out example is invalid (the message names `file:line` or the example's index)."""


def read_heldout_examples(path: str | os.PathLike) -> list[dict[str, str]]:
    """The `{"prompt", "response"}` examples of a JSONL file (other keys are ignored), checked line by line.

    Raises:
        HeldOutDataError: a line is not a JSON object, lacks `prompt` or `response`, has a non-string one, or
            has an empty response; or the file has no examples.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"held-out file {path} does not exist (validation.heldout_file)")
    examples = [_checked(record, where) for where, record in iter_json_lines(path, HeldOutDataError)]
    if not examples:
        raise HeldOutDataError(f"{path}: no examples in the file")
    return examples


def _checked(record: object, where: str) -> dict[str, str]:
    if not isinstance(record, Mapping):
        raise HeldOutDataError(f"{where}: expected a JSON object with 'prompt' and 'response'")
    if missing := [key for key in ("prompt", "response") if key not in record]:
        raise HeldOutDataError(f"{where}: missing field(s) {missing}; each example needs prompt and response")
    if bad := [key for key in ("prompt", "response") if not isinstance(record[key], str)]:
        raise HeldOutDataError(f"{where}: field(s) {bad} must be strings")
    if not record["response"].strip():
        raise HeldOutDataError(f"{where}: empty response; the loss is over response tokens, drop the example")
    return {"prompt": record["prompt"], "response": record["response"]}


def heldout_nll_sums(
    logprobs: torch.Tensor, prompt_lengths: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Sums behind both held-out losses for one batch.

    Args:
        logprobs: Float[B, T] aligned log-probs (`[b, t] = log p(token t | tokens < t)`).
        prompt_lengths: Long[B], prompt tokens of each row (the loss starts after them).
        lengths: Long[B], real tokens of each row.

    Returns:
        Float64[4]: (sum of token NLL, response tokens, sum over rows of each row's mean token NLL, rows).
    """
    positions = torch.arange(logprobs.shape[1], device=logprobs.device)  # [T]
    mask = (positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])  # [B, T]
    nll = -(logprobs.double() * mask)  # [B, T]
    per_row_tokens = mask.sum(dim=1)  # [B]
    per_row_nll = nll.sum(dim=1)  # [B]
    return torch.stack(
        [
            per_row_nll.sum(),
            per_row_tokens.sum().double(),
            (per_row_nll / per_row_tokens).sum(),
            torch.tensor(float(len(lengths)), dtype=torch.float64),
        ]
    )


class HeldOutLossCallback(Callback):
    """Logs `val/heldout_loss/token_mean` and `val/heldout_loss/seq_mean` (plus the token and example counts)
    at every validation.

    Args:
        examples: a JSONL file of `{"prompt", "response"}` objects, or the examples themselves.
        tokenizer: the policy's tokenizer.
        micro_batch_size: examples per `PolicyHandle.logprobs` call.
        prompt_template: "plain" (BOS + prompt text) or "chat" (one user turn of the chat template), as the
            run's training data are tokenized.
        max_length: the model's context (`max_position_embeddings`); longer examples are an error.

    Raises:
        HeldOutDataError: an invalid example (see `read_heldout_examples`), or one longer than `max_length`.
    """

    def __init__(
        self,
        examples: str | os.PathLike | Sequence[Mapping[str, str]],
        tokenizer: Tokenizer,
        *,
        micro_batch_size: int = 32,
        prompt_template: PromptTemplate = "plain",
        max_length: int | None = None,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if isinstance(examples, str | os.PathLike):
            source = str(examples)
            records = read_heldout_examples(examples)
            where = [f"{source}:{i}" for i in range(1, len(records) + 1)]
        else:
            if not examples:
                raise HeldOutDataError("no held-out examples given")
            where = [f"held-out example {i}" for i in range(len(examples))]
            records = [_checked(record, at) for record, at in zip(examples, where, strict=True)]
        self.examples: list[EncodedExample] = []
        for record, at in zip(records, where, strict=True):
            encoded = encode_example(record, tokenizer, prompt_template)
            if max_length is not None and len(encoded) > max_length:
                raise HeldOutDataError(
                    f"{at}: {len(encoded)} tokens exceed the model's context of {max_length}; shorten or "
                    "drop the example"
                )
            if encoded.prompt_length < 1:
                raise HeldOutDataError(f"{at}: the prompt has no tokens; nothing predicts the response")
            self.examples.append(encoded)
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size

    def on_validation(self, handle: PolicyHandle) -> dict[str, float]:
        start = time.perf_counter()
        mine = self.examples[handle.data_parallel_rank :: handle.data_parallel_size]
        mine = sorted(mine, key=len)  # batches of similar lengths: little padding
        sums = torch.zeros(4, dtype=torch.float64)
        for first in range(0, len(mine), self.micro_batch_size):
            batch = mine[first : first + self.micro_batch_size]
            lengths = torch.tensor([len(e) for e in batch])
            tokens = torch.full((len(batch), int(lengths.max())), self.tokenizer.pad_id, dtype=torch.long)
            for row, example in enumerate(batch):
                tokens[row, : len(example)] = torch.tensor(example.ids)
            logprobs = handle.logprobs(tokens, lengths).cpu()  # [b, T]
            prompt_lengths = torch.tensor([e.prompt_length for e in batch])
            sums += heldout_nll_sums(logprobs, prompt_lengths, lengths)
        nll, tokens_total, row_means, rows = handle.all_reduce_sum(sums).tolist()
        return {
            f"{PREFIX}/token_mean": nll / tokens_total,
            f"{PREFIX}/seq_mean": row_means / rows,
            f"{PREFIX}/num_tokens": tokens_total,
            f"{PREFIX}/num_sequences": rows,
            "timing/val_heldout_loss": time.perf_counter() - start,
        }
