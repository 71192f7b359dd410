"""The Triton backend at realistic sizes on a CUDA GPU (marked gpu: skipped without one).

32 query heads, 8 KV heads, head size 128, sequences up to 8k tokens, batches
that mix decode, chunked prefill and full prefill, bf16 and fp16, every KV
quantization mode and feature, the split-KV path (by the heuristic and
forced), offsets past 2^31 elements, and CUDA-graph capture.

The reference is `reference_attention_gpu` below: the float64 softmax weights
of tests/parity/same_precision.py (`float64_weights`, the oracle's semantics
vectorized on the GPU, because the float64 loops of the oracle would take hours
at these sizes; tests/test_testing_helpers.py ties it to the oracle, and
`test_gpu_reference_agrees_with_oracle` does again on the GPU), plus the
per-element error bounds below, computed from those weights. It shares no code
with the kernel. The batches are the case table's "gpu triton" cases.

Tolerances are bounds derived per element from the reference's own softmax
weights p (normalized, the sink included), not fitted to observed errors:
- P is rounded to the P @ V dot's dtype (the query's for a 16-bit cache; fp16
  for an fp8 query and for every quantized cache, where the per-token-head
  modes round P * v_scale[j] instead) before the dot, which moves the output by
  at most u * sum_j p_j |v_j| <= u * sqrt(sum_j p_j v_j^2) (Cauchy-Schwarz);
  the bound allows 2u * that, with u the 16-bit query's unit roundoff (2^-8
  for bf16, 2^-11 for fp16; fp16's for an fp8 query). For a bf16 query with a
  quantized cache this over-covers the kernel's fp16 P; it is also the bound of
  the sdpa backend, which dequantizes into the query's dtype. fp16 P below 2^-14 is subnormal and rounds
  by up to 2^-25 absolutely: sum_j min(2^-25 p_top, p_j)(|v_j| + |o|).
- FP8 query: Q @ K^T runs on fp8 tensor cores, whose accumulation keeps only
  about 14 bits on Hopper (DeepSeek-V3 technical report, FP8 training), not 24. A
  score then errs by |ds_j| <= 2^-13 * scale * sum_d |q_d k_jd|, which moves
  the output by at most sum_j p_j |ds_j| (|v_j| + |o|) (first order; ds is
  ~1e-3, so the second-order term is below 0.1% of this).
- The output cast adds u_out * |o| (e4m3 output: 2^-4 relative and half a
  subnormal step times output_scale). Products of stored values are exact;
  fp32 sums and exp2 add ~1e-6, covered by atol 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from dispatch.capabilities import reasons, resolve_device
from dispatch.cases import case
from dispatch.config import AttentionConfig, KVQuantMode
from tests.cases import AttentionInputs, make_inputs, output_as_real, unit_roundoff
from tests.oracle import reference_attention
from tests.parity.same_precision import float64_weights

import backends.triton as triton_backend

pytestmark = pytest.mark.gpu

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 32, 8, 128
# (q_lens, kv_lens): decode (1 token against 8k, 2k, 1), full prefill (300/300) and chunked prefill (1024 new
# of 1500); and eight decode sequences of 1 to 8000 keys.
MIXED = (list(case("gpu-mixed-8k").q_lens), list(case("gpu-mixed-8k").kv_lens))
DECODE = (list(case("gpu-decode-8k").q_lens), list(case("gpu-decode-8k").kv_lens))

SLIDING_WINDOW = 1000
SOFT_CAP = 10.0
FP16_P_SUBNORMAL_ERROR = 2.0**-25
FP8_MMA_ACCUMULATION_ERROR = 2.0**-13  # relative to sum |q_d k_d|: ~14 bits kept by Hopper fp8 MMA

FEATURES = {
    "causal": dict(),
    "all-non_causal": dict(causal=False, sliding_window=SLIDING_WINDOW, logits_soft_cap=SOFT_CAP, use_alibi=True,
                           use_sinks=True),
}

# (id, q_dtype, kv_cache_dtype, mode, out_dtype or None for the default)
MODES = [
    ("none-bf16", "bfloat16", "bfloat16", KVQuantMode.NONE, None),
    ("none-fp16", "float16", "float16", KVQuantMode.NONE, None),
    ("fp8_per_tensor-e4m3-bf16", "bfloat16", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR, None),
    ("fp8_per_tensor-e5m2-fp16", "float16", "float8_e5m2", KVQuantMode.FP8_PER_TENSOR, None),
    ("fp8_per_token_head-e4m3-bf16", "bfloat16", "float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD, None),
    ("fp8_per_token_head-e5m2-fp16", "float16", "float8_e5m2", KVQuantMode.FP8_PER_TOKEN_HEAD, None),
    ("int8_per_token_head-bf16", "bfloat16", "int8", KVQuantMode.INT8_PER_TOKEN_HEAD, None),
    ("int8_per_token_head-fp16", "float16", "int8", KVQuantMode.INT8_PER_TOKEN_HEAD, None),
    ("fp8_per_tensor-fp8q-bf16out", "float8_e4m3fn", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR, None),
    ("fp8_per_tensor-fp8q-fp8out", "float8_e4m3fn", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR, "float8_e4m3fn"),
]


def make_config(q_dtype, kv_cache_dtype, kv_quant_mode, out_dtype=None, *, block_size=16, head_size=HEAD_SIZE,
                num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, **features) -> AttentionConfig:
    return AttentionConfig(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        q_dtype=q_dtype,
        kv_cache_dtype=kv_cache_dtype,
        kv_quant_mode=kv_quant_mode,
        out_dtype=out_dtype,
        block_size=block_size,
        backend="triton",
        **features,
    )


# ---------------------------------------------------------------------------------------------
# Vectorized float64 reference with per-element error bounds
# ---------------------------------------------------------------------------------------------


@dataclass
class Reference:
    out: torch.Tensor  # float64 [T, H, D]
    rms_v: torch.Tensor  # sqrt(sum_j p_j v_j^2)
    # sum_j min(2^-25 p_top, p_j) (|v_j| + |o|), p_top the largest weight (key or sink) of the row
    small_fp16: torch.Tensor
    # sum_j p_j |ds_j| (|v_j| + |o|) with |ds_j| = 2^-13 * scale * sum_d |q_d k_jd|
    fp8_qk: torch.Tensor


def reference_attention_gpu(config: AttentionConfig, inputs: AttentionInputs, rows_per_chunk: int = 256) -> Reference:
    """The exact output and the bound terms of the module docstring, float64 on the inputs' device."""
    fields = {name: torch.zeros(inputs.q.shape, dtype=torch.float64, device=inputs.q.device)
              for name in ("out", "rms_v", "small_fp16", "fp8_qk")}
    for w in float64_weights(inputs, config, rows_per_chunk):
        p, values = w.probs, w.values  # [H, c, kv_len], [H, kv_len, D]
        p_top = p.amax(-1, keepdim=True)  # the largest weight of the row, key or sink
        if w.sink_probs is not None:
            p_top = torch.maximum(p_top, w.sink_probs)
        o = p @ values  # [H, c, D]
        fields["out"][w.rows] = o.transpose(0, 1)
        fields["rms_v"][w.rows] = (p @ values.square()).sqrt().transpose(0, 1)
        c = torch.minimum(FP16_P_SUBNORMAL_ERROR * p_top, p)
        fields["small_fp16"][w.rows] = (c @ values.abs() + c.sum(-1, keepdim=True) * o.abs()).transpose(0, 1)
        score_error = FP8_MMA_ACCUMULATION_ERROR * config.scale * torch.einsum("chd,khd->hck", w.q.abs(), w.keys.abs())
        c = p * score_error
        fields["fp8_qk"][w.rows] = (c @ values.abs() + c.sum(-1, keepdim=True) * o.abs()).transpose(0, 1)
    return Reference(**fields)


def allowed_error(config: AttentionConfig, inputs: AttentionInputs, ref: Reference) -> torch.Tensor:
    """Per-element bound on |kernel - reference| (module docstring)."""
    # The P @ V dot's operand dtype is fp16 for an fp8 query and for every quantized cache (kernel.py).
    # A 16-bit query's own unit roundoff is used otherwise: for bf16 with a quantized cache that
    # over-covers the kernel's fp16 P, and it is the bound test_gpu_matches_sdpa_backend needs
    # for the sdpa backend, which dequantizes into the query's dtype.
    pv_dtype = "float16" if config.q_is_fp8 else config.q_dtype
    allowed = 2 * unit_roundoff(pv_dtype) * ref.rms_v
    if pv_dtype == "float16":
        allowed = allowed + ref.small_fp16
    if config.q_is_fp8:
        allowed = allowed + ref.fp8_qk
    u_out = unit_roundoff(config.out_dtype)
    allowed = allowed + u_out * (ref.out.abs() + allowed) + 1e-4
    if config.out_is_fp8:
        allowed = allowed + 2.0**-10 * float(inputs.kwargs["output_scale"][0])
    return allowed


def assert_within(out: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor, label: str) -> None:
    """|out - ref| <= allowed everywhere; report the worst element."""
    if not torch.isfinite(out).all():
        bad = tuple(int(i) for i in (~torch.isfinite(out)).nonzero()[0])
        raise AssertionError(f"{label}: non-finite output at {bad}")
    excess = (out - ref).abs() - allowed
    worst = int(excess.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), out.shape))
    if excess.reshape(-1)[worst] > 0:
        raise AssertionError(
            f"{label}: worst element {idx}: out={float(out[idx]):.6g} ref={float(ref[idx]):.6g} "
            f"|diff|={float((out - ref).abs()[idx]):.3g} > allowed {float(allowed[idx]):.3g}"
        )


def run(config, inputs, **launch) -> torch.Tensor:
    if launch:
        from backends.triton import launcher

        out = launcher.unified_attention(*inputs.args, config=config, **launch, **inputs.kwargs)
    else:
        out = triton_backend.forward(*inputs.args, config=config, **inputs.kwargs)
    assert out.dtype == config.out_torch_dtype and out.shape == inputs.q.shape
    return output_as_real(out, config, inputs).to(inputs.q.device)


def check(config, inputs, label, **launch) -> None:
    ref = reference_attention_gpu(config, inputs)
    assert_within(run(config, inputs, **launch), ref.out, allowed_error(config, inputs, ref), label)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_gpu_capability_allows_this_device():
    device = resolve_device("cuda")
    for _, q_dtype, kv_dtype, mode, out_dtype in MODES:
        config = make_config(q_dtype, kv_dtype, mode, out_dtype)
        if device.compute_capability >= (8, 9) or "float8" not in q_dtype + kv_dtype:
            assert reasons(triton_backend.CAPABILITY, config, device) == [], config.summary()


def test_gpu_reference_agrees_with_oracle():
    config = make_config("bfloat16", "float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD, num_heads=4, num_kv_heads=2,
                         head_size=32, sliding_window=20, logits_soft_cap=SOFT_CAP, use_alibi=True, use_sinks=True)
    inputs = make_inputs(config, [1, 17, 40], [33, 17, 90], device="cuda")
    ref = reference_attention_gpu(config, inputs, rows_per_chunk=16).out.cpu()
    expected = reference_attention(*inputs.args, **inputs.oracle_kwargs(config))
    torch.testing.assert_close(ref, expected, atol=1e-12, rtol=1e-12)


def _mode_feature_params():
    # Every mode with the plain causal mask; the modes that change the kernel's score and
    # P @ V code also with every feature at once (compile time bounds the matrix).
    with_all_features = {"none-bf16", "fp8_per_tensor-e4m3-bf16", "fp8_per_token_head-e5m2-fp16",
                         "int8_per_token_head-bf16", "fp8_per_tensor-fp8q-bf16out"}
    for mode_id, q_dtype, kv_dtype, mode, out_dtype in MODES:
        for feature_id, features in FEATURES.items():
            if feature_id == "causal" or mode_id in with_all_features:
                yield pytest.param(q_dtype, kv_dtype, mode, out_dtype, features, id=f"{mode_id}-h128-bs16-{feature_id}")


@pytest.mark.parametrize(
    "q_dtype, kv_cache_dtype, kv_quant_mode, out_dtype, features", list(_mode_feature_params())
)
def test_gpu_matches_reference(q_dtype, kv_cache_dtype, kv_quant_mode, out_dtype, features):
    """A mixed prefill/decode batch (single pass) and an all-decode batch (split-KV by the heuristic)."""
    config = make_config(q_dtype, kv_cache_dtype, kv_quant_mode, out_dtype, **features)
    for name, (q_lens, kv_lens) in (("mixed", MIXED), ("decode", DECODE)):
        inputs = make_inputs(config, q_lens, kv_lens, device="cuda", seed=len(name))
        check(config, inputs, f"{name}")


@pytest.mark.parametrize("num_kv_splits", [2, 16])
@pytest.mark.parametrize(
    "q_dtype, kv_cache_dtype, kv_quant_mode, features",
    [
        ("bfloat16", "bfloat16", KVQuantMode.NONE, dict(use_sinks=True)),
        ("float8_e4m3fn", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR, dict(sliding_window=SLIDING_WINDOW)),
    ],
    ids=["none-bf16-sinks", "fp8_per_tensor-fp8q-window"],
)
def test_gpu_split_kv_forced_on_mixed_batch(q_dtype, kv_cache_dtype, kv_quant_mode, features, num_kv_splits):
    config = make_config(q_dtype, kv_cache_dtype, kv_quant_mode, **features)
    inputs = make_inputs(config, *MIXED, device="cuda")
    check(config, inputs, f"split{num_kv_splits}", num_kv_splits=num_kv_splits)


def test_gpu_split_heuristic_splits_small_decode_batches():
    from backends.triton import launcher

    device = torch.device("cuda", torch.cuda.current_device())
    q_lens, kv_lens = DECODE
    bound = (max(kv_lens) // 16 + 2) * 16
    assert launcher.choose_num_kv_splits(len(q_lens), len(q_lens), NUM_KV_HEADS, bound, device) > 1
    assert launcher.choose_num_kv_splits(sum(MIXED[0]), len(MIXED[0]), NUM_KV_HEADS, bound, device) == 1


@pytest.mark.parametrize(
    "head_size, block_size, q_dtype",
    [(64, 32, "bfloat16"), (80, 16, "float16"), (256, 64, "bfloat16"), (96, 128, "float8_e4m3fn")],
    ids=["h64-bs32-bf16", "h80-bs16-fp16", "h256-bs64-bf16", "h96-bs128-fp8q"],
)
def test_gpu_head_and_block_sizes(head_size, block_size, q_dtype):
    if q_dtype == "float8_e4m3fn":
        config = make_config(q_dtype, "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR, head_size=head_size,
                             block_size=block_size)
    else:
        config = make_config(q_dtype, q_dtype, KVQuantMode.NONE, head_size=head_size, block_size=block_size)
    inputs = make_inputs(config, *MIXED, device="cuda")
    check(config, inputs, "mixed")


def _at_top_of_bigger_cache(cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """A cache of num_blocks pages (uninitialized) whose last pages are `cache`'s."""
    big = torch.empty((num_blocks, *cache.shape[1:]), dtype=cache.dtype, device="cuda")
    big[num_blocks - cache.shape[0] :] = cache
    return big


@pytest.mark.parametrize(
    "q_dtype, kv_cache_dtype, kv_quant_mode",
    [
        ("bfloat16", "bfloat16", KVQuantMode.NONE),
        ("bfloat16", "int8", KVQuantMode.INT8_PER_TOKEN_HEAD),
        ("float8_e4m3fn", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR),
    ],
    ids=["none-bf16", "int8_per_token_head-bf16", "fp8_per_tensor-fp8q"],
)
def test_gpu_offsets_past_2_31(q_dtype, kv_cache_dtype, kv_quant_mode):
    """The same pages moved to the top of a cache whose element count passes 2^31 give
    bit-identical outputs (so page offsets are computed in 64 bits)."""
    config = make_config(q_dtype, kv_cache_dtype, kv_quant_mode)
    page_elements = config.block_size * NUM_KV_HEADS * HEAD_SIZE
    for q_lens, kv_lens in (MIXED, DECODE):
        small = make_inputs(config, q_lens, kv_lens, device="cuda")
        num_small = small.key_cache.shape[0]
        num_blocks = 2**31 // page_elements + num_small + 7
        offset = num_blocks - num_small
        assert (offset + 1) * page_elements > 2**31
        kwargs = dict(small.kwargs)
        for name in ("k_scale_cache", "v_scale_cache"):
            if name in kwargs:
                kwargs[name] = _at_top_of_bigger_cache(kwargs[name], num_blocks)
        big = AttentionInputs(
            q=small.q,
            key_cache=_at_top_of_bigger_cache(small.key_cache, num_blocks),
            value_cache=_at_top_of_bigger_cache(small.value_cache, num_blocks),
            cu_seqlens_q=small.cu_seqlens_q,
            seq_lens=small.seq_lens,
            block_table=small.block_table + offset,
            kwargs=kwargs,
        )
        out_small = run(config, small)
        out_big = run(config, big)
        del big
        assert torch.equal(out_small, out_big)
        ref = reference_attention_gpu(config, small)
        assert_within(out_small, ref.out, allowed_error(config, small, ref), "small")


@pytest.mark.parametrize("num_kv_splits", [1, 4], ids=["single_pass", "split4"])
def test_gpu_each_scale_is_applied(num_kv_splits):
    """With the right scales the output is within the bound; with any one scale replaced by
    1.0 the same check fails."""
    from backends.triton import launcher

    config = make_config("float8_e4m3fn", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR, "float8_e4m3fn")
    inputs = make_inputs(config, *DECODE, device="cuda")
    ref = reference_attention_gpu(config, inputs)
    allowed = allowed_error(config, inputs, ref)
    assert_within(run(config, inputs, num_kv_splits=num_kv_splits), ref.out, allowed, "right scales")
    for name in ("q_scale", "k_scale", "v_scale", "output_scale"):
        wrong_kwargs = dict(inputs.kwargs, **{name: torch.ones_like(inputs.kwargs[name])})
        out = launcher.unified_attention(*inputs.args, config=config, num_kv_splits=num_kv_splits, **wrong_kwargs)
        with pytest.raises(AssertionError):
            assert_within(output_as_real(out, config, inputs).cuda(), ref.out, allowed, name)


def test_gpu_cuda_graph_capture_and_replay():
    """forward() is capturable: replaying after changing seq_lens and a scale in place gives
    what a fresh call on the changed inputs gives (nothing was read on the host)."""
    config = make_config("bfloat16", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR)
    inputs = make_inputs(config, *DECODE, device="cuda")
    out = torch.empty(inputs.q.shape, dtype=config.out_torch_dtype, device="cuda")
    triton_backend.forward(*inputs.args, config=config, out=out, **inputs.kwargs)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_backend.forward(*inputs.args, config=config, out=out, **inputs.kwargs)
    inputs.seq_lens.sub_(torch.tensor([0, 0, 1, 64, 1000, 7, 0, 2500], dtype=torch.int32, device="cuda"))
    inputs.kwargs["k_scale"].fill_(0.3)
    graph.replay()
    expected = triton_backend.forward(*inputs.args, config=config, **inputs.kwargs)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_gpu_autotune_searches_once_per_bucket_and_never_under_capture(monkeypatch):
    """DISPATCH_TRITON_AUTOTUNE=1: CUDA-graph capture of an untuned bucket launches the defaults and
    searches nothing; the first eager call searches, later ones reuse the choice; the tuned
    launch is as accurate as any other."""
    from backends.triton import autotune, launcher

    monkeypatch.setattr(autotune, "ENABLED", True)
    autotune.clear()
    searches = []
    real_tune = autotune.tune
    monkeypatch.setattr(autotune, "tune", lambda key, *a, **k: searches.append(key) or real_tune(key, *a, **k))
    config = make_config("bfloat16", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR)
    inputs = make_inputs(config, *DECODE, device="cuda")
    out = torch.empty(inputs.q.shape, dtype=config.out_torch_dtype, device="cuda")
    default = launcher.choose_tiles(HEAD_SIZE, NUM_HEADS // NUM_KV_HEADS, False, True, config.kv_quant_mode)
    launcher.unified_attention(*inputs.args, config=config, tiles=default, out=out, **inputs.kwargs)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_backend.forward(*inputs.args, config=config, out=out, **inputs.kwargs)
    graph.replay()
    torch.cuda.synchronize()
    assert searches == []
    check(config, inputs, "autotune, first eager call")
    check(config, inputs, "autotune, second eager call")
    assert len(searches) == 1 and autotune.cached(searches[0]) is not None
    autotune.clear()


def test_gpu_matches_sdpa_backend():
    sdpa = pytest.importorskip("backends.sdpa")
    device = resolve_device("cuda")
    compared = 0
    for _, q_dtype, kv_dtype, mode, out_dtype in MODES:
        config = make_config(q_dtype, kv_dtype, mode, out_dtype, use_sinks=True, sliding_window=SLIDING_WINDOW)
        if reasons(sdpa.CAPABILITY, config, device):
            continue
        inputs = make_inputs(config, *MIXED, device="cuda")
        ref = reference_attention_gpu(config, inputs)
        allowed = allowed_error(config, inputs, ref)
        ours = run(config, inputs)
        theirs = output_as_real(sdpa.forward(*inputs.args, config=config, **inputs.kwargs), config, inputs).cuda()
        # Both within their bound of the reference, so within twice the bound of each other.
        assert_within(ours, theirs, 2 * allowed, f"triton vs sdpa {config.summary()}")
        compared += 1
    if not compared:
        pytest.skip("the sdpa backend supports none of these configs on this device")
