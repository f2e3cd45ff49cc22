"""Attention for megatron's local layer spec (the CPU path): torch SDPA, and a KV cache of rotated keys.

Why: on CPU, megatron-core 0.16.1's local attention is where a GRPO step loses its time (profiled in
benchmarks/README.md, "GRPO step vs TRL"):

- ``DotProductAttention`` materialises grouped-query attention by ``repeat_interleave`` of keys and values
  (at every decode step, of the whole cached prefix), then runs ``baddbmm``, a separate masked softmax and
  ``bmm``. :class:`SDPACoreAttention` computes the same function with one
  ``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)`` call: no K/V copies, a fused
  kernel in training and in generation.
- ``SelfAttention`` with megatron's static inference context caches keys *before* RoPE and rotates the whole
  cached prefix again at every decode step. :class:`RotatedKeyCacheSelfAttention` rotates each key once, at
  its own position, before it enters the cache, and rotates only the query afterwards. Rotation is linear and
  position-wise, so the attention scores are those of the unmodified path up to float rounding.

Both are drop-in subclasses, selected by :func:`local_attention_modules` for the local spec only: Transformer
Engine brings its own fused attention (and applies RoPE in its kernels), and neither class is exercised there.
Masks follow megatron's convention (bool, True = masked out); a query row whose keys are all masked (the left
padding of a ragged prefill) yields zeros, where megatron's softmax yields a uniform average of the row's
values: both are finite, and only padding positions have such rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["RotatedKeyCacheSelfAttention", "SDPACoreAttention", "local_attention_modules"]


class SDPACoreAttention(DotProductAttention):
    """Megatron's ``DotProductAttention`` (same constructor, parameters and shapes) computed by torch SDPA.

    Supports what the project's models use: causal self-attention, optional explicit bool masks
    (``[b or 1, 1, sq, sk]``, True = masked: packed rows, padded prefill), single-token decode steps over a
    cache, grouped-query attention, no dropout, vanilla softmax. :func:`local_attention_modules` falls back to
    megatron's class for anything else.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` -> context ``[sq, b, np * hn]``.

        Without a mask, ``sq > 1`` is causal self-attention (``sq == sk``) and ``sq == 1`` attends to every
        cached key, as megatron's softmax does. Masks are bool ``[b or 1, 1, sq, sk]``, True = masked.
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError(
                "SDPACoreAttention takes neither attention_bias nor packed_seq_params (THD); use the "
                "Transformer Engine layer spec for THD packing"
            )
        sq, sk = query.shape[0], key.shape[0]
        if sq == 1:
            return self._one_query(query, key, value, attention_mask)
        causal = attention_mask is None
        if causal and sq != sk:
            raise ValueError(f"a causal mask needs as many queries as keys, got sq={sq}, sk={sk}")
        context = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3),  # [b, np, sq, hn]
            key.permute(1, 2, 0, 3),  # [b, ng, sk, hn]
            value.permute(1, 2, 0, 3),
            attn_mask=None if attention_mask is None else ~attention_mask,  # SDPA: True = attend
            is_causal=causal,
            scale=self.softmax_scale * self._query_key_layer_scaling_coeff,
            enable_gqa=self.num_query_groups_per_partition != self.num_attention_heads_per_partition,
        )  # [b, np, sq, hn]
        return context.permute(2, 0, 1, 3).reshape(sq, context.shape[0], self.hidden_size_per_partition)

    def _one_query(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """A decode step, ``query [1, b, np, hn]`` over ``sk`` cached keys, in two batched matmuls: SDPA's
        CPU kernels are slowest for a single query (up to 2x at 8-38 keys, 128 rows). Head ``h`` reads group
        ``h // (np / ng)``, as megatron's ``repeat_interleave`` does. A decode query always sees its own
        key, so no row of the mask hides every key."""
        batch, groups = query.shape[1], self.num_query_groups_per_partition
        grouped_query = query.reshape(batch, groups, -1, query.shape[-1])  # [b, ng, np/ng, hn]
        scores = torch.matmul(grouped_query, key.permute(1, 2, 3, 0))  # [b, ng, np/ng, sk]
        scores = scores * (self.softmax_scale * self._query_key_layer_scaling_coeff)
        if attention_mask is not None:  # [b or 1, 1, 1, sk]
            scores = scores.masked_fill(attention_mask.view(-1, 1, 1, key.shape[0]), float("-inf"))
        context = torch.matmul(scores.softmax(dim=-1), value.permute(1, 2, 0, 3))  # [b, ng, np/ng, hn]
        return context.reshape(1, batch, self.hidden_size_per_partition)

    @property
    def _query_key_layer_scaling_coeff(self) -> float:
        # megatron divides softmax_scale by the layer number and multiplies the scores back in its softmax
        return float(self.layer_number) if self.config.apply_query_key_layer_scaling else 1.0


class RotatedKeyCacheSelfAttention(SelfAttention):
    """Megatron's ``SelfAttention`` whose static KV cache holds keys already rotated by RoPE.

    Megatron's static-batching path stores raw keys and returns the rotary table of the whole prefix, so the
    layer re-rotates every cached key at every step. Here the new keys are rotated at their positions
    (``sequence_len_offset ...``) before megatron stores them, and the key table is dropped from what the
    layer applies afterwards; the query is rotated as before. Training (no inference context), flash decoding
    and dynamic batching (which already caches rotated keys) take megatron's path unchanged.
    """

    def _adjust_key_value_for_inference(
        self,
        inference_context: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rotary_pos_emb: tuple[torch.Tensor, torch.Tensor] | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple:
        rotate_here = (
            inference_context is not None
            and rotary_pos_emb is not None
            and inference_context.is_static_batching()
            and not self.config.flash_decode
        )
        if rotate_here:
            start = inference_context.sequence_len_offset
            key_table = rotary_pos_emb[1][start : start + key.shape[0]]  # [s, 1, 1, rot_dim]
            key = apply_rotary_pos_emb(key, key_table, config=self.config, cp_group=self.pg_collection.cp)
        query, key, value, rotary_pos_emb, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
        )
        if rotate_here:
            rotary_pos_emb = (rotary_pos_emb[0], None)  # the cached keys are rotated already
        return query, key, value, rotary_pos_emb, mask_type, block_table


def local_attention_modules(config: TransformerConfig) -> tuple[type, type]:
    """``(self-attention module, core attention)`` for megatron's local spec under ``config``.

    SDPA needs what it implements: no attention dropout (megatron draws it from its tensor-parallel RNG
    tracker), vanilla softmax and no sliding window. Otherwise megatron's ``DotProductAttention`` runs. The
    rotated-key cache applies whenever RoPE does (it is RoPE's, not the core attention's).
    """
    sdpa_fits = (
        config.attention_dropout == 0.0 and config.softmax_type == "vanilla" and config.window_size is None
    )
    return RotatedKeyCacheSelfAttention, SDPACoreAttention if sdpa_fits else DotProductAttention
