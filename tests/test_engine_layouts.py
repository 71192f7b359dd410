"""The tensors engines actually hold run on every backend, without copies, with the numbers of contiguous inputs.

vLLM keeps one cache tensor per layer, logically [num_blocks, num_kv_heads, block_size, 2 * head_size]
with K and V packed in the last dimension (physically NHD by default, HND with its layout switch), and
splits it with ``kv_cache.transpose(1, 2).split(head_size, -1)``; its per-token-head scale caches are
``as_strided`` views; q is a slice of a fused QKV projection and out a slice of a step buffer. ALiBi
slopes and sinks may be strided too (``param[:, 0]``). Each backend must give bit-identical results for
such views and for contiguous copies, and the views must take attention()'s fast path.
"""

from __future__ import annotations

import pytest
import torch

import dispatch
from dispatch import AttentionConfig, registry
from dispatch.testing import engine_views, make_inputs

CONFIGS = {
    "fp16": dict(q_dtype="float16", kv_cache_dtype="float16"),
    "bf16": dict(q_dtype="bfloat16", kv_cache_dtype="bfloat16"),
    "fp16q-fp8kv": dict(q_dtype="float16", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
    "fp8q-fp8kv": dict(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
    "fp16q-int8kv-pth": dict(q_dtype="float16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD"),
    "fp16q-fp8kv-pth-alibi-sinks": dict(q_dtype="float16", kv_cache_dtype="float8_e4m3fn",
                                        kv_quant_mode="FP8_PER_TOKEN_HEAD", use_alibi=True, use_sinks=True),
}


def _cases(device: str):
    for backend in registry.backend_names():
        for label in CONFIGS:
            for layout in ("NHD", "HND"):
                yield pytest.param(backend, label, layout, device, id=f"{backend}-{label}-{layout}")


def _check_views_match_copies(backend: str, label: str, layout: str, device: str) -> None:
    config = AttentionConfig(num_heads=8, num_kv_heads=2, head_size=64, block_size=16, backend=backend,
                             **CONFIGS[label])
    report = dispatch.explain(config, device).report(backend)
    if not report.supported:
        pytest.skip(f"{backend} cannot run {label} on {device}: {'; '.join(report.reasons)}")
    inputs = make_inputs(config, [1, 16, 3, 17], [1, 40, 129, 17], device=device, seed=3)
    views = engine_views(inputs, config, layout)
    # Nothing in `views` is contiguous but the index tensors, and every value equals the input's.
    for name in ("q", "key_cache", "value_cache", "out", *[k for k in views.kwargs if k != "out"]):
        tensor = views.q if name == "q" else views.kwargs.get(name, getattr(views, name, None))
        if tensor is not None and tensor.numel() > 1:
            assert not tensor.is_contiguous(), name
    spec = dispatch.api._spec_for(config)
    values = dict(zip(dispatch.api._NAMES, [*views.args] + [None] * 9))
    values.update(views.kwargs)
    assert spec.fast_check(*values.values()) is not None, "engine views fell off the fast path"

    expected = dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
    out = dispatch.attention(*views.args, config=config, **views.kwargs)
    assert out is views.kwargs["out"]
    assert torch.equal(out.float(), expected.float()) or (
        torch.isnan(expected).any() and torch.equal(out.float().nan_to_num(), expected.float().nan_to_num())), (
        f"{backend} {label} {layout}: strided views differ from contiguous copies by "
        f"{float((out.float() - expected.float()).abs().max())}")


@pytest.mark.parametrize("backend,label,layout,device", list(_cases("cpu")))
def test_engine_views_match_contiguous_copies_cpu(backend, label, layout, device):
    _check_views_match_copies(backend, label, layout, device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,label,layout,device", list(_cases("cuda")))
def test_engine_views_match_contiguous_copies_gpu(backend, label, layout, device):
    _check_views_match_copies(backend, label, layout, device)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_strided_alibi_slopes_and_sinks(backend):
    """The slopes of issue 15 with stride 2, and sinks as param[:, 0]: the triton backend ignored both
    strides (1.16 and 1.3e-2 off sdpa) while every check passed."""
    config = AttentionConfig(num_heads=8, num_kv_heads=2, head_size=32, backend=backend, q_dtype="float16",
                             kv_cache_dtype="float16", use_alibi=True, use_sinks=True)
    if not dispatch.explain(config, "cpu").report(backend).supported:
        pytest.skip(f"{backend} not available here")
    inputs = make_inputs(config, [1, 5, 17], [9, 17, 40], seed=11)
    slopes = torch.tensor([1, .25, .0625, .015625]).repeat_interleave(2)
    strided_slopes = slopes.repeat_interleave(2)[::2]
    assert strided_slopes.stride() == (2,) and torch.equal(strided_slopes, slopes)
    sinks = torch.linspace(-1, 2, 8)
    strided_sinks = torch.stack([sinks, -sinks], 1)[:, 0]
    contiguous = dispatch.attention(*inputs.args, config=config,
                                    **dict(inputs.kwargs, alibi_slopes=slopes, sinks=sinks))
    strided = dispatch.attention(*inputs.args, config=config,
                                 **dict(inputs.kwargs, alibi_slopes=strided_slopes, sinks=strided_sinks))
    assert torch.equal(strided, contiguous)
