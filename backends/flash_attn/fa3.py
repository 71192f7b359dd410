"""FlashAttention 3 (`flash_attn_interface`, built from flash-attention's ``hopper/``): capability and adapter.

Not verified on hardware: FA3 has no wheel on the public index, so its tests
run only where ``flash_attn_interface`` imports. The adapter follows the
documented signature of ``flash_attn_with_kvcache`` in
``hopper/flash_attn_interface.py`` and the checks of ``mha_fwd`` in
``hopper/flash_api.cpp`` (Dao-AILab/flash-attention):

- dtypes: fp16, bf16 and fp8 e4m3 (``q_type == Half || BFloat16 ||
  Float8_e4m3fn``), with k and v in q's dtype ("query and key must have the
  same dtype"); the output is q's dtype, or bf16 for fp8 ("For FP8 input,
  output must have dtype BF16"). fp8 needs Hopper (``dprops->major < 9`` allows
  fp16/bf16 only).
- FP8: our FP8_PER_TENSOR config (fp8 q, e4m3 cache, one fp32 q/k/v scale each)
  maps exactly onto ``q_descale`` / ``k_descale`` / ``v_descale`` of shape
  (batch, num_heads_k) ("(b, h_k), not (b, h)"): the one-element scale is
  expanded (a stride-0 view, no copy). FA3 rounds P to e4m3 before the PV
  product (its fp8 GEMMs take both operands in fp8), so the record sets
  ``fp8_query_p_dtype``.
- head sizes: at most 256 ("head dimension at most"), a multiple of 8, or of 16
  for fp8 ("head_size should be a multiple of" alignment 16 / 8).
- pages: any page size ("page_block_size can be arbitrary"); claimed for
  multiples of 16, as for FA4.
- features: causal, non-causal, sliding window, softcap; no sinks, no ALiBi
  in this interface.

Mapping: ``flash_attn_with_kvcache(q, key_cache, value_cache,
cache_seqlens=seq_lens, page_table=block_table, cu_seqlens_q=cu_seqlens_q,
max_seqlen_q=q.shape[0], ...)``. ``max_seqlen_q`` is required with
``cu_seqlens_q`` ("max_seqlen_q must be provided if cu_seqlens_q is provided");
q.shape[0] bounds every sequence's query length without reading a GPU value.
The causal mask is bottom-right aligned (docstring: "aligned to the bottom
right corner of the attention matrix"). The public function has no ``out``:
the result is copied into ``out`` when one is given.
"""

from __future__ import annotations

from typing import Optional

import torch

from backends.flash_attn.common import (
    compute_capability_text,
    fp8_kv_needs_fp8_query,
    output_in_query_dtype,
    window_size_left,
)
from dispatch.capabilities import Capability, DeviceInfo
from dispatch.config import AttentionConfig, KVQuantMode

__all__ = ["CAPABILITY", "forward"]

MODULE = "flash_attn_interface"
DISTRIBUTIONS = ("flash_attn_3", "flash-attn-3")


def _hopper_only(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """Compute capability 9.x only."""
    cc = device.compute_capability
    if cc is not None and cc[0] > 9:
        return [f"compute capability {compute_capability_text(device)}: FlashAttention 3 runs on 9.x (Hopper) only"]
    return []


def _fp8_layout(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """FP8 query: bfloat16 output and head_size a multiple of 16."""
    reasons = []
    if config.q_is_fp8 and config.out_dtype != "bfloat16":
        reasons.append(f"out_dtype={config.out_dtype} with q_dtype={config.q_dtype}: FlashAttention 3 writes an "
                       "FP8 attention's output in bfloat16 only")
    if config.q_is_fp8 and config.head_size % 16:
        reasons.append(f"head_size={config.head_size} with q_dtype={config.q_dtype}: FlashAttention 3's FP8 path "
                       "needs a multiple of 16")
    return reasons


CAPABILITY = Capability(
    description="FlashAttention 3 (flash_attn_interface)",
    q_dtypes=frozenset({"float16", "bfloat16", "float8_e4m3fn"}),
    kv_cache_dtypes=frozenset({"float16", "bfloat16", "float8_e4m3fn"}),
    out_dtypes=frozenset({"float16", "bfloat16"}),
    kv_quant_modes=frozenset({KVQuantMode.NONE, KVQuantMode.FP8_PER_TENSOR}),
    devices=frozenset({"cuda"}),
    max_head_size=256,
    head_size_multiple=8,
    block_size_multiple=16,
    features=frozenset({"causal", "non_causal", "sliding_window", "softcap"}),
    min_compute_capability=(9, 0),
    required_modules=(MODULE,),
    cuda_graph_safe=True,
    fp8_query_p_dtype="float8_e4m3fn",
    extra_rules=(output_in_query_dtype, fp8_kv_needs_fp8_query, _hopper_only, _fp8_layout),
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
    """Paged, variable-length attention on FlashAttention 3; arguments already validated by the dispatcher.

    q              [num_tokens, num_heads, head_size], fp16 / bf16 / fp8 e4m3
    key_cache      [num_blocks, block_size, num_kv_heads, head_size], q's dtype
    value_cache    same as key_cache
    cu_seqlens_q   int32 [num_seqs + 1], query start offsets
    seq_lens       int32 [num_seqs], KV length of each sequence (context + new tokens)
    block_table    int32 [num_seqs, max_blocks_per_seq], page ids
    q_scale, k_scale, v_scale
                   fp32, one element each, with an fp8 query (FP8_PER_TENSOR)
    out            optional [num_tokens, num_heads, head_size] in config.out_dtype

    Returns [num_tokens, num_heads, head_size] in config.out_dtype (`out` when given).
    """
    from flash_attn_interface import flash_attn_with_kvcache

    descales = {}
    if config.q_is_fp8:
        per_sequence_and_kv_head = (seq_lens.shape[0], config.num_kv_heads)
        descales = {name: scale.reshape(1, 1).expand(per_sequence_and_kv_head)
                    for name, scale in (("q_descale", q_scale), ("k_descale", k_scale), ("v_descale", v_scale))}
    left = window_size_left(config)
    result = flash_attn_with_kvcache(
        q, key_cache, value_cache,
        cache_seqlens=seq_lens,
        page_table=block_table,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=q.shape[0],
        softmax_scale=config.scale,
        causal=config.causal,
        window_size=(-1 if left is None else left, -1),  # -1: unlimited
        softcap=config.logits_soft_cap or 0.0,  # 0.0: off
        **descales,
    )
    if out is None:
        return result
    return out.copy_(result)
