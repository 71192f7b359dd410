"""The float64 oracle: deliberately naive, independent of every backend.

One loop over sequences, one over query heads, one over query tokens, one over
keys (only the dot products q . k_j and the final sum of w_j v_j are done as
float64 matrix-vector products, for speed), all in float64 on the CPU, written
from the semantics in docs/DESIGN.md alone. It imports nothing but torch: no backend, not even `dispatch.config`
(the caller passes the softmax scale, the mask and the scales it means), and
it dequantizes on its own, so a bug in a backend or in the config cannot hide
by being repeated here. Slow by design: small shapes only.

It lives in the package, not in tests/, because `python -m dispatch selftest`
needs a float64 judge in an install that has no tests folder; tests/oracle.py
re-exports it, and it is the only float64 reference that anything trusts.
tests/parity/same_precision.py holds the one other attention implementation
(plain PyTorch, vectorized: the same-precision yardstick, and in float64 a
stand-in for GPU-sized shapes), and a test ties it to this oracle.

`dispatch.testing.AttentionInputs.oracle_kwargs(config)` turns a config into
the keywords below: ``reference_attention(*inputs.args, **inputs.oracle_kwargs(config))``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["reference_attention"]


def _dequantize_cache(cache: torch.Tensor, scale: Optional[torch.Tensor], scale_cache: Optional[torch.Tensor]):
    values = cache.detach().cpu().to(torch.float64)
    if scale is not None:
        values = values * float(scale.detach().cpu().reshape(-1)[0])
    if scale_cache is not None:
        values = values * scale_cache.detach().cpu().to(torch.float64)[..., None]
    return values


def _per_head(values: Optional[torch.Tensor]) -> Optional[list[float]]:
    # Read once on the host (the inputs may live on a GPU), not once per query row.
    return None if values is None else [float(x) for x in values.detach().cpu().to(torch.float64)]


def reference_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    logits_soft_cap: Optional[float] = None,
    q_scale: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    v_scale_cache: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    with_abs: bool = False,
):
    """Real-valued attention output, float64 [num_tokens, num_heads, head_size] on the CPU.

    Takes the tensors of a `dispatch.attention` call (any device, any dtype;
    shapes as there: q [num_tokens, num_heads, head_size], caches [num_blocks,
    block_size, num_kv_heads, head_size], cu_seqlens_q int32 [num_seqs + 1],
    seq_lens int32 [num_seqs], block_table int32 [num_seqs, max_blocks_per_seq],
    scales fp32 of one element, scale caches fp32 [num_blocks, block_size,
    num_kv_heads], alibi_slopes / sinks fp32 [num_heads]).

    Every stored value is dequantized as stored.double() * scale before use.
    The output is not rounded to any output dtype: compare a backend's output
    (dequantized with output_scale for fp8) against this.

    With ``with_abs=True`` also returns sum_j p_j |v_j| (the same weights applied to
    |V|): a backend that rounds each p_j with relative error at most u is off by at
    most u times this, element by element, which gives fp8-P paths a rigorous bound.
    """
    qd = q.detach().cpu().to(torch.float64)
    if q_scale is not None:
        qd = qd * float(q_scale.detach().cpu().reshape(-1)[0])
    kd = _dequantize_cache(key_cache, k_scale, k_scale_cache)
    vd = _dequantize_cache(value_cache, v_scale, v_scale_cache)
    cu = [int(x) for x in cu_seqlens_q.cpu()]
    lens = [int(x) for x in seq_lens.cpu()]
    table = block_table.cpu()
    slopes = _per_head(alibi_slopes)
    sink_logits = _per_head(sinks)
    num_tokens, num_heads, head_size = qd.shape
    num_kv_heads = kd.shape[2]
    block_size = kd.shape[1]
    group = num_heads // num_kv_heads
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_size)
    out = torch.zeros(num_tokens, num_heads, head_size, dtype=torch.float64)
    out_abs = torch.zeros(num_tokens, num_heads, head_size, dtype=torch.float64)

    for seq in range(len(lens)):
        q_start, q_end, kv_len = cu[seq], cu[seq + 1], lens[seq]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        # Gather this sequence's keys and values token by token through the page table.
        keys = torch.stack([kd[int(table[seq, j // block_size]), j % block_size] for j in range(kv_len)])
        values = torch.stack([vd[int(table[seq, j // block_size]), j % block_size] for j in range(kv_len)])
        for head in range(num_heads):
            kv_head = head // group
            head_keys, head_values = keys[:, kv_head], values[:, kv_head]  # [kv_len, head_size]
            for i in range(q_len):
                pos = kv_len - q_len + i
                # q . k_j for every key j at once (one float64 matrix-vector product); the rules below
                # are applied key by key, straight from their definitions.
                dots = (head_keys @ qd[q_start + i, head]).tolist()
                scores = []
                visible = []
                for j in range(kv_len):
                    if causal and j > pos:
                        continue
                    if sliding_window is not None and pos - j >= sliding_window:
                        continue
                    s = scale * dots[j]
                    if logits_soft_cap is not None:
                        s = logits_soft_cap * math.tanh(s / logits_soft_cap)
                    if slopes is not None:
                        s += slopes[head] * (j - pos)
                    scores.append(s)
                    visible.append(j)
                if not visible:
                    continue
                m = max(scores)
                sink = sink_logits[head] if sink_logits is not None else None
                if sink is not None:
                    m = max(m, sink)
                weights = [math.exp(s - m) for s in scores]
                denominator = sum(weights) + (math.exp(sink - m) if sink is not None else 0.0)
                # sum_j w_j v_j over the visible keys, as one float64 vector-matrix product.
                w = torch.tensor(weights, dtype=torch.float64)
                rows = head_values[visible]
                out[q_start + i, head] = (w @ rows) / denominator
                out_abs[q_start + i, head] = (w @ rows.abs()) / denominator
    return (out, out_abs) if with_abs else out
