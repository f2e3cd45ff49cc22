"""A stand-in for VLLMRolloutEngine that the vLLM server can host (``engine_class=FAKE_ENGINE``), so the
process boundary and the multi-rank plumbing are tested in the base venv, where vLLM is not installed.

Its completions are a pure function of (prompt seed, weights), so a test can predict them: the first token
encodes a checksum of the weights the engine holds (:func:`weights_token`), the others come from
``random.Random(seed)``. It reads weights the way vLLM does: safetensors files of an HF directory.
"""

from __future__ import annotations

import os
import random
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams

FAKE_ENGINE = "tests.rollout.fake_engine:FakeEngine"
FIRST_FREE_ID = 3  # completions avoid the ids below (pad / BOS / EOS of the tests' models)
WORLD_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")


def weights_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """CRC-32 over names and fp32 bytes, in name order."""
    checksum = 0
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        checksum = zlib.crc32(name.encode(), checksum)
        checksum = zlib.crc32(tensor.detach().float().contiguous().numpy().tobytes(), checksum)
    return checksum


def weights_token(checksum: int, vocab_size: int) -> int:
    return FIRST_FREE_ID + checksum % (vocab_size - FIRST_FREE_ID)


def expected_completion(seed: int, checksum: int, vocab_size: int, length: int) -> list[int]:
    """The completion the fake engine samples for a prompt with this seed."""
    rng = random.Random(seed)
    rest = [rng.randrange(FIRST_FREE_ID, vocab_size) for _ in range(length - 1)]
    return [weights_token(checksum, vocab_size), *rest]


class FakeEngine:
    """Completions of ``max_new_tokens`` tokens (never a stop token; all marked truncated), log-prob -1 each.

    Args:
        hf_dir: HF directory with config.json and safetensors weights.
        startup_delay: seconds to sleep before being ready (start-up timeout tests).
        fail_on_start: raise ValueError with this message instead of starting.
        exit_on_generate: kill the process (exit code 3) at the first generate, after a last word on stderr.
        **engine_kwargs: VLLMRolloutEngine's arguments (kept in ``self.engine_kwargs``, unused).
    """

    def __init__(
        self,
        hf_dir: str,
        *,
        startup_delay: float = 0.0,
        fail_on_start: str | None = None,
        exit_on_generate: bool = False,
        **engine_kwargs,
    ) -> None:
        world = ", ".join(f"{name}={os.environ.get(name)}" for name in WORLD_VARIABLES)
        print(f"fake engine pid {os.getpid()}: {world}", file=sys.stderr, flush=True)
        time.sleep(startup_delay)
        if fail_on_start is not None:
            raise ValueError(fail_on_start)
        self.exit_on_generate = exit_on_generate
        self.engine_kwargs = engine_kwargs
        self.dtype = torch.float32
        self.eos_token_ids = frozenset({2})
        self.load_checkpoint(hf_dir)

    def load_checkpoint(self, hf_dir: str) -> None:
        from safetensors.torch import load_file

        files = sorted(Path(hf_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors in {hf_dir}")
        tensors = {name: t for path in files for name, t in load_file(path).items()}
        self.vocab_size = tensors["model.embed_tokens.weight"].shape[0]
        self.checksum = weights_checksum(tensors.items())

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        group_size: int,
        sampling: SamplingParams,
        *,
        prompt_seeds: Sequence[int] | None = None,
    ) -> RolloutBatch:
        if self.exit_on_generate:
            print("fake engine: exiting on purpose", file=sys.stderr, flush=True)
            os._exit(3)
        if prompt_seeds is None:
            prompt_seeds = [(sampling.seed or 0) + i for i in range(len(prompts))]
        length = sampling.max_new_tokens
        rows = [
            (
                list(prompt),
                expected_completion(seed * 1000 + member, self.checksum, self.vocab_size, length),
                i,
            )
            for i, (prompt, seed) in enumerate(zip(prompts, prompt_seeds, strict=True))
            for member in range(group_size)
        ]
        width = max(len(prompt) + length for prompt, _, _ in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        logprobs = torch.zeros(len(rows), width)
        for n, (prompt, completion, _) in enumerate(rows):
            tokens[n, : len(prompt) + length] = torch.tensor(prompt + completion)
            logprobs[n, len(prompt) : len(prompt) + length] = -1.0
        return RolloutBatch(
            tokens=tokens,
            prompt_lengths=torch.tensor([len(prompt) for prompt, _, _ in rows]),
            lengths=torch.tensor([len(prompt) + length for prompt, _, _ in rows]),
            logprobs=logprobs,
            truncated=torch.ones(len(rows), dtype=torch.bool),
            prompt_index=torch.tensor([i for _, _, i in rows]),
        )

    def close(self) -> None:
        print(f"fake engine pid {os.getpid()}: closed", file=sys.stderr, flush=True)
