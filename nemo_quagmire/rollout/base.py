"""The contract between the GRPO loop and whatever generates its completions.

Why a small interface: the in-process engine (the policy itself, KV-cached, the CPU default) and vLLM
(colocated or separate, with weights pushed after every update) must be interchangeable, and callbacks such as
the Pass@k evaluator generate through the same call without knowing the trainer's internals.

Token layout: prompts are given as token-id lists (no padding); a `RolloutBatch` returns, per completion, the
prompt ids followed by the generated ids in one right-padded `[N, T]` tensor, so the trainer computes
log-probs of exactly the sequences that were sampled (alignment as in `nemo_quagmire.megatron.logprobs`:
`logprobs[n, t] = log p(tokens[n, t] | tokens[n, :t])`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class SamplingParams(BaseModel):
    """How to sample completions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=1.0, ge=0.0, description="0 = greedy; GRPO samples at 1.0.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1.0 = off.")
    max_new_tokens: PositiveInt = Field(default=64, description="Completion budget; longer ones are cut.")
    stop_token_ids: tuple[int, ...] = Field(
        default=(), description="Tokens that end a completion (the tokenizer's EOS is always one)."
    )
    seed: int | None = Field(default=None, description="Seed for this call; None = the engine's stream.")


@dataclass(frozen=True)
class RolloutBatch:
    """Completions of a batch of prompts, one row per completion.

    Attributes:
        tokens: Long[N, T], prompt ids then completion ids, right-padded with the pad id.
        prompt_lengths: Long[N], number of prompt tokens of each row.
        lengths: Long[N], prompt + completion tokens of each row (completion includes its stop token).
        logprobs: Float32[N, T], the engine's log-probs of the sampled completion tokens (same alignment as
            `tokens`; 0 at prompt and padding positions). Used for importance-sampling correction when the
            engine's numerics differ from the trainer's (FP8 / vLLM kernels).
        truncated: Bool[N], True where the completion hit `max_new_tokens` without a stop token.
        prompt_index: Long[N], the index of each row's prompt in the request (rows of one prompt are
            contiguous: `group_size` rows per prompt).
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor
    prompt_index: torch.Tensor

    @property
    def completion_mask(self) -> torch.Tensor:
        """Bool[N, T]: True at completion-token positions."""
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)  # [T]
        return (positions >= self.prompt_lengths[:, None]) & (positions < self.lengths[:, None])

    def completion_ids(self) -> list[list[int]]:
        """Each row's completion token ids (without prompt and padding)."""
        return [
            row[start:end].tolist()
            for row, start, end in zip(self.tokens, self.prompt_lengths, self.lengths, strict=True)
        ]


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates completions from the current policy."""

    def generate(
        self, prompts: Sequence[Sequence[int]], group_size: int, sampling: SamplingParams
    ) -> RolloutBatch:
        """`group_size` completions of every prompt, rows grouped by prompt (prompt i -> rows
        `i*group_size ... (i+1)*group_size - 1`)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the policy's new weights (HF names and layout, as `nemo_quagmire.megatron.hf.iter_hf_weights`
        yields them). The in-process engine shares the policy's parameters and ignores this."""

    @property
    def shares_policy_weights(self) -> bool:
        """True if the engine generates with the trainer's own parameters (no weight sync needed)."""

    def close(self) -> None:
        """Release processes and memory."""
