"""Supervised steps on prompt/response pairs: the loss covers response tokens only.

Used by the GRPO run's SFT warm-up (the embedded default starts from a random tiny model) and by the SFT
trainer. The loss is the token-mean negative log-likelihood over response tokens with the step's *global*
token count as the normalizer, so micro-batches and data-parallel ranks sum to the whole batch's loss (the
contract of `nemo_quagmire.megatron.train_step`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from nemo_quagmire.algorithms.losses import aggregate_loss
from nemo_quagmire.trainer.callbacks import Tokenizer


def encode_examples(
    examples: Sequence[Mapping[str, str]], tokenizer: Tokenizer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize `{"prompt", "response"}` pairs: BOS + prompt + response + EOS, right-padded.

    Returns:
        tokens Long[B, T], lengths Long[B], loss_mask Bool[B, T] (True at response and EOS tokens).
    """
    rows, prompt_lengths = [], []
    for example in examples:
        prompt = tokenizer.encode(example["prompt"], add_bos=True, add_eos=False)
        response = tokenizer.encode(example["response"], add_bos=False, add_eos=True)
        rows.append(prompt + response)
        prompt_lengths.append(len(prompt))
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.full((len(rows), int(lengths.max())), tokenizer.pad_id, dtype=torch.long)  # [B, T]
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    positions = torch.arange(tokens.shape[1])  # [T]
    loss_mask = (positions >= torch.tensor(prompt_lengths)[:, None]) & (positions < lengths[:, None])
    return tokens, lengths, loss_mask


def nll_loss(
    logprobs: torch.Tensor, micro_batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean NLL of the masked tokens, normalized by `micro_batch["global_num_tokens"]`.

    Args:
        logprobs: Float[b, T] aligned log-probs of `micro_batch["tokens"]`.
        micro_batch: `loss_mask` Bool[b, T] and `global_num_tokens` (0-dim) besides the tokens.
    """
    mask = micro_batch["loss_mask"]
    loss = aggregate_loss(
        -logprobs,
        mask,
        "token-mean",
        global_num_tokens=micro_batch["global_num_tokens"],
        global_num_seqs=None,
        token_sum_normalizer=None,
    )
    return loss, {"num_tokens": mask.sum()}


def sft_micro_batches(
    tokens: torch.Tensor, loss_mask: torch.Tensor, micro_batch_size: int, global_num_tokens: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    """Split a padded batch into equal-shape micro-batches carrying the global normalizer (the last one is
    padded with fully masked rows)."""
    batch = tokens.shape[0]
    pad_rows = -batch % micro_batch_size
    if pad_rows:
        tokens = torch.cat([tokens, tokens[:1].expand(pad_rows, -1)])
        loss_mask = torch.cat([loss_mask, torch.zeros_like(loss_mask[:1]).expand(pad_rows, -1)])
    return [
        {"tokens": t, "loss_mask": m, "global_num_tokens": global_num_tokens}
        for t, m in zip(tokens.split(micro_batch_size), loss_mask.split(micro_batch_size), strict=True)
    ]
