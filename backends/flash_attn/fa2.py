"""FlashAttention 2 (`flash_attn`, PyPI ``flash-attn``): capability and adapter.

Not verified on hardware: FA2 publishes no wheel on the public index (it
builds from source against one torch), so its tests run only where
``flash_attn.flash_attn_interface`` imports. The adapter follows
``flash_attn_varlen_func`` in ``flash_attn/flash_attn_interface.py`` and the
checks of ``mha_varlen_fwd`` in ``csrc/flash_attn/flash_api.cpp``
(Dao-AILab/flash-attention, 2.6 and later):

- dtypes: fp16 / bf16 only, output in q's dtype; Ampere (8.0) or newer.
- head sizes: at most 256 ("head dimension at most 256"); multiples of 8,
  because the Python layer pads any other head size, which would copy the
  whole KV cache on every call.
- pages: ``block_table`` needs "Paged KV cache block size must be divisible by
  256".
- features: causal (bottom-right aligned since 2.1: "the causal mask is aligned
  to the bottom right corner"), sliding window, softcap (2.6), ALiBi. Its bias
  is ``-alibi_slope * |i + seqlen_k - seqlen_q - j|``, which equals our
  ``slope * (j - pos)`` only where j <= pos, i.e. under a causal mask, so
  ALiBi without causal masking is refused. No sinks.

Mapping: ``flash_attn_varlen_func(q, key_cache, value_cache, cu_seqlens_q,
cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table=block_table, ...)``.
With a block table FA2 takes the KV lengths as ``cu_seqlens_k`` (there is no
``seqused_k`` in the public function), built on the device from ``seq_lens``
(a cumulative sum: two small kernels, no copy of the cache, no host read).
``max_seqlen_q = q.shape[0]`` and ``max_seqlen_k = max_blocks_per_seq *
block_size`` are upper bounds known from shapes; FA2 sizes its grid by them
and skips the query blocks past each sequence's length. There is no ``out``
argument: the result is copied into ``out`` when one is given.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from backends.flash_attn.common import output_in_query_dtype, sixteen_bit_kv_only, window_size_left
from dispatch.capabilities import Capability, DeviceInfo
from dispatch.config import AttentionConfig, KVQuantMode

__all__ = ["CAPABILITY", "forward"]

MODULE = "flash_attn.flash_attn_interface"
DISTRIBUTIONS = ("flash-attn",)
MINIMUM_VERSION = (2, 6)  # softcap and block_table in flash_attn_varlen_func


def _alibi_needs_causal(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """ALiBi only with causal=True (FA2's bias is -slope * |pos - j|)."""
    if config.use_alibi and not config.causal:
        return ["use_alibi=True with causal=False: FlashAttention 2's bias is -slope * |pos - j|, which differs "
                "from slope * (j - pos) for keys after the query"]
    return []


CAPABILITY = Capability(
    description="FlashAttention 2 (flash_attn)",
    q_dtypes=frozenset({"float16", "bfloat16"}),
    kv_cache_dtypes=frozenset({"float16", "bfloat16"}),
    out_dtypes=frozenset({"float16", "bfloat16"}),
    kv_quant_modes=frozenset({KVQuantMode.NONE}),
    devices=frozenset({"cuda"}),
    max_head_size=256,
    head_size_multiple=8,
    block_size_multiple=256,
    features=frozenset({"causal", "non_causal", "sliding_window", "softcap", "alibi"}),
    min_compute_capability=(8, 0),
    required_modules=(MODULE,),
    cuda_graph_safe=True,
    extra_rules=(output_in_query_dtype, sixteen_bit_kv_only, _alibi_needs_causal),
)


def forward(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    config: AttentionConfig,
    q_scale: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    v_scale_cache: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    output_scale: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Paged, variable-length attention on FlashAttention 2; arguments already validated by the dispatcher.

    q              [num_tokens, num_heads, head_size], fp16 / bf16
    key_cache      [num_blocks, block_size, num_kv_heads, head_size], q's dtype
    value_cache    same as key_cache
    cu_seqlens_q   int32 [num_seqs + 1], query start offsets
    seq_lens       int32 [num_seqs], KV length of each sequence (context + new tokens)
    block_table    int32 [num_seqs, max_blocks_per_seq], page ids
    alibi_slopes   fp32 [num_heads] when config.use_alibi
    out            optional [num_tokens, num_heads, head_size] in q's dtype

    Returns [num_tokens, num_heads, head_size] in q's dtype (`out` when given).
    """
    from flash_attn.flash_attn_interface import flash_attn_varlen_func

    cu_seqlens_k = F.pad(torch.cumsum(seq_lens, 0, dtype=torch.int32), (1, 0))
    left = window_size_left(config)
    result = flash_attn_varlen_func(
        q, key_cache, value_cache,
        cu_seqlens_q, cu_seqlens_k,
        q.shape[0],  # max_seqlen_q: an upper bound from the shape
        block_table.shape[1] * config.block_size,  # max_seqlen_k: likewise
        softmax_scale=config.scale,
        causal=config.causal,
        window_size=(-1 if left is None else left, -1),  # -1: unlimited
        softcap=config.logits_soft_cap or 0.0,  # 0.0: off
        alibi_slopes=alibi_slopes,
        block_table=block_table,
    )
    if out is None:
        return result
    return out.copy_(result)
