"""Scripted policies for the callback tests: what they generate and the log-probs they assign are fixed
functions of the input, so every expected metric can be derived by brute force in the test.

- `scripted_completions(prompt, n)`: for a synthetic-task prompt "a+b=" / "a-b=", the first c samples box the
  right answer, then wrong and unanswered samples alternate, with c = (a + b) mod (n + 1).
- `bigram_logprobs(tokens, lengths)`: log-probs of a fixed random bigram table (logits depend on the
  previous token only), the aligned layout of `PolicyHandle.logprobs`.
- `run_ranks(size, fn)`: threads standing in for data-parallel ranks, with working collectives.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nemo_quagmire.data.tokenizer import CharTokenizer
from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams
from nemo_quagmire.trainer.callbacks import PolicyHandle

TOKENIZER = CharTokenizer()
_TABLE = torch.randn(TOKENIZER.vocab_size, TOKENIZER.vocab_size, generator=torch.Generator().manual_seed(7))
BIGRAM = torch.log_softmax(_TABLE.double(), dim=-1).float()  # [V, V]: row = previous token


def solve(prompt: str) -> tuple[int, int]:
    """(the answer, how many of n samples are correct -> needs n) for "a+b=" / "a-b="."""
    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
    return (int(a) + int(b) if op == "+" else int(a) - int(b)), int(a) + int(b)


def scripted_completions(prompt: str, n: int) -> list[str]:
    answer, seed = solve(prompt)
    correct = seed % (n + 1)
    wrong = [f"\n\\boxed{{{answer + 1}}}", f"\n{answer}"]  # a wrong answer, then no answer (no box)
    return [f"\n\\boxed{{{answer}}}" if j < correct else wrong[(j - correct) % 2] for j in range(n)]


def scripted_generate(
    prompts: Sequence[Sequence[int]], group_size: int, sampling: SamplingParams
) -> RolloutBatch:
    rows, prompt_lengths = [], []
    for prompt in prompts:
        text = TOKENIZER.decode(prompt)
        for completion in scripted_completions(text, group_size):
            ids = TOKENIZER.encode(completion, add_bos=False, add_eos=True)[: sampling.max_new_tokens]
            rows.append(list(prompt) + ids)
            prompt_lengths.append(len(prompt))
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.full((len(rows), int(lengths.max())), TOKENIZER.pad_id)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return RolloutBatch(
        tokens=tokens,
        prompt_lengths=torch.tensor(prompt_lengths),
        lengths=lengths,
        logprobs=torch.zeros(tokens.shape),
        truncated=torch.zeros(len(rows), dtype=torch.bool),
        prompt_index=torch.arange(len(prompts)).repeat_interleave(group_size),
    )


def bigram_logprobs(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[b, t] = log p(tokens[b, t] | tokens[b, t-1]) under `BIGRAM`; 0 at t = 0 and at padding."""
    scores = BIGRAM[tokens[:, :-1], tokens[:, 1:]]  # [B, T-1]
    out = torch.cat([torch.zeros(len(tokens), 1), scores], dim=1)
    return out.masked_fill(torch.arange(tokens.shape[1]) >= lengths[:, None], 0.0)


def handle(
    run_dir: Path | str = ".",
    *,
    step: int = 0,
    rank: int = 0,
    size: int = 1,
    all_reduce_sum=lambda t: t.clone(),
    all_gather_objects=lambda obj: [obj],
    generate=scripted_generate,
) -> PolicyHandle:
    return PolicyHandle(
        step=step,
        run_dir=Path(run_dir),
        tokenizer=TOKENIZER,
        logprobs=bigram_logprobs,
        generate=generate,
        all_reduce_sum=all_reduce_sum,
        all_gather_objects=all_gather_objects,
        data_parallel_rank=rank,
        data_parallel_size=size,
    )


class ThreadGroup:
    """Collectives for `size` threads standing in for data-parallel ranks (sum and gather by exchange)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=30)
        self._slots: list[object] = [None] * size

    def _exchange(self, rank: int, value: object) -> list[object]:
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()  # nobody writes the next exchange before everybody has read this one
        return values

    def all_reduce_sum(self, rank: int):
        return lambda tensor: sum(self._exchange(rank, tensor.clone()))

    def all_gather_objects(self, rank: int):
        return lambda obj: self._exchange(rank, obj)


def run_ranks(size: int, fn) -> list:
    """`fn(rank, group)` on `size` threads; their results in rank order (an exception in any is re-raised)."""
    group = ThreadGroup(size)
    with ThreadPoolExecutor(size) as pool:
        futures = [pool.submit(fn, rank, group) for rank in range(size)]
        return [future.result() for future in futures]
