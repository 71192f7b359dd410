"""What the three FlashAttention adapters share: refusal rules and argument mapping.

Every rule here has the `Capability.extra_rules` signature
``(config, device) -> list[str]`` and returns reasons that name the field, the
value and why FlashAttention cannot compute it exactly. Nothing here imports
flash-attn.
"""

from __future__ import annotations

from typing import Optional

import torch

from dispatch.capabilities import DeviceInfo
from dispatch.config import SIXTEEN_BIT_DTYPES, AttentionConfig, KVQuantMode

__all__ = [
    "output_in_query_dtype",
    "sixteen_bit_kv_only",
    "fp8_kv_needs_fp8_query",
    "window_size_left",
    "can_write_into",
    "compute_capability_text",
]


def compute_capability_text(device: DeviceInfo) -> str:
    return ".".join(map(str, device.compute_capability)) if device.compute_capability else "unknown"


def output_in_query_dtype(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """out_dtype equal to q_dtype (FlashAttention writes a 16-bit query's output in its own dtype)."""
    if config.q_dtype in SIXTEEN_BIT_DTYPES and config.out_dtype != config.q_dtype:
        return [
            f"out_dtype={config.out_dtype} != q_dtype={config.q_dtype}: FlashAttention writes the output in "
            "the query's dtype (no output conversion, no fp8 output scale)"
        ]
    return []


def _per_token_head_or_int8(config: AttentionConfig) -> list[str]:
    mode = config.kv_quant_mode
    if mode is KVQuantMode.INT8_PER_TOKEN_HEAD:
        return ["kv_quant_mode=INT8_PER_TOKEN_HEAD: FlashAttention has no int8 KV cache"]
    if mode is KVQuantMode.FP8_PER_TOKEN_HEAD:
        return [
            "kv_quant_mode=FP8_PER_TOKEN_HEAD: FlashAttention has no per-token-head KV scales "
            "(its descales are one per (sequence, KV head))"
        ]
    return []


def sixteen_bit_kv_only(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """No quantized KV cache: q, k and v are all 16-bit."""
    reasons = _per_token_head_or_int8(config)
    if config.kv_quant_mode is KVQuantMode.FP8_PER_TENSOR and config.q_dtype in SIXTEEN_BIT_DTYPES:
        reasons.append(
            f"kv_quant_mode=FP8_PER_TENSOR with q_dtype={config.q_dtype}: FlashAttention reads q, k and v "
            f"in one dtype, so a {config.kv_cache_dtype} cache cannot serve a 16-bit query"
        )
    return reasons


def fp8_kv_needs_fp8_query(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """A quantized KV cache only as e4m3 FP8_PER_TENSOR with an e4m3 query (q, k, v all in FP8)."""
    reasons = _per_token_head_or_int8(config)
    if config.kv_cache_dtype == "float8_e5m2":
        reasons.append(
            "kv_cache_dtype=float8_e5m2: FlashAttention's FP8 path is e4m3 (q, k and v in one dtype), "
            "and an e5m2 cache cannot serve a 16-bit query"
        )
    elif config.kv_quant_mode is KVQuantMode.FP8_PER_TENSOR and config.q_dtype in SIXTEEN_BIT_DTYPES:
        reasons.append(
            f"kv_quant_mode=FP8_PER_TENSOR with q_dtype={config.q_dtype}: FlashAttention reads q, k and v "
            "in one dtype; an fp8 cache needs q_dtype=float8_e4m3fn"
        )
    return reasons


def window_size_left(config: AttentionConfig) -> Optional[int]:
    """Our window W (key j visible when pos - j < W) as flash-attn's left window, or None when off.

    flash-attn keeps key j for the query at position pos (bottom-right aligned, pos = i + seqlen_k -
    seqlen_q) when pos - window_left <= j <= pos + window_right. pos - j < W is pos - j <= W - 1,
    so window_left = W - 1. The right side is 0 under causal masking and unlimited otherwise, so it
    is never a window of its own here.
    """
    return None if config.sliding_window is None else config.sliding_window - 1


def can_write_into(out: Optional[torch.Tensor], alignment: int = 16) -> bool:
    """True when a kernel can write `out` in place: contiguous and `alignment`-byte aligned (metadata only)."""
    return out is not None and out.is_contiguous() and out.data_ptr() % alignment == 0
