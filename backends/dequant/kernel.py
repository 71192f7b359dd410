"""Dequantize the KV-cache pages a batch reads into a compact 16-bit workspace: kernel and launcher.

Workspace layout
----------------
Sequence s owns workspace pages s * pages_per_seq ... (s + 1) * pages_per_seq - 1 of
``[num_seqs * pages_per_seq, WORKSPACE_BLOCK_SIZE, num_kv_heads, head_size]``, so its
block table is the identity (``arange(num_seqs * pages_per_seq).view(num_seqs,
pages_per_seq)``) and its key j sits at slot j % WORKSPACE_BLOCK_SIZE of its page
j // WORKSPACE_BLOCK_SIZE. pages_per_seq covers the longest sequence the source block
table can address (its width times the cache's page size), a bound read from shapes
alone: no value comes back to the host, and a launch can be captured in a CUDA graph.

Work decomposition
------------------
One program per (sequence, workspace page, KV head) writes that page's keys and values
of that head: it reads the sequence's length on the device and exits when the page
starts past it (those pages are never read by the attention that follows). Otherwise
each of its WORKSPACE_BLOCK_SIZE tokens j is gathered through the source block table
(page = block_table[s, j // BLOCK_SIZE], slot j % BLOCK_SIZE), so the workspace page size
need not match the cache's. Slots at or past the sequence's length are written as
zeros: an attention kernel may read the whole last page (FlashAttention's TMA path does),
and zeros keep that read finite, where the cache's own unused slots may hold anything.

Numerics: one rounding
----------------------
real = stored * scale (docs/DESIGN.md) is rounded once to the 16-bit dtype, as if computed
exactly. A plain fp32 product rounded again to 16 bits would round twice, and differ
from the exact rounding by one 16-bit ulp whenever the fp32 product lands exactly on a
16-bit tie (about one element in 2^12). So the product is rounded to odd in fp32 first:
an fma gives its exact error, and an inexact product with an even last bit moves one fp32
ulp towards the exact value. fp32's 24 bits are at least two more than fp16's 11 and
bf16's 8, and rounding to odd with two spare bits followed by round-to-nearest-even is the
correctly rounded result (Boldo and Melquiond, "Emulation of FMA and correctly rounded
sums: proved algorithms using rounding to odd", IEEE TC 2008). stored widens to fp32
exactly (fp8 and int8 values are fp32 numbers).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from backends.interpreter_lock import interpreter_launch
import triton
import triton.language as tl

__all__ = ["dequantize_pages_kernel", "dequantize_pages", "identity_block_table", "Workspace"]


class Workspace(NamedTuple):
    """What `dequantize_pages` hands the inner 16-bit call: its caches, block table and seq_lens."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor


@triton.jit
def _round_to_odd_product(x, s):
    """x * s in fp32, rounded to odd (the fp32 neighbour with an odd last bit when inexact).

    x, s: fp32 tiles of one shape. The fma's exact error says whether x * s was rounded and
    to which side; zero, infinite and NaN products are left as they are.
    """
    product = x * s
    error = tl.fma(x, s, -product)  # x * s - product, exactly
    bits = product.to(tl.int32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    inexact_even = (error != 0.0) & ((bits & 1) == 0) & (product != 0.0) & finite
    # The integer order of fp32 bit patterns is the order of magnitudes: +1 is one ulp away from zero.
    toward_exact = tl.where((error > 0.0) == (product > 0.0), 1, -1)
    return tl.where(inexact_even, bits + toward_exact, bits).to(tl.float32, bitcast=True)


@triton.jit
def _dequantize_head_page(
    Cache, Scale, Scale_cache, Workspace,  #
    pages, slots, valid, head, workspace_rows, offs_d,  #
    stride_cb, stride_cs, stride_ch, stride_cd,  #
    stride_scb, stride_scs, stride_sch,  #
    stride_wt, stride_wh,  #
    HEAD_SIZE: tl.constexpr, PER_TOKEN_HEAD: tl.constexpr,
):
    """One KV head of one workspace page: gather, scale, round once, store (zeros where not valid).

    pages, slots, valid, workspace_rows: [WORKSPACE_BLOCK_SIZE] (int64 page ids, slots, token < seq_len,
    flat workspace token rows); offs_d: [HEAD_SIZE_PADDED].
    """
    d_mask = offs_d < HEAD_SIZE
    offsets = (pages[:, None] * stride_cb + slots[:, None] * stride_cs + head * stride_ch
               + offs_d[None, :] * stride_cd)
    # No `other`: an fp8 load cannot take one; the masked lanes are zeroed after widening instead.
    stored = tl.load(Cache + offsets, mask=valid[:, None] & d_mask[None, :])
    x = stored.to(tl.float32)
    if PER_TOKEN_HEAD:
        scale = tl.load(Scale_cache + pages * stride_scb + slots * stride_scs + head * stride_sch, mask=valid,
                        other=0.0)
        scale_tile = tl.zeros_like(x) + scale[:, None]
    else:
        scale_tile = tl.zeros_like(x) + tl.load(Scale)
    # Masked slots are 0 * scale: exact zeros whatever the cache or its scales hold there.
    real = _round_to_odd_product(tl.where(valid[:, None], x, 0.0), scale_tile)
    tl.store(Workspace + workspace_rows[:, None] * stride_wt + head * stride_wh + offs_d[None, :],
             real.to(Workspace.dtype.element_ty), mask=d_mask[None, :])


@triton.jit
def dequantize_pages_kernel(
    K_cache, V_cache,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_SIZE], fp8 or int8, any strides
    K_scale, V_scale,  # fp32 [1] (FP8_PER_TENSOR), else None
    K_scale_cache, V_scale_cache,  # fp32 [num_blocks, BLOCK_SIZE, num_kv_heads] (per token-head), else None
    K_workspace, V_workspace,  # [num_seqs * pages_per_seq, WORKSPACE_BLOCK_SIZE, num_kv_heads, HEAD_SIZE]
    Seq_lens, Block_table,  # int32 [num_seqs], int32 [num_seqs, max_blocks_per_seq]
    Cu_seqlens_q, Workspace_seq_lens,  # int32 [num_seqs + 1] and the inner call's int32 [num_seqs] (SHORT_QUERIES)
    pages_per_seq,  #
    stride_kb, stride_ks, stride_kh, stride_kd,  #
    stride_vb, stride_vs, stride_vh, stride_vd,  #
    stride_kscb, stride_kscs, stride_ksch,  #
    stride_vscb, stride_vscs, stride_vsch,  #
    stride_bts, stride_btc,  #
    stride_wt, stride_wh,  # workspace: per token (flattened over pages), per head; last dimension contiguous
    HEAD_SIZE: tl.constexpr, HEAD_SIZE_PADDED: tl.constexpr,  #
    BLOCK_SIZE: tl.constexpr,  # tokens per cache page
    WORKSPACE_BLOCK_SIZE: tl.constexpr,  # tokens per workspace page
    PER_TOKEN_HEAD: tl.constexpr,  # scales from the scale caches, else one K_scale / V_scale
    SHORT_QUERIES: tl.constexpr,  # > 0: sequences with at most this many queries are left to another kernel
):
    program = tl.program_id(0)
    head = tl.program_id(1)
    seq = program // pages_per_seq
    page = program % pages_per_seq
    seq_len = tl.load(Seq_lens + seq)
    copy_len = seq_len
    if SHORT_QUERIES > 0:
        # A short-query sequence (a decode) is attended elsewhere, straight from the cache: none of its keys
        # is copied, and the inner call sees q_len keys of zeros (a valid call whose rows get overwritten).
        tl.static_assert(SHORT_QUERIES <= WORKSPACE_BLOCK_SIZE)
        q_len = tl.load(Cu_seqlens_q + seq + 1) - tl.load(Cu_seqlens_q + seq)
        short = q_len <= SHORT_QUERIES
        seq_len = tl.where(short, q_len, seq_len)
        copy_len = tl.where(short, 0, copy_len)
        if page == 0 and head == 0:
            tl.store(Workspace_seq_lens + seq, seq_len)
    first = page * WORKSPACE_BLOCK_SIZE
    if first >= seq_len:
        return
    tokens = first + tl.arange(0, WORKSPACE_BLOCK_SIZE)
    valid = tokens < copy_len
    # int64 before any stride multiplies them: a cache or a workspace can pass 2^31 elements.
    seq64 = seq.to(tl.int64)
    pages = tl.load(Block_table + seq64 * stride_bts + (tokens // BLOCK_SIZE) * stride_btc, mask=valid,
                    other=0).to(tl.int64)
    slots = (tokens % BLOCK_SIZE).to(tl.int64)
    workspace_rows = program.to(tl.int64) * WORKSPACE_BLOCK_SIZE + tl.arange(0, WORKSPACE_BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_SIZE_PADDED)
    _dequantize_head_page(K_cache, K_scale, K_scale_cache, K_workspace, pages, slots, valid, head,
                          workspace_rows, offs_d,
                          stride_kb, stride_ks, stride_kh, stride_kd,
                          stride_kscb, stride_kscs, stride_ksch,
                          stride_wt, stride_wh,
                          HEAD_SIZE, PER_TOKEN_HEAD)
    _dequantize_head_page(V_cache, V_scale, V_scale_cache, V_workspace, pages, slots, valid, head,
                          workspace_rows, offs_d,
                          stride_vb, stride_vs, stride_vh, stride_vd,
                          stride_vscb, stride_vscs, stride_vsch,
                          stride_wt, stride_wh,
                          HEAD_SIZE, PER_TOKEN_HEAD)


# (num_seqs, pages_per_seq, device) -> identity block table; bounded, as batch shapes vary.
_identity_tables: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_MAX_IDENTITY_TABLES = 64


def identity_block_table(num_seqs: int, pages_per_seq: int, device: torch.device) -> torch.Tensor:
    """int32 [num_seqs, pages_per_seq] holding arange(num_seqs * pages_per_seq): row s lists workspace
    pages s * pages_per_seq onwards. Cached per shape, except while a CUDA graph is being captured:
    a table made then holds its values only once the graph replays, so it must not serve eager calls."""
    key = (num_seqs, pages_per_seq, device)
    table = _identity_tables.get(key)
    if table is not None:
        return table
    table = torch.arange(num_seqs * pages_per_seq, dtype=torch.int32, device=device).view(num_seqs, pages_per_seq)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return table
    if len(_identity_tables) >= _MAX_IDENTITY_TABLES:
        _identity_tables.clear()
    _identity_tables[key] = table
    return table


@functools.lru_cache(maxsize=None)
def _head_size_padded(head_size: int) -> int:
    return triton.next_power_of_2(head_size)


def dequantize_pages(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    dtype: torch.dtype,
    workspace_block_size: int,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    v_scale_cache: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    short_queries: int = 0,
) -> Workspace:
    """Dequantize every page the batch reads into a compact `dtype` workspace (module docstring).

    key_cache, value_cache  [num_blocks, block_size, num_kv_heads, head_size], fp8 or int8, any strides
                            (the last dimension may be strided too)
    seq_lens                int32 [num_seqs], read on the device only
    block_table             int32 [num_seqs, max_blocks_per_seq], any strides
    k_scale, v_scale        fp32, one element each (FP8_PER_TENSOR); or
    k_scale_cache, v_scale_cache
                            fp32 [num_blocks, block_size, num_kv_heads], any strides (per token-head)
    dtype                   torch.float16 or torch.bfloat16
    workspace_block_size    tokens per workspace page (a power of two)
    workspace               optional [2, num_seqs * pages_per_seq, workspace_block_size, num_kv_heads,
                            head_size] in `dtype`, contiguous (tests pass one to see which pages are written)
    short_queries, cu_seqlens_q
                            with short_queries > 0 (at most workspace_block_size), a sequence with at most
                            that many queries (per cu_seqlens_q, read on the device) is left out: none of
                            its keys is copied, and the returned seq_lens give it q_len keys, all zeros, so
                            the inner call stays valid; the caller attends those rows from the cache itself.

    Returns a `Workspace`: the two workspaces [num_seqs * pages_per_seq, workspace_block_size,
    num_kv_heads, head_size], the identity block table int32 [num_seqs, pages_per_seq], with
    pages_per_seq = ceil(max_blocks_per_seq * block_size / workspace_block_size), and the seq_lens
    of the inner call (`seq_lens` itself unless short_queries). Pages past a sequence's length
    (the inner length) are left as they were.
    """
    num_blocks, block_size, num_kv_heads, head_size = key_cache.shape
    num_seqs = block_table.shape[0]
    pages_per_seq = triton.cdiv(block_table.shape[1] * block_size, workspace_block_size)
    shape = (2, num_seqs * pages_per_seq, workspace_block_size, num_kv_heads, head_size)
    if workspace is None:
        workspace = torch.empty(shape, dtype=dtype, device=key_cache.device)
    elif tuple(workspace.shape) != shape or workspace.dtype != dtype or not workspace.is_contiguous():
        raise ValueError(f"workspace: expected a contiguous {dtype} tensor of shape {shape}, got "
                         f"{workspace.dtype} {tuple(workspace.shape)} (contiguous: {workspace.is_contiguous()})")
    key_workspace, value_workspace = workspace[0], workspace[1]
    table = identity_block_table(num_seqs, pages_per_seq, key_cache.device)
    if short_queries:
        if cu_seqlens_q is None or not 0 < short_queries <= workspace_block_size:
            raise ValueError(f"short_queries: expected 1..{workspace_block_size} with cu_seqlens_q, got "
                             f"{short_queries} with cu_seqlens_q={'None' if cu_seqlens_q is None else 'a tensor'}")
        inner_seq_lens = torch.empty_like(seq_lens)
    else:
        inner_seq_lens = seq_lens
    if num_seqs * pages_per_seq == 0:
        return Workspace(key_workspace, value_workspace, table, inner_seq_lens)
    per_token_head = k_scale_cache is not None
    k_scale_strides = k_scale_cache.stride() if per_token_head else (0, 0, 0)
    v_scale_strides = v_scale_cache.stride() if per_token_head else (0, 0, 0)
    with interpreter_launch(key_cache.device):  # one interpreted kernel at a time on the CPU
        dequantize_pages_kernel[(num_seqs * pages_per_seq, num_kv_heads)](
            key_cache, value_cache,  #
            k_scale, v_scale,  #
            k_scale_cache, v_scale_cache,  #
            key_workspace, value_workspace,  #
            seq_lens, block_table,  #
            cu_seqlens_q if short_queries else seq_lens, inner_seq_lens,  # (unread without short_queries)
            pages_per_seq,  #
            *key_cache.stride(),  #
            *value_cache.stride(),  #
            *k_scale_strides,  #
            *v_scale_strides,  #
            *block_table.stride(),  #
            key_workspace.stride(1), key_workspace.stride(2),  #
            HEAD_SIZE=head_size,
            HEAD_SIZE_PADDED=_head_size_padded(head_size),
            BLOCK_SIZE=block_size,
            WORKSPACE_BLOCK_SIZE=workspace_block_size,
            PER_TOKEN_HEAD=per_token_head,
            SHORT_QUERIES=short_queries,
            num_warps=4 if workspace_block_size * _head_size_padded(head_size) <= 4096 else 8,
        )
    return Workspace(key_workspace, value_workspace, table, inner_seq_lens)
