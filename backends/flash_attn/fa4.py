"""FlashAttention 4 (`flash_attn.cute`, PyPI ``flash-attn-4``): capability and adapter.

Verified against flash-attn-4 4.0.0b36 (``flash_attn/cute/interface.py``), on an
H100 by ``tests/backends/test_flash_attn.py``. What the record claims, and why:

- dtypes: fp16 / bf16 q, k, v; the output is q's dtype (``out_torch_dtype =
  torch.bfloat16 if is_fp8 else q_dtype``). FP8 (``q_descale`` ...) asserts
  ``arch // 10 == 10`` ("FP8 is only supported on SM100"), so it is refused on
  Hopper; on SM100 it is refused too until a test covers it.
- compute capability: paged KV runs on SM90 (``FlashAttentionForwardSm90``) and
  SM100/SM110; the SM80 and SM120 kernels assert ``page_table is None``.
- head sizes: multiples of 16 up to 256 on SM90 (``_validate_head_dims``; the
  non-TMA paged loader asserts "Paged KV does not support irregular head dim",
  i.e. head_dim a multiple of 16); on SM100 up to 128, or 256.
- block sizes: any page size loads through cp.async, except a page of exactly
  the kernel's KV tile (``paged_kv_non_tma = page_size not in [None, tile_n]``),
  which loads by TMA and reads the unused tail of each sequence's last page;
  the ``flash_attn_varlen_func`` docstring says those rows "must be finite".
  Our contract lets them hold anything, so that block size is refused
  (`kv_tile`).
- features: causal and non-causal, sliding window, softcap (``softcap``: a
  score_mod applied after the softmax scale), sinks (``learnable_sink``, one
  natural-log logit per query head added to the denominator, not scaled).
  No ALiBi parameter exists.

The call (`forward`) maps our arguments one to one, with no copy of q or the cache:

    q [num_tokens, H, D]               -> q (total_q, nheads, hdim), varlen
    key_cache / value_cache            -> k / v (num_pages, page_size, nheads_k, hdim)
    block_table                        -> page_table (batch, max_num_pages_per_seq), int32
    cu_seqlens_q                       -> cu_seqlens_q
    seq_lens                           -> seqused_k
    config.scale                       -> softmax_scale
    config.causal                      -> causal (bottom-right aligned: mask.py keeps key j for
                                          row i when j < i + seqlen_k - seqlen_q + 1)
    sliding_window W                   -> window_size_left = W - 1, right None (causal makes it 0)
    logits_soft_cap                    -> softcap
    sinks                              -> learnable_sink (fp32 [H])
    out                                -> out (written in place when contiguous and 16-byte aligned)

``max_seqlen_q`` and ``max_seqlen_k`` are left to FlashAttention: without them
it bounds the query length by ``total_q`` (``q.shape[0]``) and the KV length by
``page_table.shape[1] * page_size``, both host-side shapes, so no value is read
back from the GPU. On SM90 the bound only feeds tile heuristics (the varlen
scheduler reads the real lengths from ``cu_seqlens_q``); on SM100 an omitted
hint selects the flat varlen grid rather than a grid sized by the bound.
``num_splits`` stays 1: SM90 asserts "SplitKV not supported on SM 9.0".

The first call for each combination of static switches compiles a kernel
(seconds); warm up before capturing a CUDA graph.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch

from backends.flash_attn.common import (
    can_write_into,
    compute_capability_text,
    output_in_query_dtype,
    sixteen_bit_kv_only,
    window_size_left,
)
from dispatch.capabilities import Capability, DeviceInfo
from dispatch.config import AttentionConfig, KVQuantMode

__all__ = ["CAPABILITY", "forward", "kv_tile"]

MODULE = "flash_attn.cute"
DISTRIBUTION = "flash-attn-4"
VERIFIED_VERSION = "4.0.0b36"
_PAGED_ARCHS = (9, 10, 11)  # compute capability majors with a paged-KV forward


def _fp8_query(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """No FP8 query: FA4's FP8 forward needs SM100, and is not verified here."""
    if not config.q_is_fp8:
        return []
    if device.compute_capability is not None and device.compute_capability[0] == 9:
        return [
            f"q_dtype={config.q_dtype}: FlashAttention 4's FP8 forward needs compute capability 10.x (SM100); "
            f"this device is {compute_capability_text(device)}"
        ]
    return [f"q_dtype={config.q_dtype}: FlashAttention 4's FP8 forward (SM100 only) is not verified by this backend"]


def _paged_architecture(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """Paged KV on compute capability 9.x, 10.x and 11.x only."""
    cc = device.compute_capability
    if cc is not None and cc >= (9, 0) and cc[0] not in _PAGED_ARCHS:
        return [
            f"compute capability {compute_capability_text(device)}: FlashAttention 4 has a paged-KV forward on "
            "9.x (Hopper) and 10.x / 11.x (Blackwell) only"
        ]
    return []


def _blackwell_head_sizes(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """On 10.x / 11.x, head_size at most 128 or exactly 256."""
    cc = device.compute_capability
    if cc is not None and cc[0] in (10, 11) and not (config.head_size <= 128 or config.head_size == 256):
        return [
            f"head_size={config.head_size} not supported by FlashAttention 4 on compute capability "
            f"{compute_capability_text(device)} (allowed: multiple of 16, at most 128, or 256)"
        ]
    return []


def kv_tile(config: AttentionConfig, device: DeviceInfo) -> Optional[int]:
    """The KV tile (tile_n) FlashAttention 4 picks for this config, or None off its paged architectures.

    SM90: ``_tile_size_fwd_sm90(head_dim, head_dim_v, is_causal, is_local)`` with head_dim_v ==
    head_dim; a sliding window makes the call local, and local is not causal
    (``_resolve_causal_local_window``). SM100/SM110: the default FwdConfig(128, 128).
    """
    cc = device.compute_capability
    if cc is None or cc[0] not in _PAGED_ARCHS:
        return None
    if cc[0] in (10, 11):
        return 128
    d = config.head_size
    local = config.sliding_window is not None
    causal = config.causal and not local
    if d <= 64:
        return 128
    if d <= 96:
        return 128 if causal or local else 144
    if d <= 128:
        return 128
    if d <= 192:
        return 96 if local else 112
    return 64 if local else 80


def _tma_reads_last_page_tail(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """block_size must differ from FA4's KV tile (128 for head_size 128 on 9.x): TMA pages read the unused tail."""
    tile = kv_tile(config, device)
    if tile is None or config.block_size != tile:
        return []
    return [
        f"block_size={config.block_size} equals FlashAttention 4's KV tile for head_size={config.head_size} on "
        f"compute capability {compute_capability_text(device)}: such pages load by TMA, which reads the unused "
        "tail of each sequence's last page, where a NaN or Inf makes the output NaN; choose another block size"
    ]


def _non_causal_head_sizes(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """Non-causal attention only with a head size that is a multiple of 32: with head_size 80 on an H200
    (4.0.0b36, paged, non-causal) the GPU parity matrix measured max errors of 0.27 (fp16, gqa 4, pages
    of 64, prefill [1, 15, 33]) against a same-precision error of 0.001, reproduced alone, while causal
    head_size 80 and non-causal 128 passed (tests/parity/RESULTS-gpu.md). Multiples of 32 are the non-causal
    sizes this record keeps; the others are refused until a test covers them."""
    if config.causal or config.head_size % 32 == 0:
        return []
    return [f"causal=False with head_size={config.head_size}: FlashAttention 4 (4.0.0b36) computed non-causal "
            "head_size 80 wrongly on an H200 (GPU parity matrix); non-causal needs a head_size multiple of 32"]


CAPABILITY = Capability(
    description="FlashAttention 4 (flash_attn.cute)",
    q_dtypes=frozenset({"float16", "bfloat16"}),
    kv_cache_dtypes=frozenset({"float16", "bfloat16"}),
    out_dtypes=frozenset({"float16", "bfloat16"}),
    kv_quant_modes=frozenset({KVQuantMode.NONE}),
    devices=frozenset({"cuda"}),
    max_head_size=256,
    head_size_multiple=16,
    block_size_multiple=16,
    features=frozenset({"causal", "non_causal", "sliding_window", "softcap", "sinks"}),
    min_compute_capability=(9, 0),
    required_modules=(MODULE,),
    cuda_graph_safe=True,
    extra_rules=(
        output_in_query_dtype,
        sixteen_bit_kv_only,
        _fp8_query,
        _paged_architecture,
        _blackwell_head_sizes,
        _tma_reads_last_page_tail,
        _non_causal_head_sizes,
    ),
)

# The keywords `_call_in_place` passes to flash_attn.cute.interface._flash_attn_fwd.
_IN_PLACE_KEYWORDS = frozenset({
    "cu_seqlens_q", "seqused_k", "page_table", "softmax_scale", "causal", "softcap",
    "window_size_left", "window_size_right", "learnable_sink", "out",
})


@functools.lru_cache(maxsize=None)
def _entry() -> tuple[Callable, bool]:
    """(function, writes into `out`): the internal forward when it still takes our keywords, else the public one.

    ``flash_attn_varlen_func`` (public) has no ``out`` argument; ``_flash_attn_fwd``, which it
    calls with the same arguments, does. A version whose internal signature changed falls back
    to the public function and a copy into ``out``.
    """
    from flash_attn.cute import interface

    internal = getattr(interface, "_flash_attn_fwd", None)
    if internal is not None and _IN_PLACE_KEYWORDS <= set(inspect.signature(internal).parameters):
        return internal, True
    return interface.flash_attn_varlen_func, False


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
    """Paged, variable-length attention on FlashAttention 4; arguments already validated by the dispatcher.

    q              [num_tokens, num_heads, head_size], fp16 / bf16
    key_cache      [num_blocks, block_size, num_kv_heads, head_size], q's dtype
    value_cache    same as key_cache
    cu_seqlens_q   int32 [num_seqs + 1], query start offsets
    seq_lens       int32 [num_seqs], KV length of each sequence (context + new tokens)
    block_table    int32 [num_seqs, max_blocks_per_seq], page ids
    sinks          fp32 [num_heads] when config.use_sinks
    out            optional [num_tokens, num_heads, head_size] in q's dtype

    The scales, ALiBi slopes and output scale are never set for a config this backend accepts.
    Returns [num_tokens, num_heads, head_size] in q's dtype (`out` when given).
    """
    function, takes_out = _entry()
    in_place = takes_out and can_write_into(out)
    if takes_out:
        result, *_ = function(
            q, key_cache, value_cache,
            cu_seqlens_q=cu_seqlens_q,
            seqused_k=seq_lens,
            page_table=block_table,
            softmax_scale=config.scale,
            causal=config.causal,
            softcap=config.logits_soft_cap,
            window_size_left=window_size_left(config),
            window_size_right=None,
            learnable_sink=sinks,
            out=out if in_place else None,
        )
    else:
        result, _ = function(
            q, key_cache, value_cache,
            cu_seqlens_q=cu_seqlens_q,
            seqused_k=seq_lens,
            page_table=block_table,
            softmax_scale=config.scale,
            causal=config.causal,
            window_size=(window_size_left(config), None),
            learnable_sink=sinks,
            softcap=config.logits_soft_cap or 0.0,
        )
    if out is None or in_place:
        return result
    return out.copy_(result)
