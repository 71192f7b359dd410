"""The float64 oracle: deliberately naive, independent of every backend.

One loop over sequences, one over query heads, one over query tokens, all in
float64 on the CPU, written from DESIGN.md's semantics alone. It shares no
code with `backends/` (not even dequantization), so a bug there cannot hide
by being repeated here. Slow by design: only tests call it, on small shapes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def _dequantize_cache(cache: torch.Tensor, scale: Optional[torch.Tensor], scale_cache: Optional[torch.Tensor]):
    values = cache.detach().cpu().to(torch.float64)
    if scale is not None:
        values = values * float(scale.detach().cpu().reshape(-1)[0])
    if scale_cache is not None:
        values = values * scale_cache.detach().cpu().to(torch.float64)[..., None]
    return values


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
            for i in range(q_len):
                pos = kv_len - q_len + i
                scores = []
                visible = []
                for j in range(kv_len):
                    if causal and j > pos:
                        continue
                    if sliding_window is not None and pos - j >= sliding_window:
                        continue
                    s = scale * float(torch.dot(qd[q_start + i, head], keys[j, kv_head]))
                    if logits_soft_cap is not None:
                        s = logits_soft_cap * math.tanh(s / logits_soft_cap)
                    if alibi_slopes is not None:
                        s += float(alibi_slopes[head]) * (j - pos)
                    scores.append(s)
                    visible.append(j)
                if not visible:
                    continue
                m = max(scores)
                sink = float(sinks[head]) if sinks is not None else None
                if sink is not None:
                    m = max(m, sink)
                weights = [math.exp(s - m) for s in scores]
                denominator = sum(weights) + (math.exp(sink - m) if sink is not None else 0.0)
                acc = torch.zeros(head_size, dtype=torch.float64)
                acc_abs = torch.zeros(head_size, dtype=torch.float64)
                for w, j in zip(weights, visible):
                    acc += w * values[j, kv_head]
                    acc_abs += w * values[j, kv_head].abs()
                out[q_start + i, head] = acc / denominator
                out_abs[q_start + i, head] = acc_abs / denominator
    return (out, out_abs) if with_abs else out
