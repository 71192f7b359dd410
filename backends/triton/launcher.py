"""Host side of the Triton backend: tiles, grid, strides, constexprs, split-KV choice.

Everything here is computed from the config and tensor *shapes*; no value is
read back from the device, so a launch can be captured in a CUDA graph.
Per-config work (tiles and constexpr switches) is cached; the launch path
itself only reads shapes and strides and calls the kernels. The one exception
is opt-in: with DISPATCH_TRITON_AUTOTUNE=1 the first launch of a new (GPU,
config, shape bucket) times candidate tiles, with synchronizations, outside
CUDA-graph capture only (autotune.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from dispatch.config import AttentionConfig, KVQuantMode

from backends.interpreter_lock import interpreter_launch

from . import autotune, kernel

__all__ = ["Tiles", "is_decode_shaped", "choose_tiles", "choose_num_kv_splits", "unified_attention"]

_KV_QUANT = {
    KVQuantMode.NONE: kernel.KV_QUANT_NONE.value,
    KVQuantMode.FP8_PER_TENSOR: kernel.KV_QUANT_FP8_PER_TENSOR.value,
    KVQuantMode.FP8_PER_TOKEN_HEAD: kernel.KV_QUANT_FP8_PER_TOKEN_HEAD.value,
    KVQuantMode.INT8_PER_TOKEN_HEAD: kernel.KV_QUANT_INT8_PER_TOKEN_HEAD.value,
}

# A launch is "decode-shaped" when it has at most this many query tokens per sequence on
# average (decode, or speculative decode of a few tokens): it then gets small query tiles,
# and the split-KV path when too few programs would fill the GPU.
DECODE_MAX_QUERIES_PER_SEQ = 4
# Split-KV limits: never more segments than this, and none shorter than MIN_KEYS_PER_SPLIT
# keys on the upper bound of kv_len (block_table width x block_size).
MAX_KV_SPLITS = 16
MIN_KEYS_PER_SPLIT = 256
# Programs wanted per streaming multiprocessor before splitting stops paying.
PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class Tiles:
    """Tile shape and launch parameters of the attention kernel.

    block_m rows of a query tile hold block_m // num_queries_per_kv tokens
    (BLOCK_Q) times the query heads of one KV head; tile_n keys per KV step.
    unmasked_interior: visit the KV tiles that every row sees in full in a
    separate loop compiled without masks (the edge tiles keep them). Faster
    everywhere measured since page ids are read once per page (H200,
    benchmarks/RESULTS.md); one masked loop remains for tuning and tests.
    """

    block_m: int
    tile_n: int
    num_warps: int = 4
    num_stages: int = 2
    unmasked_interior: bool = True


def is_decode_shaped(num_tokens: int, num_seqs: int) -> bool:
    """Few query tokens per sequence: decode or speculative decode (see DECODE_MAX_QUERIES_PER_SEQ)."""
    return num_tokens <= DECODE_MAX_QUERIES_PER_SEQ * num_seqs


def _head_size_padded(head_size: int, q_is_fp8: bool) -> int:
    # tl.dot needs a reduction dimension of at least 16 (32 for fp8 operands).
    return max(triton.next_power_of_2(head_size), 32 if q_is_fp8 else 16)


def choose_tiles(
    head_size: int,
    num_queries_per_kv: int,
    q_is_fp8: bool,
    decode_shaped: bool,
    kv_quant_mode: KVQuantMode = KVQuantMode.NONE,
) -> Tiles:
    """Defaults from tile sweeps on an H200 (`python -m benchmarks.tune_tiles`, head size 128, GQA 4;
    the numbers are in benchmarks/RESULTS.md). Other head sizes scale the key tile so that a K or V
    tile stays <= 32 KB in 16 bits.

    Decode: the smallest tensor-core tile (16 rows, or all query heads of one KV head if more),
    128 keys per step, 4 warps, the unmasked interior loop; 3 stages (2 for per-token-head caches,
    and for head sizes over 128, whose tiles are twice the bytes). Since page ids are read once per
    page, the unmasked interior and 3 stages are fastest for the per-tensor caches (64 x 8k, block
    size 16: bf16 0.531 vs 0.641 ms with one masked loop and 2 stages; fp8 query 0.356 vs 0.369 ms
    with 2 stages); per-token-head caches, which also carry their scale rows through the pipeline,
    are 5-11% faster with 2 (interleaved A/B, `python -m benchmarks.ab_kernel`).
    Prefill: 128 query rows (64 for head size 256), 64 keys, 4 warps (8 were 13% slower), 3 stages
    for a 16-bit query and 2 for fp8.
    """
    head_size_padded = _head_size_padded(head_size, q_is_fp8)
    group = triton.next_power_of_2(num_queries_per_kv)
    if decode_shaped:
        block_m = max(16, group)
        tile_n = 128 if head_size_padded <= 128 else 64
        stages = 2 if kv_quant_mode.is_per_token_head or head_size_padded > 128 else 3
        return Tiles(block_m=block_m, tile_n=tile_n, num_warps=4, num_stages=stages, unmasked_interior=True)
    block_m = max(128 if head_size_padded <= 128 else 64, group)
    tile_n = 64 if head_size_padded <= 128 else 32
    return Tiles(block_m=block_m, tile_n=tile_n, num_warps=4 if block_m <= 128 else 8,
                 num_stages=2 if q_is_fp8 else 3)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_kv_splits(
    num_tokens: int,
    num_seqs: int,
    num_kv_heads: int,
    max_kv_len_bound: int,
    device: torch.device,
) -> int:
    """Number of KV segments per sequence (1 = no split), from shapes only.

    Split when the launch is decode-shaped (at most DECODE_MAX_QUERIES_PER_SEQ
    query tokens per sequence on average) and its num_seqs x num_kv_heads
    programs would leave the GPU underfilled (fewer than PROGRAMS_PER_SM per
    SM), into as many segments as one wave holds. Segments are sized in the kernel from each sequence's real kv_len; the
    count here is capped by MAX_KV_SPLITS and by the block table's upper bound
    on kv_len (no segment shorter than MIN_KEYS_PER_SPLIT keys on that bound).
    Off the GPU (the interpreter) there is nothing to fill: never split.
    """
    if device.type != "cuda" or num_seqs == 0:
        return 1
    if not is_decode_shaped(num_tokens, num_seqs):
        return 1
    programs = num_seqs * num_kv_heads
    device_index = device.index if device.index is not None else torch.cuda.current_device()
    target = PROGRAMS_PER_SM * _multiprocessor_count(device_index)
    if programs >= target:
        return 1
    # As many segments as fit in one wave (floor, not ceil): one program more than the GPU holds at once
    # starts a second, mostly idle wave. On an H200, 8 x 32k decode (64 programs, 264 slots) ran 5 segments
    # (320 programs) at 0.293 ms with an fp8 cache and 4 segments at 0.220 (benchmarks.split_sweep,
    # RESULTS.md); bf16 was within noise of either.
    splits = target // programs
    return max(1, min(splits, MAX_KV_SPLITS, max_kv_len_bound // MIN_KEYS_PER_SPLIT))


def _needs_wide_offsets(cache: torch.Tensor) -> bool:
    """Whether an element offset into `cache` can reach 2^31 (the kernel then computes page offsets in
    int64). Metadata only: the largest offset is sum((size - 1) * stride), which also covers strided
    views such as vLLM's K and V halves of one packed cache."""
    if cache.is_contiguous():
        return cache.numel() >= 2**31
    return sum((size - 1) * stride for size, stride in zip(cache.shape, cache.stride())) >= 2**31 - 1


@dataclass(frozen=True)
class _Plan:
    """Everything about a launch that depends on the config alone (cached)."""

    tiles: Tiles
    block_q: int
    constexprs: dict
    reduce_constexprs: dict


@functools.lru_cache(maxsize=256)
def _plan(config: AttentionConfig, decode_shaped: bool, tiles: Optional[Tiles]) -> _Plan:
    group = config.num_queries_per_kv
    if tiles is None:
        tiles = choose_tiles(config.head_size, group, config.q_is_fp8, decode_shaped, config.kv_quant_mode)
    head_size_padded = _head_size_padded(config.head_size, config.q_is_fp8)
    kv_quant = _KV_QUANT[config.kv_quant_mode]
    common = dict(
        HEAD_SIZE=config.head_size,
        HEAD_SIZE_PADDED=head_size_padded,
        KV_QUANT=kv_quant,
        OUT_FP8=config.out_is_fp8,
        USE_SINKS=config.use_sinks,
    )
    constexprs = dict(
        common,
        NUM_QUERIES_PER_KV=group,
        BLOCK_SIZE=config.block_size,
        BLOCK_Q=tiles.block_m // group,
        BLOCK_M=tiles.block_m,
        TILE_N=tiles.tile_n,
        Q_FP8=config.q_is_fp8,
        IS_CAUSAL=config.causal,
        USE_SLIDING_WINDOW=config.sliding_window is not None,
        USE_SOFTCAP=config.logits_soft_cap is not None,
        USE_ALIBI=config.use_alibi,
        UNMASKED_INTERIOR=tiles.unmasked_interior,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return _Plan(tiles=tiles, block_q=tiles.block_m // group, constexprs=constexprs, reduce_constexprs=common)


def unified_attention(
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
    num_kv_splits: Optional[int] = None,
    tiles: Optional[Tiles] = None,
    wide_offsets: Optional[bool] = None,
    short_queries_only: int = 0,
) -> torch.Tensor:
    """Run the unified kernel (and, when split, the reduction). Arguments as in
    `backends.triton.forward`, already validated by the dispatcher.

    num_kv_splits: None lets `choose_num_kv_splits` decide; an int forces that
        many KV segments (1 = the single-pass path). For tests and tuning.
    tiles: None picks `choose_tiles`' defaults, or with DISPATCH_TRITON_AUTOTUNE=1 the tiles tuned
        for this (GPU, config, shape bucket) (see autotune.py); a `Tiles` overrides both.
    wide_offsets: None computes page offsets in int64 only where a cache needs them
        (`_needs_wide_offsets`); True forces int64 (for tests and tuning). False is refused where a
        cache needs them.
    short_queries_only: > 0 attends only the sequences with at most that many queries (read on the
        device) and leaves every other row of `out` as it is: the decode rows of a mixed batch whose
        prefill rows another kernel writes (backends/dequant). Decode tiles, one KV segment (the
        split-KV reduction would write every row), no autotuning.
    """
    num_tokens, num_heads, head_size = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = key_cache.shape[2]
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_size), dtype=config.out_torch_dtype, device=q.device)
    if num_tokens == 0:
        return out

    decode_shaped = short_queries_only > 0 or is_decode_shaped(num_tokens, num_seqs)
    max_kv_len_bound = block_table.shape[1] * key_cache.shape[1]
    if short_queries_only > 0:
        if num_kv_splits not in (None, 1):
            raise ValueError(f"num_kv_splits: short_queries_only runs one KV segment, got {num_kv_splits}")
        num_kv_splits = 1
    if tiles is None and autotune.ENABLED and q.device.type == "cuda" and short_queries_only == 0:
        tiles = autotune.tiles_for(
            config, q.device, decode_shaped, num_tokens, num_seqs, max_kv_len_bound,
            default=_plan(config, decode_shaped, None).tiles,
            run=lambda candidate: unified_attention(
                q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, config=config, q_scale=q_scale,
                k_scale=k_scale, v_scale=v_scale, k_scale_cache=k_scale_cache, v_scale_cache=v_scale_cache,
                alibi_slopes=alibi_slopes, sinks=sinks, output_scale=output_scale, out=out,
                num_kv_splits=num_kv_splits, tiles=candidate, wide_offsets=wide_offsets),
        )
    plan = _plan(config, decode_shaped, tiles)
    if num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(num_tokens, num_seqs, num_kv_heads, max_kv_len_bound, q.device)
    split_kv = num_kv_splits > 1

    if split_kv:
        # Per (token, head, segment): the un-normalized accumulator, then m and l.
        partials = torch.empty(
            (num_tokens, num_heads, num_kv_splits, head_size + 2), dtype=torch.float32, device=q.device
        )
        partial_strides = partials.stride()[:3]
    else:
        partials = None
        partial_strides = (0, 0, 0)
    # Page offsets in int32 where no cache element lies 2^31 or more elements past its start (a
    # contiguous cache under 2^31 elements): far less index arithmetic than int64 (kernel docstring).
    needs_wide = _needs_wide_offsets(key_cache) or _needs_wide_offsets(value_cache) or (
        k_scale_cache is not None and (_needs_wide_offsets(k_scale_cache) or _needs_wide_offsets(v_scale_cache)))
    if wide_offsets is None:
        wide_offsets = needs_wide
    elif not wide_offsets and needs_wide:
        caches = dict(key_cache=key_cache, value_cache=value_cache, k_scale_cache=k_scale_cache,
                      v_scale_cache=v_scale_cache)
        wide = ", ".join(f"{name} {tuple(t.shape)} (contiguous: {t.is_contiguous()})" for name, t in caches.items()
                         if t is not None and _needs_wide_offsets(t))
        raise ValueError(f"wide_offsets: False needs contiguous caches under 2^31 elements, got {wide}")
    k_scale_strides = k_scale_cache.stride() if k_scale_cache is not None else (0, 0, 0)
    v_scale_strides = v_scale_cache.stride() if v_scale_cache is not None else (0, 0, 0)

    def grid(meta):
        if short_queries_only > 0:  # a fixed number of tiles per sequence (kernel.py)
            return (num_seqs * triton.cdiv(short_queries_only, meta["BLOCK_Q"]), num_kv_heads, 1)
        return (num_tokens // meta["BLOCK_Q"] + num_seqs, num_kv_heads, num_kv_splits)

    # One interpreted kernel at a time on the CPU (backends/interpreter_lock.py); a no-op on the GPU.
    with interpreter_launch(q.device):
        kernel.unified_attention_kernel[grid](
            q, key_cache, value_cache, out, partials,  #
            cu_seqlens_q, seq_lens, block_table,  #
            q_scale, k_scale, v_scale, k_scale_cache, v_scale_cache,  #
            alibi_slopes, sinks, output_scale,  #
            config.scale,
            config.logits_soft_cap if config.logits_soft_cap is not None else 0.0,
            config.sliding_window if config.sliding_window is not None else 0,
            num_seqs,  #
            *q.stride(),  #
            *key_cache.stride(),  #
            *value_cache.stride(),  #
            *k_scale_strides,  #
            *v_scale_strides,  #
            block_table.stride(0),  #
            alibi_slopes.stride(0) if alibi_slopes is not None else 0,  #
            sinks.stride(0) if sinks is not None else 0,  #
            *out.stride(),  #
            *partial_strides,  #
            SPLIT_KV=split_kv,
            USE_PTX=q.device.type == "cuda",
            WIDE_OFFSETS=wide_offsets,
            SHORT_QUERIES_ONLY=short_queries_only,
            **plan.constexprs,
        )
        if split_kv:
            kernel.reduce_kv_splits_kernel[(num_tokens, num_heads)](
                partials, out, sinks, v_scale, output_scale,  #
                num_kv_splits, sinks.stride(0) if sinks is not None else 0,  #
                *partial_strides,  #
                *out.stride(),  #
                NUM_SPLITS_PADDED=triton.next_power_of_2(num_kv_splits),
                **plan.reduce_constexprs,
            )
    return out
