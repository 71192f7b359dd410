"""Unified paged attention in Triton: prefill, chunked prefill and decode in one launch.

Layouts (docs/DESIGN.md): q [num_tokens, H, D]; key/value caches
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
the tile size does not depend on the page size. Page ids are read once per
page when pages tile the key tile, once per tile when one page holds it, and
once per key otherwise (a page size such as 48): read per key, they took as
many load instructions as the K and V tiles themselves (reading them per page
made prefill 15% and decode 7-10% faster on an H200). With WIDE_OFFSETS, page
ids are widened to int64 before they multiply a stride, as
num_blocks * block_size * H_kv * D can pass 2^31; the launcher sets it only
where a cache needs it (2^31 elements or more, or not contiguous). int32
offsets cut prefill's instruction count by 16% (the gather's 64-bit address
arithmetic had been a quarter of it).

The loop covers only keys some row of the tile can see: it stops after the
last key visible to the tile's last query when causal (mask aligned
bottom-right: query i sits at position kv_len - q_len + i) and starts at the
first key inside the sliding window of the tile's first query. Loads outside
that range are masked to zero, so unused or poisoned cache slots (NaN) never
reach a score or the P @ V product. With UNMASKED_INTERIOR, the tiles whose
keys every row of the query tile sees run in a loop of their own compiled
without any mask; only the edge tiles (the diagonal, the window's start, the
last partial tile) pay for masks. The launcher picks per case (Tiles).

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
Quantized caches with a 16-bit query: every dot runs on fp16 operands. fp8 and
  int8 values convert to fp16 exactly, fp8 in one instruction per two values
  (to bf16 they would go through fp16 and fp32: one quarter-rate F2F per value,
  which held decode at bf16 speed; `python -m benchmarks.sass_report` shows the
  instruction mix), int8 by a byte permute and one fp16 subtraction per two
  values (`_int8_to_fp16`). A bf16 query is moved to fp16 once per program,
  exactly, after a power-of-two rescale that puts the tile's largest |q| in
  [2^14, 2^15) (its factor comes back out of the score scale), and P is rounded
  to fp16 (relative error <= 2^-11, finer than bf16's 2^-8).
KV_QUANT_FP8_PER_TENSOR with a 16-bit query: the per-tensor scales are applied
  to the dot products instead of to each element: score_scale = softmax_scale
  * k_scale multiplies Q @ K^T, and v_scale multiplies the accumulator once in
  the epilogue. Because a per-tensor scale is a common factor,
  (q . (k * s_k)) = (q . k) * s_k and sum_j p_j (v_j * s_v) = s_v * sum_j p_j
  v_j: this *is* the "tile dequantized before the dot", with fewer roundings
  and no per-element multiply.
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
  [num_blocks, block_size, H_kv] fp32 through the same page gather. The score
  columns are multiplied by k_scale[j] * softmax_scale * log2(e) in fp32 after
  the dot. v_scale[j] multiplies P (one multiply per score instead of one per
  V element), and the fp16 operand P * v_scale is renormalized per KV tile by
  a power of two 2^e that puts its largest possible value below 2^15, so it
  neither overflows nor sinks into fp16 subnormals; 2^e enters through the
  exponent of exp2, the tile's largest |v_scale| comes out of the same
  reduction as the row max, the accumulator is kept in units of 2^-e, the
  change of unit between tiles rides on alpha, and the epilogue removes it.
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
def _max_pair(a0, b0, a1, b1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1)


@triton.jit
def _exponent(x):
    """floor(log2(|x|)) of a finite fp32 x != 0, read from its exponent bits (exact; 0 and subnormals
    give -127, inf and NaN give 128)."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _pow2(e):
    """2.0 ** e in fp32 for an integer -126 <= e <= 127, assembled from the exponent bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _int8_to_fp16(x, USE_PTX: tl.constexpr):
    """int8 -> fp16, exact (|x| <= 128 fits fp16's 11 bits).

    On the GPU four values at a time in five arithmetic instructions: byte ^ 0x80 is x + 128 in [0, 255];
    a byte permute puts it under the fp16 exponent of 1024 (0x64__ is 1024 + byte), and one fp16x2
    subtraction of 1152 leaves x. A plain conversion is one I2F per value, on the quarter-rate
    conversion unit, which held decode of an int8 cache below memory speed. The interpreter has
    no inline PTX, so there it converts directly (same values).
    """
    if USE_PTX:
        return tl.inline_asm_elementwise(
            """
            {
            .reg .b32 biased, high, bias;
            xor.b32 biased, $2, 0x80808080;
            mov.b32 high, 0x64646464;
            mov.b32 bias, 0x64806480;
            prmt.b32 $0, biased, high, 0x5140;
            prmt.b32 $1, biased, high, 0x7362;
            sub.f16x2 $0, $0, bias;
            sub.f16x2 $1, $1, bias;
            }
            """,
            "=r,=r,r",
            [x],
            dtype=tl.float16,
            is_pure=True,
            pack=4,
        )
    else:
        return x.to(tl.float16)


@triton.jit
def _to_fp16(x, USE_PTX: tl.constexpr):
    """A cache tile (fp8 or int8) to fp16, exactly."""
    if x.dtype == tl.int8:
        return _int8_to_fp16(x, USE_PTX)
    else:
        return x.to(tl.float16)  # fp8 -> fp16: one cvt per two values on sm_89+


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
def _attend_kv_tile(
    acc, m_i, l_i, acc_exp,  # running state of the online softmax
    q, kv_tile, kv_begin, kv_end, pos, row_valid, offs_d, d_valid, kv_head, block_table_row,  #
    K_cache, V_cache, K_scale_cache, V_scale_cache,  #
    stride_kb, stride_ks, stride_kh, stride_kd,  #
    stride_vb, stride_vs, stride_vh, stride_vd,  #
    stride_kscb, stride_kscs, stride_ksch,  #
    stride_vscb, stride_vscs, stride_vsch,  #
    qk_scale, logits_soft_cap, alibi_slope_log2, sliding_window,  #
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_SIZE_PADDED: tl.constexpr,  #
    KV_QUANT: tl.constexpr, Q_FP8: tl.constexpr, PV_DTYPE: tl.constexpr,  #
    IS_CAUSAL: tl.constexpr, USE_SLIDING_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,  #
    USE_ALIBI: tl.constexpr, USE_PTX: tl.constexpr, WIDE_OFFSETS: tl.constexpr, MASKED: tl.constexpr,  #
):
    """One KV tile of TILE_N keys: scores, online-softmax update, acc += P V.

    MASKED=False is for interior tiles, whose keys all lie in [kv_begin, kv_end) and are visible to
    every row of the query tile: they skip the key masks, the visibility mask and the guard for rows
    that have seen nothing yet (most of a long sequence's tiles). MASKED=True handles everything.
    """
    PER_TOKEN_HEAD: tl.constexpr = KV_QUANT == KV_QUANT_FP8_PER_TOKEN_HEAD or KV_QUANT == KV_QUANT_INT8_PER_TOKEN_HEAD
    offs_n = kv_tile * TILE_N + tl.arange(0, TILE_N)
    if MASKED:
        key_valid = (offs_n >= kv_begin) & (offs_n < kv_end)
    else:
        key_valid = offs_n < kv_end  # all true here; used only by the HEAD_SIZE-padded loads
    if BLOCK_SIZE % TILE_N == 0:
        # The whole tile lies in one page: one page id per tile.
        page = tl.load(block_table_row + (kv_tile * TILE_N) // BLOCK_SIZE) + tl.zeros([TILE_N], dtype=tl.int32)
    elif TILE_N % BLOCK_SIZE == 0:
        # Whole pages: one page id per page, spread over its keys.
        PAGES: tl.constexpr = TILE_N // BLOCK_SIZE
        offs_page = kv_tile * PAGES + tl.arange(0, PAGES)
        if MASKED:
            pages = tl.load(block_table_row + offs_page,
                            mask=(offs_page * BLOCK_SIZE < kv_end) & ((offs_page + 1) * BLOCK_SIZE > kv_begin), other=0)
        else:
            pages = tl.load(block_table_row + offs_page)
        page = tl.reshape(tl.broadcast_to(pages[:, None], [PAGES, BLOCK_SIZE]), [TILE_N])
    elif MASKED:
        page = tl.load(block_table_row + offs_n // BLOCK_SIZE, mask=key_valid, other=0)
    else:
        page = tl.load(block_table_row + offs_n // BLOCK_SIZE)
    if WIDE_OFFSETS:
        page = page.to(tl.int64)
    slot = offs_n % BLOCK_SIZE
    k_ptrs = K_cache + (page * stride_kb + slot * stride_ks + kv_head * stride_kh)[None, :] + offs_d[:, None] * stride_kd
    v_ptrs = V_cache + (page * stride_vb + slot * stride_vs + kv_head * stride_vh)[:, None] + offs_d[None, :] * stride_vd
    if MASKED or HEAD_SIZE != HEAD_SIZE_PADDED:
        k = tl.load(k_ptrs, mask=d_valid[:, None] & key_valid[None, :], other=0.0)  # [HEAD_SIZE_PADDED, TILE_N]
        v = tl.load(v_ptrs, mask=key_valid[:, None] & d_valid[None, :], other=0.0)  # [TILE_N, HEAD_SIZE_PADDED]
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)

    # -- scores S = Q K^T, scaled to real values (log2 domain) --
    if Q_FP8:
        s = tl.dot(q, k)  # fp8 operands
    elif KV_QUANT != KV_QUANT_NONE:
        s = tl.dot(q, _to_fp16(k, USE_PTX))  # q was brought to fp16 in the prologue; fp8 / int8 -> fp16 is exact
    else:
        s = tl.dot(q, k)
    if PER_TOKEN_HEAD:
        # Both scale rows are read here, next to the tile: the page and slot vectors die now
        # instead of living across the softmax until the P V product needs v_scale.
        k_scale_ptrs = K_scale_cache + page * stride_kscb + slot * stride_kscs + kv_head * stride_ksch
        v_scale_ptrs = V_scale_cache + page * stride_vscb + slot * stride_vscs + kv_head * stride_vsch
        if MASKED:
            k_scale = tl.load(k_scale_ptrs, mask=key_valid, other=0.0)
            v_scale = tl.load(v_scale_ptrs, mask=key_valid, other=0.0)
        else:
            k_scale = tl.load(k_scale_ptrs)
            v_scale = tl.load(v_scale_ptrs)
        if not USE_SOFTCAP:
            # The score scale rides on the per-key scale: one multiply per score.
            k_scale = k_scale * (qk_scale * LOG2E)
        s = s * k_scale[None, :]
    # A 16-bit cache's score scale is softmax_scale alone, positive (the config validates it), so it
    # commutes with the row max and rides in the exponent's multiply-add below: one instruction per
    # score fewer. Scales read from tensors (quantized caches, fp8 queries) may have any sign.
    FOLD_SCALE: tl.constexpr = KV_QUANT == KV_QUANT_NONE and not USE_SOFTCAP and not USE_ALIBI
    if USE_SOFTCAP:
        s = _soft_cap(s * qk_scale, logits_soft_cap) * LOG2E
    elif not FOLD_SCALE and not PER_TOKEN_HEAD:
        s = s * (qk_scale * LOG2E)
    if USE_ALIBI:
        s += alibi_slope_log2[:, None] * (offs_n[None, :] - pos[:, None]).to(tl.float32)
    if MASKED:
        visible = row_valid[:, None] & key_valid[None, :]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= pos[:, None])
        if USE_SLIDING_WINDOW:
            visible = visible & (pos[:, None] - offs_n[None, :] < sliding_window)
        s = tl.where(visible, s, float("-inf"))

    # -- online softmax update --
    if PER_TOKEN_HEAD:
        # The row max and the tile's largest |v_scale| (the P V exponent below) in one reduction:
        # both cross the warps through shared memory, so together they cost one exchange, not two.
        # The interpreter runs a reduction with a combine function element by element in Python,
        # so there the two maxima are taken apart (maxima are exact: the same values).
        if USE_PTX:
            s_max, v_scale_max = tl.reduce((s, tl.broadcast_to(tl.abs(v_scale)[None, :], s.shape)), 1, _max_pair)
        else:
            s_max = tl.max(s, 1)
            v_scale_max = tl.max(tl.abs(v_scale), 0) + tl.zeros_like(m_i)
        m_new = tl.maximum(m_i, s_max)
    elif FOLD_SCALE:
        score_scale = qk_scale * LOG2E
        m_new = tl.maximum(m_i, tl.max(s, 1) * score_scale)  # = max of the scaled scores, exactly
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_safe = m_new  # every score is finite, so is the max
    alpha = tl.math.exp2(m_i - m_safe)
    if PER_TOKEN_HEAD:
        # v_scale[j] goes into P (one multiply per score, not per V element), and the fp16 P
        # operand is renormalized by a power of two per tile so that it neither overflows nor
        # sinks into subnormals: p * v_scale * 2^e < 2^15. The 2^e rides in the exponent of
        # exp2 (exact), l stays in real units, and acc is kept in units of 2^-acc_exp per row;
        # the change of unit rides on alpha. The exponent of the tile's largest scale is clamped
        # to [-60, 60] so that every 2^x here stays a normal fp32.
        tile_exp = 14 - tl.minimum(tl.maximum(_exponent(v_scale_max), -60), 60)
        p = tl.math.exp2(s - (m_safe - tile_exp.to(tl.float32))[:, None])  # = p * 2^tile_exp
        p_sum = tl.sum(p, 1) * _pow2(-tile_exp)
    else:
        if FOLD_SCALE:
            p = tl.math.exp2(s * score_scale - m_safe[:, None])
        else:
            p = tl.math.exp2(s - m_safe[:, None])
        p_sum = tl.sum(p, 1)
    l_i = l_i * alpha + p_sum

    # -- acc += P V --
    if PER_TOKEN_HEAD:
        alpha = alpha * _pow2(tile_exp - acc_exp)
        acc_exp = tile_exp
        acc = tl.dot((p * v_scale[None, :]).to(tl.float16), _to_fp16(v, USE_PTX), acc * alpha[:, None])
    elif KV_QUANT == KV_QUANT_NONE and not Q_FP8:
        acc = tl.dot(p.to(PV_DTYPE), v, acc * alpha[:, None])
    else:
        # fp8 per-tensor cache: P in fp16 (relative error <= 2^-11), V converted to fp16 exactly;
        # v_scale is applied in the epilogue.
        acc = tl.dot(p.to(tl.float16), _to_fp16(v, USE_PTX), acc * alpha[:, None])
    return acc, m_new, l_i, acc_exp


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
    stride_alibi, stride_sink,  # per-head vectors may be strided views (an int 1 specializes away)
    stride_ot, stride_oh, stride_od,  #
    stride_pt, stride_ph, stride_ps,  #
    NUM_QUERIES_PER_KV: tl.constexpr,  #
    HEAD_SIZE: tl.constexpr, HEAD_SIZE_PADDED: tl.constexpr,  #
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache page
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,  #
    KV_QUANT: tl.constexpr, Q_FP8: tl.constexpr, OUT_FP8: tl.constexpr,  #
    IS_CAUSAL: tl.constexpr, USE_SLIDING_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,  #
    USE_ALIBI: tl.constexpr, USE_SINKS: tl.constexpr, SPLIT_KV: tl.constexpr,  #
    USE_PTX: tl.constexpr,  # inline PTX allowed (compiled for a GPU, not the interpreter)
    UNMASKED_INTERIOR: tl.constexpr,  # interior KV tiles in their own loop without masks (Tiles.unmasked_interior)
    WIDE_OFFSETS: tl.constexpr,  # some cache offset may pass 2^31 - 1: page offsets in int64
    SHORT_QUERIES_ONLY: tl.constexpr = 0,  # > 0: attend only sequences with at most this many queries
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
    PER_TOKEN_HEAD: tl.constexpr = KV_QUANT == KV_QUANT_FP8_PER_TOKEN_HEAD or KV_QUANT == KV_QUANT_INT8_PER_TOKEN_HEAD

    tile_index = tl.program_id(0)
    kv_head = tl.program_id(1)

    if SHORT_QUERIES_ONLY > 0:
        # Only the short-query sequences (decodes) of a batch whose other rows another kernel computes
        # (backends/dequant): a fixed number of tiles per sequence, no search; other rows of Out are left
        # alone. The grid is num_seqs * cdiv(SHORT_QUERIES_ONLY, BLOCK_Q) tiles (launcher.py).
        SHORT_TILES: tl.constexpr = (SHORT_QUERIES_ONLY + BLOCK_Q - 1) // BLOCK_Q
        seq = tile_index // SHORT_TILES
        q_tile = tile_index % SHORT_TILES
        q_start = tl.load(Cu_seqlens_q + seq)
        q_len = tl.load(Cu_seqlens_q + seq + 1) - q_start
        if q_len > SHORT_QUERIES_ONLY:
            return
    else:
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

    # ---- scales ---------------------------------------------------------------------------
    qk_scale = softmax_scale
    if Q_FP8:
        qk_scale = qk_scale * tl.load(Q_scale)
    if KV_QUANT == KV_QUANT_FP8_PER_TENSOR:
        qk_scale = qk_scale * tl.load(K_scale)
    if KV_QUANT != KV_QUANT_NONE and not Q_FP8:
        if Q.dtype.element_ty == tl.bfloat16:
            # Dots against a quantized cache run on fp16 operands (fp8 and int8 convert to fp16 in
            # one exact instruction; to bf16 they need three). bf16 q moves to fp16 exactly after a
            # power-of-two rescale that puts the tile's largest |q| in [2^14, 2^15): fp16 keeps all 8
            # bits of every element down to 2^-31 of that largest one. The factor comes back out of
            # the score scale. inf or NaN in q stays inf or NaN.
            q_exp = 14 - tl.maximum(_exponent(tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0)), -100)
            q = (q.to(tl.float32) * _pow2(q_exp)).to(tl.float16)
            qk_scale = qk_scale * _pow2(-q_exp)
    if USE_ALIBI:
        alibi_slope_log2 = tl.load(Alibi_slopes + head * stride_alibi) * LOG2E
    else:
        alibi_slope_log2 = 0.0

    # ---- the keys this tile can see ------------------------------------------------------
    first_pos = kv_len - q_len + q_tile * BLOCK_Q
    if IS_CAUSAL:
        kv_end = tl.minimum(first_pos + BLOCK_Q, kv_len)
        full_end = first_pos + 1  # keys up to the first row's position are visible to every row
    else:
        kv_end = kv_len
        full_end = kv_len
    if USE_SLIDING_WINDOW:
        kv_begin = tl.maximum(first_pos - sliding_window + 1, 0)
        last_pos = tl.minimum(first_pos + BLOCK_Q - 1, kv_len - 1)
        full_begin = tl.maximum(last_pos - sliding_window + 1, 0)  # ... and keys in the last row's window
    else:
        kv_begin = 0
        full_begin = 0
    tile_begin = kv_begin // TILE_N
    tile_end = tl.cdiv(kv_end, TILE_N)
    if SPLIT_KV:
        tiles_per_split = tl.cdiv(tile_end - tile_begin, tl.num_programs(2))
        tile_begin = tile_begin + tl.program_id(2) * tiles_per_split
        tile_end = tl.minimum(tile_end, tile_begin + tiles_per_split)
    if UNMASKED_INTERIOR:
        # Interior tiles [full_tile_begin, full_tile_end) need no masks; the edges around them do.
        full_tile_begin = tl.minimum(tl.maximum(tl.cdiv(full_begin, TILE_N), tile_begin), tile_end)
        full_tile_end = tl.minimum(tl.maximum(full_end // TILE_N, full_tile_begin), tile_end)
    else:
        # One masked loop over every tile (the launcher's choice where it measured faster).
        full_tile_begin = tile_end
        full_tile_end = tile_end

    # ---- online softmax state -------------------------------------------------------------
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_SINKS:
        if not SPLIT_KV:  # on the split path the reduction adds the sink, once
            m_i = tl.load(Sinks + head * stride_sink).to(tl.float32) * LOG2E
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE_PADDED], dtype=tl.float32)
    acc_exp = tl.zeros([BLOCK_M], dtype=tl.int32)  # acc row i is in units of 2^-acc_exp[i] (per-token-head caches)

    block_table_row = Block_table + seq.to(tl.int64) * stride_bts
    # Three loops with the same body on purpose: MASKED must be a compile-time constant, and each
    # loop must stay a plain loop of its own for Triton's software pipeliner (a branch between the
    # two bodies inside one loop would defeat both).
    for kv_tile in range(tile_begin, full_tile_begin):
        acc, m_i, l_i, acc_exp = _attend_kv_tile(
            acc, m_i, l_i, acc_exp, q, kv_tile, kv_begin, kv_end, pos, row_valid, offs_d, d_valid, kv_head,
            block_table_row, K_cache, V_cache, K_scale_cache, V_scale_cache,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            stride_kscb, stride_kscs, stride_ksch, stride_vscb, stride_vscs, stride_vsch,
            qk_scale, logits_soft_cap, alibi_slope_log2, sliding_window,
            BLOCK_SIZE, TILE_N, HEAD_SIZE, HEAD_SIZE_PADDED, KV_QUANT, Q_FP8, Q.dtype.element_ty,
            IS_CAUSAL, USE_SLIDING_WINDOW, USE_SOFTCAP, USE_ALIBI, USE_PTX, WIDE_OFFSETS, True)
    for kv_tile in range(full_tile_begin, full_tile_end):
        acc, m_i, l_i, acc_exp = _attend_kv_tile(
            acc, m_i, l_i, acc_exp, q, kv_tile, kv_begin, kv_end, pos, row_valid, offs_d, d_valid, kv_head,
            block_table_row, K_cache, V_cache, K_scale_cache, V_scale_cache,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            stride_kscb, stride_kscs, stride_ksch, stride_vscb, stride_vscs, stride_vsch,
            qk_scale, logits_soft_cap, alibi_slope_log2, sliding_window,
            BLOCK_SIZE, TILE_N, HEAD_SIZE, HEAD_SIZE_PADDED, KV_QUANT, Q_FP8, Q.dtype.element_ty,
            IS_CAUSAL, USE_SLIDING_WINDOW, USE_SOFTCAP, USE_ALIBI, USE_PTX, WIDE_OFFSETS, False)
    for kv_tile in range(full_tile_end, tile_end):
        acc, m_i, l_i, acc_exp = _attend_kv_tile(
            acc, m_i, l_i, acc_exp, q, kv_tile, kv_begin, kv_end, pos, row_valid, offs_d, d_valid, kv_head,
            block_table_row, K_cache, V_cache, K_scale_cache, V_scale_cache,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            stride_kscb, stride_kscs, stride_ksch, stride_vscb, stride_vscs, stride_vsch,
            qk_scale, logits_soft_cap, alibi_slope_log2, sliding_window,
            BLOCK_SIZE, TILE_N, HEAD_SIZE, HEAD_SIZE_PADDED, KV_QUANT, Q_FP8, Q.dtype.element_ty,
            IS_CAUSAL, USE_SLIDING_WINDOW, USE_SOFTCAP, USE_ALIBI, USE_PTX, WIDE_OFFSETS, True)
    if PER_TOKEN_HEAD:
        acc = acc * _pow2(-acc_exp)[:, None]

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
    num_splits, stride_sink,  #
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
        sink_log2 = tl.load(Sinks + head * stride_sink).to(tl.float32) * LOG2E
        m_max = tl.maximum(m_max, sink_log2)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.math.exp2(m_split - m_safe)
    l_total = tl.sum(l_split * weight, 0)
    if USE_SINKS:
        l_total += tl.math.exp2(sink_log2 - m_safe)
    acc_total = tl.sum(acc * weight[:, None], 0)

    out = _finish_output(acc_total, l_total, V_scale, Output_scale, Out.dtype.element_ty, KV_QUANT, OUT_FP8)
    tl.store(Out + token * stride_ot + head * stride_oh + offs_d * stride_od, out, mask=d_valid)
