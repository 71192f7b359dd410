"""Plain PyTorch attention, vectorized: the same-precision yardstick, and its float64 twin for large shapes.

flash-attention's test rule: a kernel's error against an exact reference may
be at most k times the error of a straightforward implementation in the same
precision (its `attention_ref`, run with and without upcasting). This module
is that straightforward implementation, the only one besides the oracle:

- `same_precision_attention(inputs, config)` is the yardstick. One sequence at
  a time: Q K^T and P V as matmuls in the query's 16-bit dtype (P rounded to
  it), the softmax in float32; for an FP8 query, both products in float32 on
  the dequantized values with P rounded to float8_e4m3fn, as FP8 kernels do
  for their PV dot. The result is rounded to the output dtype like a backend's.
- `float64_attention(inputs, config)` (and `float64_weights`, which yields the
  softmax weights for tests that derive error bounds from them) runs the same
  gather and masks in float64 with no rounding at all. It exists only for
  shapes where the naive oracle (dispatch/reference.py) would take hours: the
  GPU tests at thousands of tokens. It is trusted because
  tests/test_testing_helpers.py checks it against the oracle to 1e-12 on every
  KV mode and feature; everything else is judged by the oracle itself.

Both run on the inputs' device and return float64 there. Neither shares code
with backends/ (nor with the oracle, which must stay independent of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from dispatch.config import AttentionConfig
from dispatch.testing import AttentionInputs

__all__ = ["same_precision_attention", "output_rounding_error", "float64_attention", "float64_weights", "Weights"]


def _real(stored: torch.Tensor, scale: Optional[torch.Tensor], token_scales: Optional[torch.Tensor],
          work: torch.dtype) -> torch.Tensor:
    """Dequantize in `work` (float32 or float64): stored * scale, each token row times its scale."""
    x = stored.to(work)
    if scale is not None:
        x = x * scale.to(work).reshape(())
    if token_scales is not None:
        x = x * token_scales.to(work)[..., None]
    return x


def _gather(cache: torch.Tensor, table_row: torch.Tensor, kv_len: int, config: AttentionConfig) -> torch.Tensor:
    """[num_blocks, block_size, H_kv, D] -> one sequence's first kv_len tokens, each KV head repeated
    for the query heads of its group: [kv_len, H, D]."""
    pages = table_row[: math.ceil(kv_len / config.block_size)].long()
    return cache[pages].flatten(0, 1)[:kv_len].repeat_interleave(config.num_queries_per_kv, dim=1)


def _score_rules(scores: torch.Tensor, first_row: int, q_len: int, kv_len: int, config: AttentionConfig,
                 alibi_slopes: Optional[torch.Tensor]) -> torch.Tensor:
    """Scaled scores [H, rows, kv_len] of query rows first_row.. of a sequence -> softcap, ALiBi, then
    -inf where a key is not visible (bottom-right causal, sliding window), in the dtype of `scores`."""
    device = scores.device
    rows = scores.shape[-2]
    if config.logits_soft_cap is not None:
        scores = config.logits_soft_cap * torch.tanh(scores / config.logits_soft_cap)
    pos = (kv_len - q_len + first_row + torch.arange(rows, device=device))[:, None]
    key = torch.arange(kv_len, device=device)[None, :]
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.to(scores.dtype)[:, None, None] * (key - pos).to(scores.dtype)
    visible = torch.ones(rows, kv_len, dtype=torch.bool, device=device)
    if config.causal:
        visible &= key <= pos
    if config.sliding_window is not None:
        visible &= pos - key < config.sliding_window
    return scores.masked_fill(~visible, float("-inf"))


def same_precision_attention(inputs: AttentionInputs, config: AttentionConfig) -> torch.Tensor:
    """Real values (float64, on the inputs' device) of a plain same-precision computation, rounded to
    out_dtype: [num_tokens, num_heads, head_size]."""
    kw = inputs.kwargs
    device = inputs.q.device
    fp8_query = config.q_is_fp8
    dtype = torch.float32 if fp8_query else config.q_torch_dtype
    q = _real(inputs.q, kw.get("q_scale"), None, torch.float32).to(dtype)
    k = _real(inputs.key_cache, kw.get("k_scale"), kw.get("k_scale_cache"), torch.float32).to(dtype)
    v = _real(inputs.value_cache, kw.get("v_scale"), kw.get("v_scale_cache"), torch.float32).to(dtype)
    starts = inputs.cu_seqlens_q.tolist()
    table = inputs.block_table.long()
    sinks = kw["sinks"].float()[:, None, None] if config.use_sinks else None
    out = torch.zeros(q.shape, dtype=torch.float32, device=device)
    for seq, kv_len in enumerate(inputs.seq_lens.tolist()):
        q_start, q_end = starts[seq], starts[seq + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        keys = _gather(k, table[seq], kv_len, config).transpose(0, 1)  # [H, kv, D]
        values = _gather(v, table[seq], kv_len, config).transpose(0, 1)
        scores = torch.matmul(q[q_start:q_end].transpose(0, 1), keys.transpose(1, 2)).float() * config.scale
        scores = _score_rules(scores, 0, q_len, kv_len, config, kw.get("alibi_slopes"))
        row_max = scores.amax(-1, keepdim=True)
        if sinks is not None:
            row_max = torch.maximum(row_max, sinks)
        p = torch.exp(scores - row_max)
        denominator = p.sum(-1, keepdim=True)
        if sinks is not None:
            denominator = denominator + torch.exp(sinks - row_max)
        p_rounded = p.to(torch.float8_e4m3fn).float() if fp8_query else p.to(dtype)
        out[q_start:q_end] = (torch.matmul(p_rounded, values).float() / denominator).transpose(0, 1)
    if config.out_is_fp8:
        output_scale = kw["output_scale"].reshape(())
        limit = torch.finfo(config.out_torch_dtype).max
        stored = (out / output_scale).clamp(-limit, limit).to(config.out_torch_dtype)
        return stored.double() * output_scale.double()
    return out.to(config.out_torch_dtype).double()


@dataclass
class Weights:
    """The float64 softmax of some query rows of one sequence (H = num_heads, c rows, kv_len keys)."""

    rows: slice  # the token rows of q / out these are
    q: torch.Tensor  # [c, H, D] dequantized queries
    keys: torch.Tensor  # [kv_len, H, D] dequantized keys, each KV head repeated for its query heads
    values: torch.Tensor  # [H, kv_len, D] dequantized values, likewise
    probs: torch.Tensor  # [H, c, kv_len] normalized weights (0 where a key is not visible)
    sink_probs: Optional[torch.Tensor]  # [H, c, 1] the sink's share of the denominator, or None

    @property
    def out(self) -> torch.Tensor:
        """Attention output of these rows: [c, H, D]."""
        return (self.probs @ self.values).transpose(0, 1)


def output_rounding_error(exact: torch.Tensor, inputs: AttentionInputs, config: AttentionConfig) -> float:
    """Max error of rounding the exact float64 result into config.out_dtype (through output_scale and the
    format's saturation for an fp8 output): no backend can beat it, so parity bounds allow for it."""
    if config.out_is_fp8:
        scale = float(inputs.kwargs["output_scale"][0])
        limit = torch.finfo(config.out_torch_dtype).max
        rounded = (exact / scale).clamp(-limit, limit).to(config.out_torch_dtype).double() * scale
    else:
        rounded = exact.to(config.out_torch_dtype).double()
    return float((rounded - exact).abs().max())


def float64_weights(inputs: AttentionInputs, config: AttentionConfig, rows_per_chunk: int = 256) -> Iterator[Weights]:
    """The exact softmax weights of every sequence, `rows_per_chunk` query rows at a time (bounded memory)."""
    kw = inputs.kwargs
    f64 = torch.float64
    q_all = _real(inputs.q, kw.get("q_scale"), None, f64)
    k = _real(inputs.key_cache, kw.get("k_scale"), kw.get("k_scale_cache"), f64)
    v = _real(inputs.value_cache, kw.get("v_scale"), kw.get("v_scale_cache"), f64)
    starts = inputs.cu_seqlens_q.tolist()
    table = inputs.block_table.long()
    slopes = kw["alibi_slopes"].to(f64) if config.use_alibi else None
    sinks = kw["sinks"].to(f64) if config.use_sinks else None
    for seq, kv_len in enumerate(inputs.seq_lens.tolist()):
        q_start, q_len = starts[seq], starts[seq + 1] - starts[seq]
        if q_len == 0:
            continue
        keys = _gather(k, table[seq], kv_len, config)  # [kv_len, H, D]
        values = _gather(v, table[seq], kv_len, config).transpose(0, 1)  # [H, kv_len, D]
        for r0 in range(0, q_len, rows_per_chunk):
            r1 = min(q_len, r0 + rows_per_chunk)
            q = q_all[q_start + r0 : q_start + r1]
            scores = torch.einsum("chd,khd->hck", q, keys) * config.scale
            scores = _score_rules(scores, r0, q_len, kv_len, config, slopes)
            if sinks is not None:
                scores = torch.cat([scores, sinks[:, None, None].expand(-1, r1 - r0, 1)], dim=-1)
            probs = torch.softmax(scores, dim=-1)
            yield Weights(rows=slice(q_start + r0, q_start + r1), q=q, keys=keys, values=values,
                          probs=probs[..., :kv_len], sink_probs=probs[..., kv_len:] if sinks is not None else None)


def float64_attention(inputs: AttentionInputs, config: AttentionConfig, rows_per_chunk: int = 256) -> torch.Tensor:
    """Exact attention (float64 on the inputs' device, not rounded to any dtype): [num_tokens, num_heads, head_size]."""
    out = torch.zeros(inputs.q.shape, dtype=torch.float64, device=inputs.q.device)
    for weights in float64_weights(inputs, config, rows_per_chunk):
        out[weights.rows] = weights.out
    return out
