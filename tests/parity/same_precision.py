"""A plain same-precision attention: the yardstick for how much error the arithmetic itself causes.

flash-attention's test rule: a kernel's error against an exact reference may
be at most k times the error of a straightforward implementation in the same
precision. This is that implementation, in PyTorch, one sequence at a time:
Q K^T and P V as matmuls in the query's 16-bit dtype (P rounded to it), the
softmax in float32; for an FP8 query, both products in float32 on the
dequantized values with P rounded to float8_e4m3fn, as FP8 kernels do for
their PV dot. The result is rounded to the output dtype like a backend's.
"""

from __future__ import annotations

import torch

from dispatch.config import AttentionConfig
from dispatch.testing import AttentionInputs, apply_score_rules, gather_sequence, output_as_real


def _real(stored, scale=None, token_scales=None) -> torch.Tensor:
    x = stored.float()
    if scale is not None:
        x = x * scale.float().reshape(())
    if token_scales is not None:
        x = x * token_scales.float()[..., None]
    return x


def same_precision_attention(inputs: AttentionInputs, config: AttentionConfig) -> torch.Tensor:
    """Real values (float64, CPU) of a plain same-precision computation, rounded to out_dtype."""
    kw = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.kwargs.items()}
    fp8_query = config.q_is_fp8
    dtype = torch.float32 if fp8_query else config.q_torch_dtype
    q = _real(inputs.q.cpu(), kw.get("q_scale")).to(dtype)
    k = _real(inputs.key_cache.cpu(), kw.get("k_scale"), kw.get("k_scale_cache")).to(dtype)
    v = _real(inputs.value_cache.cpu(), kw.get("v_scale"), kw.get("v_scale_cache")).to(dtype)
    starts = inputs.cu_seqlens_q.cpu().tolist()
    table = inputs.block_table.cpu().long()
    out = torch.zeros(q.shape, dtype=torch.float32)
    for seq, kv_len in enumerate(inputs.seq_lens.cpu().tolist()):
        q_start, q_end = starts[seq], starts[seq + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        keys = gather_sequence(k, table[seq], kv_len, config).transpose(0, 1)  # [H, kv, D]
        values = gather_sequence(v, table[seq], kv_len, config).transpose(0, 1)
        scores = torch.matmul(q[q_start:q_end].transpose(0, 1), keys.transpose(1, 2)).float() * config.scale
        scores = apply_score_rules(scores, kv_len, config, kw.get("alibi_slopes"))
        row_max = scores.amax(-1, keepdim=True)
        if config.use_sinks:
            row_max = torch.maximum(row_max, kw["sinks"].float()[:, None, None])
        p = torch.exp(scores - row_max)
        denominator = p.sum(-1, keepdim=True)
        if config.use_sinks:
            denominator = denominator + torch.exp(kw["sinks"].float()[:, None, None] - row_max)
        p_rounded = p.to(torch.float8_e4m3fn).float() if fp8_query else p.to(dtype)
        out[q_start:q_end] = (torch.matmul(p_rounded, values).float() / denominator).transpose(0, 1)
    if config.out_is_fp8:
        limit = torch.finfo(config.out_torch_dtype).max
        stored = (out / kw["output_scale"].reshape(())).clamp(-limit, limit).to(config.out_torch_dtype)
    else:
        stored = out.to(config.out_torch_dtype)
    return output_as_real(stored, config, inputs)
