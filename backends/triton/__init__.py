"""The Triton backend: our scaled, unified paged-attention kernel.

`CAPABILITY` says what it computes; `forward()` runs it. Importing this module
does not import triton (the dispatcher reads CAPABILITY before choosing a
backend); `forward()` loads the launcher on first use. The kernel and its
algorithm are described in `kernel.py`, tiles and the split-KV heuristic in
`launcher.py`.
"""

from __future__ import annotations

from typing import Optional

import torch

from dispatch.capabilities import Capability, DeviceInfo
from dispatch.config import AttentionConfig, KVQuantMode

__all__ = ["CAPABILITY", "forward"]


def _cpu_needs_interpreter(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """On the CPU only under Triton's interpreter (TRITON_INTERPRET=1)."""
    if device.type == "cpu" and not device.triton_interpret:
        return ["device='cpu' needs TRITON_INTERPRET=1 (Triton runs on CPU only through its interpreter)"]
    return []


def _interpreter_numerics(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """On the CPU, no bfloat16 dots or outputs and no fp8 output: the interpreter computes them wrongly (triton 3.9).

    Measured with triton 3.9; re-check on upgrade. The kernel is right on the GPU for all of
    these; on CPU they are refused rather than wrong.
    """
    if device.type != "cpu":
        return []
    problems = []
    # A bf16 query meets a bf16 dot only with a 16-bit cache: against a quantized cache the kernel
    # moves it to fp16 first (kernel.py), which the interpreter computes right.
    bf16_fields = [
        f
        for f in ("q_dtype", "kv_cache_dtype", "out_dtype")
        if getattr(config, f) == "bfloat16" and not (f == "q_dtype" and config.kv_quant_mode != KVQuantMode.NONE)
    ]
    if bf16_fields:
        problems.append(
            f"{', '.join(f + '=bfloat16' for f in bf16_fields)} not supported on device='cpu': under the Triton "
            "interpreter bfloat16 dots multiply raw bit patterns (triton issue 11584) and fp32->bfloat16 casts truncate"
        )
    if config.out_is_fp8:
        problems.append(
            f"out_dtype={config.out_dtype} not supported on device='cpu': the Triton interpreter mis-rounds "
            "fp32->e4m3 casts (1.97 becomes 1.0)"
        )
    return problems


CAPABILITY = Capability(
    description="Triton unified paged attention (prefill + decode in one launch), FP8/INT8 KV caches with scales",
    q_dtypes=frozenset({"float16", "bfloat16", "float8_e4m3fn"}),
    kv_cache_dtypes=frozenset({"float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8"}),
    out_dtypes=frozenset({"float16", "bfloat16", "float32", "float8_e4m3fn"}),
    kv_quant_modes=frozenset(KVQuantMode),
    devices=frozenset({"cuda", "cpu"}),
    max_head_size=256,
    head_size_multiple=8,
    block_size_multiple=16,
    features=frozenset({"causal", "non_causal", "sliding_window", "softcap", "alibi", "sinks"}),
    min_compute_capability=(8, 0),
    min_compute_capability_by_dtype=(("float8_e4m3fn", (8, 9)), ("float8_e5m2", (8, 9))),
    required_modules=("triton",),
    cuda_graph_safe=True,
    fp8_query_p_dtype="float16",  # P @ V on 16-bit tensor cores even for an fp8 query: see kernel.py
    extra_rules=(_cpu_needs_interpreter, _interpreter_numerics),
)


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
    """Paged, variable-length attention; arguments already validated by the dispatcher.

    q              [num_tokens, num_heads, head_size], config.q_dtype
    key_cache      [num_blocks, block_size, num_kv_heads, head_size], config.kv_cache_dtype
    value_cache    same as key_cache
    cu_seqlens_q   int32 [num_seqs + 1], query start offsets
    seq_lens       int32 [num_seqs], KV length of each sequence (context + new tokens)
    block_table    int32 [num_seqs, max_blocks_per_seq], page ids
    q_scale, k_scale, v_scale, output_scale
                   fp32, one element, on the device (read by the kernel, never on the host)
    k_scale_cache, v_scale_cache
                   fp32 [num_blocks, block_size, num_kv_heads] (per-token-head modes)
    alibi_slopes, sinks
                   fp32 [num_heads]
    out            optional [num_tokens, num_heads, head_size] in config.out_dtype

    Returns [num_tokens, num_heads, head_size] in config.out_dtype (`out` when given).
    """
    from . import launcher

    return launcher.unified_attention(
        q,
        key_cache,
        value_cache,
        cu_seqlens_q,
        seq_lens,
        block_table,
        config=config,
        q_scale=q_scale,
        k_scale=k_scale,
        v_scale=v_scale,
        k_scale_cache=k_scale_cache,
        v_scale_cache=v_scale_cache,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        output_scale=output_scale,
        out=out,
    )
