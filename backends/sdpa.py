"""PyTorch backend: gather pages, dequantize, then SDPA (or explicit fp32 math), bounded in memory.

The complete fallback: it runs every config the config rules allow, on CPU
and CUDA, so `auto` always has somewhere correct to go. It gathers pages
through `block_table`, dequantizes the cache (real = stored * scale, per
tensor or per token and head), and then
  - calls `torch.nn.functional.scaled_dot_product_attention` when the features
    are expressible as an attention mask (causal, sliding window, ALiBi);
  - computes softmax explicitly in float32 for softcap and sinks, which SDPA
    has no way to express.

Precision (`compute_dtype`): a 16-bit query over an unquantized cache of the
same dtype computes in that dtype through SDPA, like any 16-bit kernel
(softcap and sinks: in float32 on those exact 16-bit values). Everything
else computes in float32: an fp8 query (dequantized with q_scale), and
every quantized cache (FP8 per tensor, FP8/INT8 per token and head).
Dequantizing into the 16-bit query dtype instead would round each real key
to 8 (bf16) mantissa bits; with large per-token scales the scores grow with
them, and a relative error of 2^-9 on a score of a few hundred moves the
softmax by several percent. In float32 the dequantization (stored * scale) and the
scores carry relative errors near 2^-24.

Memory: the query dimension is chunked so that one step holds at most
`MAX_SCORE_ELEMENTS` score elements (the [heads, queries, keys] product, its
mask or ALiBi bias and its softmax temporaries are each that size); the
quadratic term of a long prefill never exists at once. Beyond that a step
holds one sequence's dequantized K/V (linear in its length).

Speed: sequences with at most `DECODE_MAX_Q_LEN` query tokens (decode,
speculative decode) run as batches: their pages are gathered at once, padded
to the longest KV length of the batch, masked by `seq_lens`, and attended in
one call; batches are cut so that each stays within the same element budget.
Longer sequences (prefill) run one by one, chunked as above.

Not CUDA-graph safe: lengths are read on the host once per call (one
`.tolist()`), since SDPA needs host-side shapes, and the used page ids' range
is read once more to refuse out-of-range ids. The capability record says so
(`cuda_graph_safe=False`). Those host values also give the bounds checks
below for free: malformed `cu_seqlens_q`, `seq_lens` shorter than the query,
a `block_table` too narrow for `seq_lens`, an empty cache and page ids out of
range raise InputError instead of reading the wrong memory.

Strides: any input may be a strided view (vLLM's split of a packed K/V cache,
`as_strided` scale caches, `x[::2]` slopes, slices of larger buffers); every
read goes through indexing ops that honour strides, and `out` may be strided.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dispatch.capabilities import Capability
from dispatch.config import KV_CACHE_DTYPES, OUT_DTYPES, Q_DTYPES, AttentionConfig, KVQuantMode
from dispatch.errors import InputError

__all__ = ["CAPABILITY", "forward", "compute_dtype", "MAX_SCORE_ELEMENTS", "DECODE_MAX_Q_LEN"]

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

# Score elements ([heads, query rows, keys]) one step may hold: 2^25 is 128 MiB in float32. The peak of a step is
# a small multiple of it (scores, mask or bias, softmax temporaries) plus one sequence's K/V.
MAX_SCORE_ELEMENTS = 1 << 25
# Sequences with at most this many query tokens are batched together (padded to the longest of the batch).
DECODE_MAX_Q_LEN = 8


def compute_dtype(config: AttentionConfig) -> torch.dtype:
    """The precision sdpa promises, the dtype whose roundings bound its error: the query's 16-bit dtype only when
    nothing is dequantized (16-bit query, unquantized cache of the same dtype), float32 otherwise. (Softcap and
    sinks always take the explicit float32 softmax, on values that 16 bits hold exactly: no less accurate.)"""
    if config.q_is_fp8 or config.kv_quant_mode is not KVQuantMode.NONE:
        return torch.float32
    return config.q_torch_dtype


def _needs_explicit_softmax(config: AttentionConfig) -> bool:
    """Softcap and sinks need the scores themselves, which SDPA does not expose."""
    return config.logits_soft_cap is not None or config.use_sinks


# ---------------------------------------------------------------------------------------------------------------
# Bounds checks on the host values the backend reads anyway.


def _check_lengths(starts: list[int], kv_lens: list[int], num_tokens: int) -> list[int]:
    """Query lengths from cu_seqlens_q; InputError for offsets or KV lengths that cannot be right."""
    if len(starts) != len(kv_lens) + 1:
        raise InputError(f"cu_seqlens_q: expected num_seqs + 1 = {len(kv_lens) + 1} offsets (num_seqs from "
                         f"seq_lens), got {len(starts)}")
    if starts[0] != 0:
        raise InputError(f"cu_seqlens_q: expected cu_seqlens_q[0] == 0, got {starts[0]}")
    q_lens = [end - start for start, end in zip(starts, starts[1:])]
    for seq, q_len in enumerate(q_lens):
        if q_len < 0:
            raise InputError(f"cu_seqlens_q: expected non-decreasing offsets, got {starts[seq]} then "
                             f"{starts[seq + 1]} at sequence {seq}")
    if starts[-1] != num_tokens:
        raise InputError(f"cu_seqlens_q: expected cu_seqlens_q[-1] == num_tokens={num_tokens} (q.shape[0]), "
                         f"got {starts[-1]}")
    for seq, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        if kv_len < q_len:
            raise InputError(f"seq_lens: sequence {seq} has kv_len={kv_len} < its q_len={q_len}; seq_lens counts "
                             "context + new tokens, so it is at least the number of query tokens")
    return q_lens


def _check_pages(kv_lens: list[int], pages_needed: list[int], block_table: torch.Tensor, num_blocks: int,
                 used_columns: torch.Tensor) -> None:
    """InputError for a table of the wrong height or narrower than seq_lens needs, an empty cache, or a used page
    id not in [0, num_blocks). `used_columns`: bool [num_seqs, max pages needed], True where a sequence reads that
    column."""
    if block_table.shape[0] != len(kv_lens):
        raise InputError(f"block_table: expected one row per sequence ({len(kv_lens)}, from seq_lens), got shape "
                         f"{tuple(block_table.shape)}")
    width = block_table.shape[1]
    for seq, (kv_len, pages) in enumerate(zip(kv_lens, pages_needed)):
        if pages > width:
            raise InputError(f"block_table: sequence {seq} needs {pages} pages for kv_len={kv_len}, but the table "
                             f"has {width} columns (shape {tuple(block_table.shape)})")
    most = used_columns.shape[1]
    if most == 0:
        return
    if num_blocks == 0:
        raise InputError(f"key_cache: expected at least one block for seq_lens needing up to {most} pages, "
                         "got num_blocks=0")
    used = block_table[:, :most]
    # One host read for the range of every used id: min over unused columns sees int32 max, max sees -1.
    lowest = torch.where(used_columns, used, torch.iinfo(torch.int32).max).min()
    highest = torch.where(used_columns, used, -1).max()
    low, high = torch.stack([lowest, highest]).tolist()
    if low >= 0 and high < num_blocks:
        return
    bad = used_columns & ((used < 0) | (used >= num_blocks))
    seq, column = (int(i) for i in bad.nonzero()[0])
    raise InputError(f"block_table: sequence {seq}, column {column}: page id {int(used[seq, column])} not in "
                     f"[0, {num_blocks}) (num_blocks of key_cache)")


# ---------------------------------------------------------------------------------------------------------------
# Gather, dequantize, attend.


def _dequantize(stored: torch.Tensor, scale: Optional[torch.Tensor], token_scales: Optional[torch.Tensor],
                dtype: torch.dtype) -> torch.Tensor:
    """Real values in `dtype`: stored * scale (per tensor) * token_scales (per token and head, [..., H_kv]).
    Scales multiply in float32, whatever `dtype` is."""
    if scale is None and token_scales is None:
        return stored.to(dtype)
    # A fresh float32 copy (copy=True even if stored were float32), so the scales can multiply in place.
    real = stored.to(torch.float32, copy=True)
    if scale is not None:
        real.mul_(scale.reshape(()))
    if token_scales is not None:
        real.mul_(token_scales[..., None])
    return real.to(dtype)


def _gather(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """cache [num_blocks, block_size, *rest], pages long [N, P] -> [N, length, *rest], length <= P * block_size."""
    n, p = pages.shape
    gathered = cache.index_select(0, pages.reshape(-1))
    return gathered.reshape(n, p * cache.shape[1], *cache.shape[2:])[:, :length]


def _gather_kv(key_cache, value_cache, pages, kv_lens, length, dtype, padded, *, k_scale, v_scale,
               k_scale_cache, v_scale_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The real K and V of N sequences, each [N, length, H_kv, D] in `dtype`.

    pages: long [N, P] page ids; kv_lens: long [N]. With `padded` (some kv_len < length), positions at or beyond
    a sequence's kv_len are set to zero: they are masked out, but a NaN there would still poison P @ V.
    """
    token_k = _gather(k_scale_cache, pages, length) if k_scale_cache is not None else None
    token_v = _gather(v_scale_cache, pages, length) if v_scale_cache is not None else None
    k = _dequantize(_gather(key_cache, pages, length), k_scale, token_k, dtype)
    v = _dequantize(_gather(value_cache, pages, length), v_scale, token_v, dtype)
    if padded:
        valid = (torch.arange(length, device=pages.device)[None, :] < kv_lens[:, None])[..., None, None]
        k = torch.where(valid, k, 0)
        v = torch.where(valid, v, 0)
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv_lens: torch.Tensor,
            config: AttentionConfig, alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor]
            ) -> torch.Tensor:
    """Attention of N sequences at once, all in the compute dtype of q.

    q: [N, Q, H, D]; k, v: [N, L, H_kv, D]; positions: long [N, Q], each query's position in its sequence;
    kv_lens: long [N], keys at or beyond it are not visible. Returns float32 [N, Q, H, D].
    Every query row must see at least one key (its own position always qualifies).
    """
    n, rows, heads, d = q.shape
    length = k.shape[1]
    kv_heads = k.shape[2]
    group = heads // kv_heads
    # Each KV head serves `group` query heads: fold them into the rows ([N, H_kv, group * Q, D], row = g * Q + i),
    # so K and V are read as they are instead of repeated per query head.
    # (contiguous: the same strides whatever view q came from, so strided inputs give bit-identical results)
    qg = q.reshape(n, rows, kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(n, kv_heads, group * rows, d)
    qg = qg.contiguous()
    kg = k.transpose(1, 2)
    vg = v.transpose(1, 2)
    key = torch.arange(length, device=q.device)
    visible = key[None, None, :] < kv_lens[:, None, None]  # [N, Q, L]
    pos = positions[..., None]
    if config.causal:
        visible = visible & (key <= pos)
    if config.sliding_window is not None:
        visible = visible & (pos - key < config.sliding_window)
    visible = visible[:, None, None].expand(n, 1, group, rows, length).reshape(n, 1, group * rows, length)
    if config.use_alibi:
        distance = (key - pos).to(torch.float32)[:, None, None]  # [N, 1, 1, Q, L]
        slopes = alibi_slopes.to(torch.float32).reshape(1, kv_heads, group, 1, 1)

    if not _needs_explicit_softmax(config):
        if config.use_alibi:
            mask = (slopes * distance).reshape(n, kv_heads, group * rows, length)
            mask = mask.masked_fill_(~visible, float("-inf")).to(qg.dtype)
        else:
            mask = visible
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=config.scale)
    else:
        # Explicit softmax (q, k, v are float32 here: compute_dtype), in place where possible.
        scores = torch.matmul(qg, kg.transpose(-1, -2)).mul_(config.scale)  # [N, H_kv, R, L]
        if config.logits_soft_cap is not None:
            cap = config.logits_soft_cap
            scores.div_(cap).tanh_().mul_(cap)
        if config.use_alibi:
            scores.view(n, kv_heads, group, rows, length).addcmul_(slopes, distance)
        scores.masked_fill_(~visible, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        if config.use_sinks:
            sink_rows = sinks.to(torch.float32).reshape(1, kv_heads, group, 1).expand(1, kv_heads, group, rows)
            sink_rows = sink_rows.reshape(1, kv_heads, group * rows, 1)
            row_max = torch.maximum(row_max, sink_rows)
        weights = scores.sub_(row_max).exp_()
        denominator = weights.sum(dim=-1, keepdim=True)
        if config.use_sinks:
            denominator = denominator + torch.exp(sink_rows - row_max)
        out = torch.matmul(weights, vg).div_(denominator)
    return out.reshape(n, kv_heads, group, rows, d).permute(0, 3, 1, 2, 4).reshape(n, rows, heads, d).float()


def _store(result: torch.Tensor, config: AttentionConfig, output_scale: Optional[torch.Tensor]) -> torch.Tensor:
    if config.out_is_fp8:
        limit = torch.finfo(config.out_torch_dtype).max
        return (result / output_scale.reshape(())).clamp(-limit, limit).to(config.out_torch_dtype)
    return result.to(config.out_torch_dtype)


def _decode_batches(seqs: list[int], q_lens: list[int], kv_lens: list[int], config: AttentionConfig
                    ) -> list[list[int]]:
    """Cut the short-query sequences into batches whose padded size stays within MAX_SCORE_ELEMENTS.

    Longest first, so each batch pads to lengths close to its own: a batch of n sequences padded to L keys
    and Q rows holds n * L * (H * Q) scores and n * L * 2 * H_kv * D dequantized K/V elements.
    """
    order = sorted(seqs, key=lambda s: kv_lens[s], reverse=True)
    rows = max(q_lens[s] for s in seqs)
    per_key = config.num_heads * rows + 2 * config.num_kv_heads * config.head_size
    batches: list[list[int]] = []
    for seq in order:
        if batches and (len(batches[-1]) + 1) * kv_lens[batches[-1][0]] * per_key <= MAX_SCORE_ELEMENTS:
            batches[-1].append(seq)
        else:
            batches.append([seq])
    return batches


def forward(
    q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, *,
    config: AttentionConfig,
    q_scale=None, k_scale=None, v_scale=None, k_scale_cache=None, v_scale_cache=None,
    alibi_slopes=None, sinks=None, output_scale=None, out=None,
) -> torch.Tensor:
    """Paged attention (see dispatch.attention for every argument's shape and dtype) into `out` or a new tensor
    [num_tokens, num_heads, head_size] in config.out_dtype. Raises InputError for lengths, table widths and page
    ids that do not fit the inputs."""
    num_tokens = q.shape[0]
    device = q.device
    if out is None:
        out = torch.empty(num_tokens, config.num_heads, config.head_size, dtype=config.out_torch_dtype, device=device)
    bs = config.block_size
    # The host read of this backend (see the module docstring).
    starts = cu_seqlens_q.tolist()
    kv_lens = seq_lens.tolist()
    q_lens = _check_lengths(starts, kv_lens, num_tokens)
    pages_needed = [-(-kv_len // bs) for kv_len in kv_lens]
    most_pages = max(pages_needed, default=0)
    needed = torch.tensor(pages_needed, dtype=torch.long, device=device)
    used_columns = torch.arange(most_pages, device=device)[None, :] < needed[:, None]
    _check_pages(kv_lens, pages_needed, block_table, key_cache.shape[0], used_columns)

    # K and V are gathered into the dtype the attention runs in; the explicit softmax works in float32, so its
    # 16-bit K/V convert once here (exactly) instead of once per query chunk.
    dtype = torch.float32 if _needs_explicit_softmax(config) else compute_dtype(config)
    q_real = _dequantize(q, q_scale, None, dtype)
    per_token_head = config.kv_quant_mode.is_per_token_head
    scales = dict(k_scale=k_scale, v_scale=v_scale, k_scale_cache=k_scale_cache if per_token_head else None,
                  v_scale_cache=v_scale_cache if per_token_head else None)
    # Unused columns may hold anything (even ids out of range): read page 0 there, masked out afterwards.
    safe_table = torch.where(used_columns, block_table[:, :most_pages], 0).to(torch.long)

    decode = [s for s in range(len(kv_lens)) if 0 < q_lens[s] <= DECODE_MAX_Q_LEN]
    prefill = [s for s in range(len(kv_lens)) if q_lens[s] > DECODE_MAX_Q_LEN]

    for batch in (_decode_batches(decode, q_lens, kv_lens, config) if decode else []):
        rows = max(q_lens[s] for s in batch)
        length = max(kv_lens[s] for s in batch)
        # Host-built indices, one copy to the device each, so no step below waits on the GPU.
        # Query rows are padded to `rows` by repeating each sequence's last token; their outputs are dropped.
        last_row = [[min(i, q_lens[s] - 1) for i in range(rows)] for s in batch]
        tokens = torch.tensor([[starts[s] + i for i in r] for s, r in zip(batch, last_row)], device=device)
        positions = torch.tensor([[kv_lens[s] - q_lens[s] + i for i in r] for s, r in zip(batch, last_row)],
                                 device=device)
        real_rows = torch.tensor([b * rows + i for b, s in enumerate(batch) for i in range(q_lens[s])], device=device)
        real_tokens = torch.tensor([starts[s] + i for s in batch for i in range(q_lens[s])], device=device)
        lens = torch.tensor([kv_lens[s] for s in batch], dtype=torch.long, device=device)
        pages = safe_table[torch.tensor(batch, device=device), : -(-length // bs)]
        padded = min(kv_lens[s] for s in batch) < length
        k, v = _gather_kv(key_cache, value_cache, pages, lens, length, dtype, padded, **scales)
        result = _attend(q_real[tokens], k, v, positions, lens, config, alibi_slopes, sinks)
        result = result.reshape(-1, config.num_heads, config.head_size).index_select(0, real_rows)
        out[real_tokens] = _store(result, config, output_scale)

    for seq in prefill:
        q_start, q_len, kv_len = starts[seq], q_lens[seq], kv_lens[seq]
        lens = torch.tensor([kv_len], dtype=torch.long, device=device)
        k, v = _gather_kv(key_cache, value_cache, safe_table[seq : seq + 1, : pages_needed[seq]], lens, kv_len,
                          dtype, False, **scales)
        chunk = max(1, MAX_SCORE_ELEMENTS // (config.num_heads * kv_len))
        for first in range(0, q_len, chunk):
            last = min(first + chunk, q_len)
            positions = torch.arange(kv_len - q_len + first, kv_len - q_len + last, device=device)[None]
            result = _attend(q_real[None, q_start + first : q_start + last], k, v, positions, lens,
                             config, alibi_slopes, sinks)
            out[q_start + first : q_start + last] = _store(result[0], config, output_scale)
    return out
