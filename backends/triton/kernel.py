"""Unified paged attention in Triton: prefill, chunked prefill and decode in one launch.

Layouts (DESIGN.md): q [num_tokens, H, D]; key/value caches
[num_blocks, block_size, H_kv, D]; cu_seqlens_q int32 [S + 1]; seq_lens int32
[S] (KV length, new tokens included); block_table int32 [S, max_blocks].

Work decomposition
------------------
One program owns one *query tile* of one KV head (and, on the split-KV path,
one KV segment). A query tile packs BLOCK_Q consecutive query tokens of one
sequence times the NUM_QUERIES_PER_KV query heads that share the KV head into
the BLOCK_M rows of the tile (GQA packing): row r holds token r // QPK and
head kv_head * QPK + r % QPK, so every K/V tile loaded is used by all the
query heads that need it.

The host cannot know how many tiles each sequence needs without reading
cu_seqlens_q back (a sync), so the grid is sized by the bound
num_tokens // BLOCK_Q + num_seqs: sequence s owns the tile indices starting
at cu_seqlens_q[s] // BLOCK_Q + s, which leaves room for ceil(q_len / BLOCK_Q)
tiles. A program finds its sequence by a binary search over those starts and
exits at once when its tile lies past the end of its sequence.

KV loop
-------
Keys are visited in tiles of TILE_N, each key gathered through the block
table (page = block_table[seq, j // BLOCK_SIZE], slot = j % BLOCK_SIZE), so
the tile size does not depend on the page size. Page ids are widened to int64
before they multiply a stride: num_blocks * block_size * H_kv * D can pass
2^31. The loop covers only keys some row of the tile can see: it stops after
the last key visible to the tile's last query when causal (mask aligned
bottom-right: query i sits at position kv_len - q_len + i) and starts at the
first key inside the sliding window of the tile's first query. Loads outside
that range are masked to zero, so unused or poisoned cache slots (NaN) never
reach a score or the P @ V product.

Softmax is the online (flash) softmax in base 2: log2(e) is folded into the
score scale (after tanh when soft-capping, which must see natural-domain
scores), m_i and l_i are the running max and sum per row, and a row that has
seen no visible key keeps m_i = -inf and contributes exactly 0 (the max used
for exponentiation is replaced by 0 for such rows, so nothing computes
-inf - -inf). A sink starts a row at m_i = sink, l_i = 1, which adds
exp(sink - m) to the denominator. ALiBi adds slope_h * (j - pos).

KV-cache quantization (KV_QUANT, one compiled branch each)
-----------------------------------------------------------
KV_QUANT_NONE: the cache holds the query's 16-bit dtype; dots in that dtype,
  fp32 accumulation.
KV_QUANT_FP8_PER_TENSOR with a 16-bit query: each fp8 tile is converted to the
  query's dtype (exact: every e4m3 and e5m2 value is representable in fp16 and
  bf16) and the per-tensor scales are applied to the dot products instead of
  to each element: score_scale = softmax_scale * k_scale multiplies Q @ K^T,
  and v_scale multiplies the accumulator once in the epilogue. Because a
  per-tensor scale is a common factor, (q . (k * s_k)) = (q . k) * s_k and
  sum_j p_j (v_j * s_v) = s_v * sum_j p_j v_j: this *is* the "tile
  dequantized into the query's dtype before the dot", with fewer roundings and
  no per-element multiply.
KV_QUANT_FP8_PER_TENSOR with an FP8 e4m3 query (Q_FP8): Q @ K^T runs on fp8
  operands (tensor cores, fp32 accumulation), and score_scale = softmax_scale *
  q_scale * k_scale multiplies it once per tile; v_scale multiplies the
  accumulator in the epilogue. (Hopper's fp8 MMA keeps only ~14 bits while
  accumulating, so a score errs by up to ~2^-13 * |q| . |k| * score_scale; the
  GPU tests bound this term.) P @ V runs on 16-bit tensor cores: P is rounded
  to fp16 (relative error <= 2^-11, as on the 16-bit paths) and the e4m3 V tile
  is converted to fp16 exactly. Why not an e4m3 P and an fp8 dot, as in vLLM
  PR #42080: measured on an H100 with triton 3.6 (prefill 4 x 4096, 32/8
  heads, head size 128), (1) with 64- or 128-row tiles (wgmma) that dot
  returned wrong values (errors ~1e3 x the bound) whenever the fp8 P also fed
  the row sum l; (2) the variants that computed it correctly (P as the B
  operand of a transposed product) ran at ~180 TFLOP/s against ~280-330 for
  the 16-bit P @ V; (3) an e4m3 P has up to 2^-4 relative error per
  probability (3 mantissa bits), 128 times fp16's. So the fp8 dot bought
  neither speed nor accuracy here; revisit with a newer Triton or Blackwell.
KV_QUANT_FP8_PER_TOKEN_HEAD / KV_QUANT_INT8_PER_TOKEN_HEAD (16-bit query):
  per-key scales come from k_scale_cache / v_scale_cache
  [num_blocks, block_size, H_kv] fp32 through the same page gather. K is
  converted to the query's dtype (int8 by value conversion; both exact) and
  the score columns are multiplied by k_scale[j] in fp32 after the dot. V is
  dequantized per element, (v.fp32 * v_scale[j]).to(q dtype), before the dot:
  folding v_scale[j] into P instead would push P * scale into fp16 subnormals.
Scales a mode does not use are never loaded (their code is compiled out).

Output: acc / l (times v_scale for per-tensor FP8), or for fp8 output
clamp(o / output_scale, -448, 448) cast to e4m3.

Split-KV (SPLIT_KV)
-------------------
For decode-shaped batches the grid gains a third axis over KV segments. Each
program takes a contiguous share of the tiles its query tile must visit
(ceil(tiles / num_splits), computed from the sequence's real kv_len in the
kernel, so no host sync is needed), and writes its un-normalized partial
(acc, m, l) into a fp32 workspace [num_tokens, H, num_splits, D + 2]. A
second kernel, `reduce_kv_splits_kernel`, combines the segments (an empty one
has m = -inf, l = 0 and weighs 0) and applies the sink, v_scale, the output
scale and the output cast exactly once.
"""

import triton
import triton.language as tl

# Values of the KV_QUANT constexpr: how the KV cache is stored and scaled.
KV_QUANT_NONE = tl.constexpr(0)
KV_QUANT_FP8_PER_TENSOR = tl.constexpr(1)
KV_QUANT_FP8_PER_TOKEN_HEAD = tl.constexpr(2)
KV_QUANT_INT8_PER_TOKEN_HEAD = tl.constexpr(3)

LOG2E = tl.constexpr(1.4426950408889634)
FP8_E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def _find_sequence(Cu_seqlens_q, tile_index, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence s whose tiles start at or before tile_index: the largest s with
    cu_seqlens_q[s] // BLOCK_Q + s <= tile_index (binary search)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(Cu_seqlens_q + mid) // BLOCK_Q + mid
        if first_tile <= tile_index:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _soft_cap(x, cap):
    """cap * tanh(x / cap), written so that large |x| cannot overflow exp."""
    e = tl.exp(-2.0 * tl.abs(x / cap))
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(x < 0.0, -t, t)


@triton.jit
def _finish_output(acc, row_sum, V_scale, Output_scale, out_ty: tl.constexpr, KV_QUANT: tl.constexpr,
                   OUT_FP8: tl.constexpr):
    """acc / row_sum with the epilogue scales, cast to the output dtype; row_sum broadcasts against acc."""
    # A row that saw no visible key and no sink has acc = 0, row_sum = 0: its output is 0.
    inv = 1.0 / tl.where(row_sum > 0.0, row_sum, 1.0)
    if KV_QUANT == KV_QUANT_FP8_PER_TENSOR:
        inv = inv * tl.load(V_scale)
    if OUT_FP8:
        inv = inv / tl.load(Output_scale)
    out = acc * inv
    if OUT_FP8:
        out = tl.minimum(tl.maximum(out, -FP8_E4M3_MAX), FP8_E4M3_MAX)
    return out.to(out_ty)


@triton.jit
def unified_attention_kernel(
    Q, K_cache, V_cache, Out, Partials,  #
    Cu_seqlens_q, Seq_lens, Block_table,  #
    Q_scale, K_scale, V_scale, K_scale_cache, V_scale_cache,  #
    Alibi_slopes, Sinks, Output_scale,  #
    softmax_scale, logits_soft_cap, sliding_window, num_seqs,  #
    stride_qt, stride_qh, stride_qd,  #
    stride_kb, stride_ks, stride_kh, stride_kd,  #
    stride_vb, stride_vs, stride_vh, stride_vd,  #
    stride_kscb, stride_kscs, stride_ksch,  #
    stride_vscb, stride_vscs, stride_vsch,  #
    stride_bts,  #
    stride_ot, stride_oh, stride_od,  #
    stride_pt, stride_ph, stride_ps,  #
    NUM_QUERIES_PER_KV: tl.constexpr,  #
    HEAD_SIZE: tl.constexpr, HEAD_SIZE_PADDED: tl.constexpr,  #
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache page
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,  #
    KV_QUANT: tl.constexpr, Q_FP8: tl.constexpr, OUT_FP8: tl.constexpr,  #
    IS_CAUSAL: tl.constexpr, USE_SLIDING_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,  #
    USE_ALIBI: tl.constexpr, USE_SINKS: tl.constexpr, SPLIT_KV: tl.constexpr,  #
):
    tl.static_assert(BLOCK_Q * NUM_QUERIES_PER_KV <= BLOCK_M)
    tl.static_assert(BLOCK_Q >= 1)
    tl.static_assert(HEAD_SIZE <= HEAD_SIZE_PADDED)
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(TILE_N >= 16)
    tl.static_assert(HEAD_SIZE_PADDED >= 16)
    if Q_FP8:
        # An fp8 tensor-core dot (Q @ K^T) needs a reduction dimension of at least 32.
        tl.static_assert(HEAD_SIZE_PADDED >= 32)
        tl.static_assert(KV_QUANT == KV_QUANT_FP8_PER_TENSOR)

    tile_index = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_sequence(Cu_seqlens_q, tile_index, num_seqs, BLOCK_Q)
    q_start = tl.load(Cu_seqlens_q + seq)
    q_len = tl.load(Cu_seqlens_q + seq + 1) - q_start
    q_tile = tile_index - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    kv_len = tl.load(Seq_lens + seq)

    # ---- the query tile: BLOCK_Q tokens x NUM_QUERIES_PER_KV heads -------------------
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_SIZE_PADDED)
    q_index = q_tile * BLOCK_Q + offs_m // NUM_QUERIES_PER_KV  # query index inside the sequence
    head = kv_head * NUM_QUERIES_PER_KV + offs_m % NUM_QUERIES_PER_KV
    row_valid = (offs_m < BLOCK_Q * NUM_QUERIES_PER_KV) & (q_index < q_len)
    d_valid = offs_d < HEAD_SIZE
    token = (q_start + q_index).to(tl.int64)
    q = tl.load(
        Q + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    pos = kv_len - q_len + q_index  # each row's position among the keys (bottom-right alignment)

    # ---- the keys this tile can see ------------------------------------------------------
    first_pos = kv_len - q_len + q_tile * BLOCK_Q
    if IS_CAUSAL:
        kv_end = tl.minimum(first_pos + BLOCK_Q, kv_len)
    else:
        kv_end = kv_len
    if USE_SLIDING_WINDOW:
        kv_begin = tl.maximum(first_pos - sliding_window + 1, 0)
    else:
        kv_begin = 0
    tile_begin = kv_begin // TILE_N
    tile_end = tl.cdiv(kv_end, TILE_N)
    if SPLIT_KV:
        tiles_per_split = tl.cdiv(tile_end - tile_begin, tl.num_programs(2))
        tile_begin = tile_begin + tl.program_id(2) * tiles_per_split
        tile_end = tl.minimum(tile_end, tile_begin + tiles_per_split)

    # ---- scales ---------------------------------------------------------------------------
    score_scale = softmax_scale
    if Q_FP8:
        score_scale = score_scale * tl.load(Q_scale)
    if KV_QUANT == KV_QUANT_FP8_PER_TENSOR:
        score_scale = score_scale * tl.load(K_scale)
    score_scale_log2 = score_scale * LOG2E
    if USE_ALIBI:
        alibi_slope_log2 = tl.load(Alibi_slopes + head) * LOG2E

    # ---- online softmax state -------------------------------------------------------------
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_SINKS:
        if not SPLIT_KV:  # on the split path the reduction adds the sink, once
            m_i = tl.load(Sinks + head).to(tl.float32) * LOG2E
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE_PADDED], dtype=tl.float32)

    block_table_row = Block_table + seq.to(tl.int64) * stride_bts
    for kv_tile in range(tile_begin, tile_end):
        offs_n = kv_tile * TILE_N + tl.arange(0, TILE_N)
        key_valid = (offs_n >= kv_begin) & (offs_n < kv_end)
        page = tl.load(block_table_row + offs_n // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        slot = offs_n % BLOCK_SIZE
        k_offs = page * stride_kb + slot * stride_ks + kv_head * stride_kh
        v_offs = page * stride_vb + slot * stride_vs + kv_head * stride_vh
        k = tl.load(
            K_cache + k_offs[None, :] + offs_d[:, None] * stride_kd,
            mask=d_valid[:, None] & key_valid[None, :],
            other=0.0,
        )  # [HEAD_SIZE_PADDED, TILE_N]
        v = tl.load(
            V_cache + v_offs[:, None] + offs_d[None, :] * stride_vd,
            mask=key_valid[:, None] & d_valid[None, :],
            other=0.0,
        )  # [TILE_N, HEAD_SIZE_PADDED]

        # -- scores S = Q K^T, scaled to real values (log2 domain) --
        if KV_QUANT != KV_QUANT_NONE:
            if not Q_FP8:
                k = k.to(Q.dtype.element_ty)  # exact for fp8 and int8 values
        s = tl.dot(q, k)
        if KV_QUANT == KV_QUANT_FP8_PER_TOKEN_HEAD or KV_QUANT == KV_QUANT_INT8_PER_TOKEN_HEAD:
            k_scale = tl.load(
                K_scale_cache + page * stride_kscb + slot * stride_kscs + kv_head * stride_ksch,
                mask=key_valid,
                other=0.0,
            )
            s = s * k_scale[None, :]
        if USE_SOFTCAP:
            s = _soft_cap(s * score_scale, logits_soft_cap) * LOG2E
        else:
            s = s * score_scale_log2
        if USE_ALIBI:
            s += alibi_slope_log2[:, None] * (offs_n[None, :] - pos[:, None]).to(tl.float32)

        visible = row_valid[:, None] & key_valid[None, :]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= pos[:, None])
        if USE_SLIDING_WINDOW:
            visible = visible & (pos[:, None] - offs_n[None, :] < sliding_window)
        s = tl.where(visible, s, float("-inf"))

        # -- online softmax update --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        acc = acc * alpha[:, None]

        # -- acc += P V --
        l_i = l_i * alpha + tl.sum(p, 1)
        if Q_FP8:
            # 16-bit P @ V (see the docstring); e4m3 -> fp16 is exact, v_scale is applied in the epilogue.
            acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc)
        else:
            if KV_QUANT == KV_QUANT_FP8_PER_TOKEN_HEAD or KV_QUANT == KV_QUANT_INT8_PER_TOKEN_HEAD:
                v_scale = tl.load(
                    V_scale_cache + page * stride_vscb + slot * stride_vscs + kv_head * stride_vsch,
                    mask=key_valid,
                    other=0.0,
                )
                v = (v.to(tl.float32) * v_scale[:, None]).to(Q.dtype.element_ty)
            elif KV_QUANT == KV_QUANT_FP8_PER_TENSOR:
                v = v.to(Q.dtype.element_ty)  # exact; v_scale is applied in the epilogue
            acc = tl.dot(p.to(Q.dtype.element_ty), v, acc)
        m_i = m_new

    # ---- epilogue -------------------------------------------------------------------------
    store_mask = row_valid[:, None] & d_valid[None, :]
    if SPLIT_KV:
        partial = Partials + token * stride_pt + head * stride_ph + tl.program_id(2) * stride_ps
        tl.store(partial[:, None] + offs_d[None, :], acc, mask=store_mask)
        tl.store(partial + HEAD_SIZE, m_i, mask=row_valid)
        tl.store(partial + HEAD_SIZE + 1, l_i, mask=row_valid)
    else:
        out = _finish_output(acc, l_i[:, None], V_scale, Output_scale, Out.dtype.element_ty, KV_QUANT, OUT_FP8)
        tl.store(
            Out + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
            out,
            mask=store_mask,
        )


@triton.jit
def reduce_kv_splits_kernel(
    Partials, Out, Sinks, V_scale, Output_scale,  #
    num_splits,  #
    stride_pt, stride_ph, stride_ps,  #
    stride_ot, stride_oh, stride_od,  #
    HEAD_SIZE: tl.constexpr, HEAD_SIZE_PADDED: tl.constexpr, NUM_SPLITS_PADDED: tl.constexpr,  #
    KV_QUANT: tl.constexpr, OUT_FP8: tl.constexpr, USE_SINKS: tl.constexpr,  #
):
    """Combine the partial (acc, m, l) of every KV segment of one (token, head) row.

    Partials[t, h, s, :HEAD_SIZE] is the un-normalized accumulator of segment
    s, [HEAD_SIZE] its running max m (log2 domain) and [HEAD_SIZE + 1] its sum
    l. A segment with no visible key has m = -inf, l = 0, acc = 0 and weighs 0.
    """
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS_PADDED)
    offs_d = tl.arange(0, HEAD_SIZE_PADDED)
    split_valid = offs_s < num_splits
    d_valid = offs_d < HEAD_SIZE
    row = Partials + token * stride_pt + head * stride_ph + offs_s * stride_ps
    m_split = tl.load(row + HEAD_SIZE, mask=split_valid, other=float("-inf"))
    l_split = tl.load(row + HEAD_SIZE + 1, mask=split_valid, other=0.0)
    acc = tl.load(row[:, None] + offs_d[None, :], mask=split_valid[:, None] & d_valid[None, :], other=0.0)

    m_max = tl.max(m_split, 0)
    if USE_SINKS:
        sink_log2 = tl.load(Sinks + head).to(tl.float32) * LOG2E
        m_max = tl.maximum(m_max, sink_log2)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.math.exp2(m_split - m_safe)
    l_total = tl.sum(l_split * weight, 0)
    if USE_SINKS:
        l_total += tl.math.exp2(sink_log2 - m_safe)
    acc_total = tl.sum(acc * weight[:, None], 0)

    out = _finish_output(acc_total, l_total, V_scale, Output_scale, Out.dtype.element_ty, KV_QUANT, OUT_FP8)
    tl.store(Out + token * stride_ot + head * stride_oh + offs_d * stride_od, out, mask=d_valid)
