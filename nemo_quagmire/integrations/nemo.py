"""NeMo 2 (nemo-toolkit 2.7.x): the model hooks the Lightning adapters need, for any `llm.GPTModel`.

`HeldOutLossLightningCallback` and `PassAtKLightningCallback` (nemo_quagmire.integrations.lightning) call
`quagmire_logprobs`, `quagmire_generate` and `quagmire_data_parallel_group` on the LightningModule. NeMo's
`llm.GPTModel` (and its Llama, Mistral, Qwen... subclasses) holds the megatron-core `GPTModel` as
`self.module` (wrapped in megatron's `Float16Module` under bf16/fp16 mixed precision); `QuagmireHooks`
answers the three hooks on that module with `MegatronChunksPolicy` (megatron's forward-only schedule for
log-probs, the project's KV-cached sampler for generation, restricted to the tokenizer's ids because NeMo
pads the vocabulary to a multiple of 128 x TP).

Use it by putting the mixin first in a subclass of the model class you train::

    from nemo.collections import llm
    from nemo_quagmire.integrations.nemo import QuagmireHooks

    class QuagmireLlamaModel(QuagmireHooks, llm.LlamaModel):
        pass

    model = QuagmireLlamaModel(llm.Llama31Config8B(), tokenizer=tokenizer)

or use `QuagmireGPTModel` (the mixin on `llm.GPTModel`). Then pass the adapters in the `nl.Trainer`'s
callbacks (docs/frameworks/nemo2.md). The mixin adds no `__init__` argument, so NeMo's `IOMixin` serialises
and restores the model as it does the parent class.

Supported layouts: log-probs at any tensor/pipeline parallelism (one chunk per rank, no virtual pipeline);
generation at pipeline parallelism 1. Context parallelism is refused by the engine. Versions: nemo-toolkit
2.7.x with megatron-core 0.15.x (the `[nemo]` extra): NeMo 2.7 passes optimizer arguments that megatron-core
0.16 removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nemo_quagmire.integrations.megatron_policy import MegatronChunksPolicy
from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams

try:
    from nemo.collections import llm
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nemo_quagmire.integrations.nemo needs NeMo 2: pip install -c constraints.txt -e '.[nemo]' (see "
        "docs/frameworks/nemo2.md; it cannot share an environment with the [train] extra's megatron-core)"
    ) from err

__all__ = ["QuagmireGPTModel", "QuagmireHooks"]


class QuagmireHooks:
    """Mixin giving a NeMo `llm.GPTModel` (or subclass) the hooks of nemo_quagmire.integrations.lightning.

    Class attributes (override in the subclass to tune):
        quagmire_micro_batch_size: held-out sequences per forward pass.
        quagmire_max_batch_size: completions per generation pass (KV-cache rows).
    """

    quagmire_micro_batch_size: int = 8
    quagmire_max_batch_size: int = 256

    def quagmire_logprobs(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Float[B, T] log-probs of right-padded `tokens` Long[B, T] with `lengths` Long[B]."""
        return self._quagmire_policy().logprobs(tokens, lengths)

    def quagmire_generate(
        self, prompts: Sequence[Sequence[int]], group_size: int, sampling: SamplingParams
    ) -> RolloutBatch:
        """`group_size` completions of each prompt, sampled among the tokenizer's ids."""
        return self._quagmire_policy().generate(prompts, group_size, sampling)

    def quagmire_data_parallel_group(self) -> Any:
        """Megatron's data-parallel group: the ranks that split the evaluation work."""
        return MegatronChunksPolicy.data_parallel_group()

    def _quagmire_policy(self) -> MegatronChunksPolicy:
        tokenizer = getattr(self, "tokenizer", None)
        module = getattr(self, "module", None)
        if tokenizer is None or module is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {'tokenizer' if tokenizer is None else 'configured module'}; "
                "the quagmire hooks run inside a NeMo trainer, after configure_model"
            )
        eos = tokenizer.eos_id
        pad = tokenizer.pad_id
        return MegatronChunksPolicy(
            [module],
            vocab_size=tokenizer.vocab_size,
            pad_id=eos if pad is None or pad < 0 else pad,
            eos_id=eos,
            micro_batch_size=self.quagmire_micro_batch_size,
            max_batch_size=self.quagmire_max_batch_size,
            max_position_embeddings=self.config.seq_length,
        )


class QuagmireGPTModel(QuagmireHooks, llm.GPTModel):
    """NeMo's `llm.GPTModel` with the quagmire hooks (same constructor)."""
