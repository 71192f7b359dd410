"""PyTorch backend: gather pages, dequantize, then SDPA (or explicit fp32 math).

The complete fallback: it runs every config the config rules allow, on CPU
and CUDA, so `auto` always has somewhere correct to go. Per sequence, it
gathers the sequence's pages through `block_table`, dequantizes the cache
(real = stored * scale, per tensor or per token and head), and then
  - calls `torch.nn.functional.scaled_dot_product_attention` when the features
    are expressible as an attention mask (causal, sliding window, ALiBi);
  - computes softmax explicitly in float32 for softcap and sinks, which SDPA
    has no way to express.
16-bit queries compute in their own dtype (the cache is dequantized into it);
an fp8 query computes in float32 after dequantizing with q_scale.

Not CUDA-graph safe: the per-sequence lengths are read on the host once per
call (one `.tolist()`), since SDPA needs host-side shapes. The capability
record says so (`cuda_graph_safe=False`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from dispatch.capabilities import Capability
from dispatch.config import KV_CACHE_DTYPES, OUT_DTYPES, Q_DTYPES, AttentionConfig, KVQuantMode

__all__ = ["CAPABILITY", "forward"]

CAPABILITY = Capability(
    description="PyTorch: page gather + dequantize + F.scaled_dot_product_attention (fp32 math for softcap/sinks)",
    q_dtypes=Q_DTYPES,
    kv_cache_dtypes=KV_CACHE_DTYPES,
    out_dtypes=OUT_DTYPES,
    kv_quant_modes=frozenset(KVQuantMode),
    devices=frozenset({"cpu", "cuda"}),
    features=frozenset({"causal", "non_causal", "sliding_window", "softcap", "alibi", "sinks"}),
    required_modules=("torch",),
    cuda_graph_safe=False,
)


def _compute_dtype(config: AttentionConfig) -> torch.dtype:
    return torch.float32 if config.q_is_fp8 else config.q_torch_dtype


def _gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """[num_blocks, block_size, *rest] -> this sequence's first `length` tokens, [length, *rest]."""
    gathered = cache.index_select(0, pages)
    return gathered.reshape(-1, *cache.shape[2:])[:length]


def _dequantize(stored: torch.Tensor, scale: Optional[torch.Tensor], token_scales: Optional[torch.Tensor],
                dtype: torch.dtype) -> torch.Tensor:
    if scale is None and token_scales is None:
        return stored.to(dtype)
    real = stored.to(torch.float32)
    if scale is not None:
        real = real * scale.reshape(())
    if token_scales is not None:
        real = real * token_scales[..., None]
    return real.to(dtype)


def _visibility(q_len: int, kv_len: int, config: AttentionConfig, device: torch.device):
    """Bool [q_len, kv_len] mask of visible keys, and (j - pos) for ALiBi."""
    pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    key = torch.arange(kv_len, device=device)[None, :]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if config.causal:
        visible &= key <= pos
    if config.sliding_window is not None:
        visible &= (pos - key) < config.sliding_window
    return visible, (key - pos)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: AttentionConfig,
            alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """q [q_len, H, D], k/v [kv_len, H_kv, D] in the compute dtype -> [q_len, H, D] float32."""
    q_len, kv_len = q.shape[0], k.shape[0]
    group = config.num_queries_per_kv
    # [H, len, D], each query head reading the KV head of its group.
    qh = q.transpose(0, 1)
    kh = k.transpose(0, 1).repeat_interleave(group, dim=0)
    vh = v.transpose(0, 1).repeat_interleave(group, dim=0)
    visible, distance = _visibility(q_len, kv_len, config, q.device)

    if config.logits_soft_cap is None and not config.use_sinks:
        if config.use_alibi:
            bias = alibi_slopes[:, None, None] * distance[None].to(torch.float32)
            mask = bias.masked_fill(~visible[None], float("-inf")).to(q.dtype)
        else:
            mask = visible
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=config.scale)
        return out.transpose(0, 1).to(torch.float32)

    # Softcap and sinks need the scores themselves: explicit float32 softmax.
    scores = torch.matmul(qh.float(), kh.float().transpose(1, 2)) * config.scale
    if config.logits_soft_cap is not None:
        cap = config.logits_soft_cap
        scores = cap * torch.tanh(scores / cap)
    if config.use_alibi:
        scores = scores + alibi_slopes[:, None, None] * distance[None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    if config.use_sinks:
        row_max = torch.maximum(row_max, sinks[:, None, None])
    weights = torch.exp(scores - row_max)
    denominator = weights.sum(dim=-1, keepdim=True)
    if config.use_sinks:
        denominator = denominator + torch.exp(sinks[:, None, None] - row_max)
    out = torch.matmul(weights, vh.float()) / denominator
    return out.transpose(0, 1)


def _store(result: torch.Tensor, config: AttentionConfig, output_scale: Optional[torch.Tensor]) -> torch.Tensor:
    if config.out_is_fp8:
        limit = torch.finfo(config.out_torch_dtype).max
        return (result / output_scale.reshape(())).clamp(-limit, limit).to(config.out_torch_dtype)
    return result.to(config.out_torch_dtype)


def forward(
    q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, *,
    config: AttentionConfig,
    q_scale=None, k_scale=None, v_scale=None, k_scale_cache=None, v_scale_cache=None,
    alibi_slopes=None, sinks=None, output_scale=None, out=None,
) -> torch.Tensor:
    num_tokens = q.shape[0]
    if out is None:
        out = torch.empty(num_tokens, config.num_heads, config.head_size, dtype=config.out_torch_dtype, device=q.device)
    dtype = _compute_dtype(config)
    q_real = _dequantize(q, q_scale, None, dtype)
    per_token_head = config.kv_quant_mode.is_per_token_head
    bs = config.block_size
    # The one host read of this backend (see the module docstring).
    starts = cu_seqlens_q.tolist()
    kv_lens = seq_lens.tolist()
    for seq, kv_len in enumerate(kv_lens):
        q_start, q_end = starts[seq], starts[seq + 1]
        if q_end == q_start:
            continue
        pages = block_table[seq, : math.ceil(kv_len / bs)].to(torch.long)
        k = _dequantize(_gather_pages(key_cache, pages, kv_len), k_scale,
                        _gather_pages(k_scale_cache, pages, kv_len) if per_token_head else None, dtype)
        v = _dequantize(_gather_pages(value_cache, pages, kv_len), v_scale,
                        _gather_pages(v_scale_cache, pages, kv_len) if per_token_head else None, dtype)
        result = _attend(q_real[q_start:q_end], k, v, config, alibi_slopes, sinks)
        out[q_start:q_end] = _store(result, config, output_scale)
    return out
