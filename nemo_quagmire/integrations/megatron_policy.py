"""The callbacks' policy functions over megatron-core model chunks built by another framework.

NeMo 2 (`llm.GPTModel.module`) and Megatron-Bridge (its training loop's `model` list) both hold megatron-core
`GPTModel` chunks. Log-probs and generation on such chunks are what the project's own engine does for its
trainers, so this module only adapts: `compute_logprobs` (megatron's forward-only schedule, vocab-parallel
log-probs, any TP/PP) and `MegatronRolloutEngine` (KV-cached sampling; PP = 1) from `nemo_quagmire.megatron`.

The one thing those frameworks add is a **padded vocabulary**: NeMo and Megatron-Bridge round the embedding
and output layers up to a multiple of `make_vocab_size_divisible_by` x TP (128 by default), so a 32,000-id
tokenizer gets 32,000 + padding logits. The padding rows are trained (toward never being predicted) but they
are not tokens: sampling one would hand the tokenizer an id it cannot decode. Generation therefore sees only
the tokenizer's `vocab_size` logits (the distribution renormalised over real tokens). Log-probs of given
sequences are left over the full padded softmax, which is the distribution the framework's own training loss
uses, so the held-out loss stays comparable with the run's validation loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams
from nemo_quagmire.trainer.callbacks import PolicyHandle, Tokenizer
from nemo_quagmire.utils.distributed import all_gather_objects, all_reduce_sum, group_rank_and_size

__all__ = ["MegatronChunksPolicy", "model_config_of", "policy_handle"]


def policy_handle(
    *,
    step: int,
    run_dir: str | Path,
    tokenizer: Tokenizer,
    logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generate: Callable[..., RolloutBatch],
    group: Any = None,
) -> PolicyHandle:
    """A `PolicyHandle` whose reductions run over `group` (None: the whole world, as under DDP; no process
    group at all: one rank), through `utils.distributed` as our own trainers' handles do."""
    rank, size = group_rank_and_size(group)
    return PolicyHandle(
        step=step,
        run_dir=Path(run_dir),
        tokenizer=tokenizer,
        logprobs=logprobs,
        generate=generate,
        all_reduce_sum=functools.partial(all_reduce_sum, group=group),
        all_gather_objects=functools.partial(all_gather_objects, group=group),
        data_parallel_rank=rank,
        data_parallel_size=size,
    )


class _TokenizerVocabulary(torch.nn.Module):
    """A model chunk whose logits stop at the tokenizer's vocabulary (`[..., :vocab_size]`)."""

    def __init__(self, chunk: torch.nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.chunk = chunk
        self.vocab_size = vocab_size

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.chunk(*args, **kwargs)[..., : self.vocab_size]


def model_config_of(chunk: torch.nn.Module, *, vocab_size: int, max_position_embeddings: int | None = None):
    """The project's `ModelConfig` describing a megatron chunk's shapes, with the tokenizer's vocabulary.

    `MegatronRolloutEngine` checks prompts and budgets against it (ids below `vocab_size`, prompt + budget
    within the context); the shapes come from the chunk's megatron `TransformerConfig`.
    """
    from megatron.core.utils import get_model_config

    from nemo_quagmire.config.model import ModelConfig

    config = get_model_config(chunk)
    context = max_position_embeddings or _max_positions(chunk)
    return ModelConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels,
        vocab_size=vocab_size,
        max_position_embeddings=context,
    )


def _max_positions(chunk: torch.nn.Module) -> int:
    """The chunk's context length: megatron's `GPTModel.max_sequence_length`, found through any wrapper."""
    module: Any = chunk
    while module is not None:
        if isinstance(getattr(module, "max_sequence_length", None), int):
            return module.max_sequence_length
        module = getattr(module, "module", None)
    raise ValueError(
        f"cannot find the context length of {type(chunk).__name__} (no max_sequence_length on it or its "
        "wrapped .module); pass max_position_embeddings"
    )


class MegatronChunksPolicy:
    """Log-probs and generation on this rank's megatron chunks, as `PolicyHandle` functions.

    Args:
        chunks: this rank's model chunks (megatron `GPTModel`, optionally wrapped by DDP / Float16Module /
            a Lightning module whose forward is `(tokens, position_ids, attention_mask)`).
        vocab_size: the tokenizer's vocabulary (generation samples ids below it only).
        pad_id, eos_id: the tokenizer's padding and end-of-sequence ids.
        micro_batch_size: sequences per forward pass of `logprobs`.
        max_batch_size: rows per generation pass (KV-cache rows).
        max_position_embeddings: the context length, if the chunks do not carry it.

    Raises:
        ValueError: an id outside the vocabulary, or a vocabulary larger than the model's logits.
    """

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        *,
        vocab_size: int,
        pad_id: int,
        eos_id: int,
        micro_batch_size: int = 8,
        max_batch_size: int = 256,
        max_position_embeddings: int | None = None,
    ) -> None:
        from megatron.core.utils import get_model_config

        padded = _padded_vocab_size(chunks[0])
        if padded is not None and vocab_size > padded:
            raise ValueError(
                f"the tokenizer has {vocab_size} ids but the model only {padded} output logits; the "
                "checkpoint was trained with another tokenizer"
            )
        self.chunks = list(chunks)
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.micro_batch_size = micro_batch_size
        self.max_batch_size = max_batch_size
        self.max_position_embeddings = max_position_embeddings
        self.transformer_config = get_model_config(self.chunks[0])

    def logprobs(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`[b, t] = log p(tokens[b, t] | tokens[b, :t])`, Float[B, T] (0 at t = 0 and padding), over the
        model's full (padded) softmax. Collective over the tensor/pipeline-parallel group."""
        from nemo_quagmire.megatron.logprobs import compute_logprobs

        device = next(self.chunks[0].parameters()).device
        out = compute_logprobs(
            self.chunks, tokens.to(device), lengths.to(device), micro_batch_size=self.micro_batch_size
        )
        return out.logprobs

    def generate(
        self, prompts: Sequence[Sequence[int]], group_size: int, sampling: SamplingParams
    ) -> RolloutBatch:
        """`group_size` completions of each prompt, sampled among the tokenizer's ids only (PP = 1)."""
        from nemo_quagmire.megatron.rollout_engine import MegatronRolloutEngine

        if len(self.chunks) != 1:
            raise NotImplementedError(
                f"generation runs on one model chunk (pipeline_model_parallel_size=1, no virtual pipeline); "
                f"this rank holds {len(self.chunks)}"
            )
        engine = MegatronRolloutEngine(
            [_TokenizerVocabulary(self.chunks[0], self.vocab_size)],
            model_config_of(
                self.chunks[0],
                vocab_size=self.vocab_size,
                max_position_embeddings=self.max_position_embeddings,
            ),
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            max_batch_size=self.max_batch_size,
        )
        return engine.generate(prompts, group_size, sampling)

    @staticmethod
    def data_parallel_group() -> Any:
        """Megatron's data-parallel group (ranks holding different data)."""
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()


def _padded_vocab_size(chunk: torch.nn.Module) -> int | None:
    """The output logits of a megatron `GPTModel` (its padded vocabulary), found through wrappers."""
    module: Any = chunk
    while module is not None:
        if isinstance(getattr(module, "vocab_size", None), int):
            return module.vocab_size
        module = getattr(module, "module", None)
    return None
