"""The sdpa backend against the float64 oracle, through dispatch.attention (and its forward directly for strided
views the call checks do not yet accept); its precision bound, batched decode, chunked prefill and bounds checks."""

import functools

import pytest
import torch

import dispatch
from backends import sdpa
from dispatch import AttentionConfig, InputError, KVQuantMode
from dispatch.cases import case
from tests.cases import assert_close_to_oracle, make_inputs, output_as_real, tolerance, unit_roundoff
from tests.oracle import reference_attention

# Lengths around page (16) and tile (128) edges, with decode, whole-prompt and chunked-prefill sequences.
Q_LENS, KV_LENS = list(case("sdpa-edges").q_lens), list(case("sdpa-edges").kv_lens)

MODES = {
    # name: config fields
    "pr42080_fp8q_fp8kv": dict(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
    "bf16q_fp8kv": dict(q_dtype="bfloat16", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
    "fp16q_e5m2kv": dict(q_dtype="float16", kv_cache_dtype="float8_e5m2", kv_quant_mode="FP8_PER_TENSOR"),
    "bf16q_fp8_per_token_head": dict(q_dtype="bfloat16", kv_cache_dtype="float8_e4m3fn",
                                     kv_quant_mode="FP8_PER_TOKEN_HEAD"),
    "fp16q_int8_per_token_head": dict(q_dtype="float16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD"),
    "bf16": dict(q_dtype="bfloat16", kv_cache_dtype="bfloat16"),
    "fp16": dict(q_dtype="float16", kv_cache_dtype="float16"),
}
FEATURES = {
    "causal": dict(causal=True),
    "noncausal": dict(causal=False),
    "window": dict(sliding_window=20),
    "softcap": dict(logits_soft_cap=4.0),
    "alibi": dict(use_alibi=True),
    "sinks": dict(use_sinks=True),
    "fp8out": dict(out_dtype="float8_e4m3fn"),
    "all": dict(sliding_window=33, logits_soft_cap=6.0, use_alibi=True, use_sinks=True, causal=False),
}


def compute_dtype(config: AttentionConfig) -> torch.dtype:
    """What sdpa promises (its module docstring), stated here independently: float32 whenever anything is
    dequantized (an fp8 query or a quantized cache), else the query's 16-bit dtype."""
    if config.q_is_fp8 or config.kv_quant_mode is not KVQuantMode.NONE:
        return torch.float32
    return config.q_torch_dtype


@functools.lru_cache(maxsize=None)
def _oracle(config: AttentionConfig, seed: int) -> torch.Tensor:
    inputs = make_inputs(config, Q_LENS, KV_LENS, seed=seed)
    return reference_attention(*inputs.args, **inputs.oracle_kwargs(config))


def run_and_compare(config: AttentionConfig, seed: int = 0, device: str = "cpu") -> float:
    inputs = make_inputs(config, Q_LENS, KV_LENS, seed=seed, device=device)
    out = dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
    assert out.dtype == config.out_torch_dtype and out.shape == inputs.q.shape
    atol, rtol = tolerance(config, compute_dtype(config))
    return assert_close_to_oracle(output_as_real(out, config, inputs), _oracle(config, seed), atol=atol, rtol=rtol,
                                  label=config.summary())


def _config(mode: str, feature: str, heads=(8, 2), head_size=32, **extra) -> AttentionConfig:
    return AttentionConfig(num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size, backend="sdpa",
                           **MODES[mode], **FEATURES[feature], **extra)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_causal_gqa(mode):
    run_and_compare(_config(mode, "causal"))


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("mode", ["pr42080_fp8q_fp8kv", "fp16q_int8_per_token_head", "bf16q_fp8kv", "bf16"])
def test_features(mode, feature):
    run_and_compare(_config(mode, feature))


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_gqa_ratios_and_block_sizes(heads, block_size):
    run_and_compare(_config("fp16", "causal", heads=heads, block_size=block_size, head_size=40))


def test_pr42080_scenario_through_auto_matches_the_oracle():
    """FP8 e4m3 Q and FP8 per-tensor KV quantized as (x/scale).to(fp8), q 0.75, k 0.5, v 0.25, backend auto."""
    config = _config("pr42080_fp8q_fp8kv", "causal").model_copy(update={"backend": "auto"})
    run_and_compare(config)


@pytest.mark.parametrize("mode,names", [
    ("pr42080_fp8q_fp8kv", ["q_scale", "k_scale", "v_scale"]),
    ("fp16q_int8_per_token_head", ["k_scale_cache", "v_scale_cache"]),
    ("bf16q_fp8_per_token_head", ["k_scale_cache", "v_scale_cache"]),
])
def test_each_scale_is_applied(mode, names):
    """Replacing any one scale by 1.0 must change the output clearly: the scales are really used."""
    config = _config(mode, "causal")
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    reference = _oracle(config, 0)
    right = output_as_real(dispatch.attention(*inputs.args, config=config, **inputs.kwargs), config, inputs)
    atol, rtol = tolerance(config, compute_dtype(config))
    assert_close_to_oracle(right, reference, atol=atol, rtol=rtol)
    for name in names:
        wrong_kwargs = dict(inputs.kwargs, **{name: torch.ones_like(inputs.kwargs[name])})
        wrong = output_as_real(dispatch.attention(*inputs.args, config=config, **wrong_kwargs), config, inputs)
        assert (wrong - reference).abs().max() > 20 * atol, f"{name}=1.0 left the output unchanged"


def test_nan_in_unused_pages_does_not_reach_the_output():
    config = _config("bf16", "noncausal")
    clean = make_inputs(config, Q_LENS, KV_LENS, poison=False)
    poisoned = make_inputs(config, Q_LENS, KV_LENS, poison=True)
    assert torch.isnan(poisoned.key_cache.float()).any()
    a = dispatch.attention(*clean.args, config=config, **clean.kwargs)
    b = dispatch.attention(*poisoned.args, config=config, **poisoned.kwargs)
    assert torch.equal(a, b)


def test_writes_into_out():
    config = _config("fp16", "causal")
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    out = torch.full_like(inputs.q, float("nan"))
    result = dispatch.attention(*inputs.args, config=config, out=out, **inputs.kwargs)
    assert result is out and not torch.isnan(out).any()


def test_softmax_scale_is_honoured():
    run_and_compare(_config("fp16", "causal", softmax_scale=0.3))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _on(inputs, device: str):
    """The same inputs on `device` (built and edited on the CPU, where the oracle reads them)."""
    moved = {name: getattr(inputs, name).to(device) for name in
             ("q", "key_cache", "value_cache", "cu_seqlens_q", "seq_lens", "block_table")}
    return type(inputs)(**moved, kwargs={k: v.to(device) for k, v in inputs.kwargs.items()})


def _with_large_token_scales(inputs, seed: int, q_gain: float):
    """Per-token-head scales drawn from [0.5, 50] (real = stored * scale); q multiplied by q_gain. Poisoned (NaN)
    slots stay NaN."""
    gen = torch.Generator().manual_seed(seed)
    for name in ("k_scale_cache", "v_scale_cache"):
        scales = inputs.kwargs[name]
        inputs.kwargs[name] = torch.where(torch.isnan(scales), scales,
                                          0.5 + 49.5 * torch.rand(scales.shape, generator=gen))
    inputs.q = (inputs.q.float() * q_gain).to(inputs.q.dtype)
    return inputs


def _largest_abs_score(inputs, config) -> torch.Tensor:
    """float64 [num_tokens, num_heads, 1]: softmax_scale * max_j sum_i |q_i| |k_ij| over each query's keys."""
    q = inputs.q.double()
    real_k = inputs.key_cache.double() * inputs.kwargs["k_scale_cache"].double()[..., None]
    starts = inputs.cu_seqlens_q.tolist()
    out = torch.zeros(q.shape[0], config.num_heads, 1, dtype=torch.float64)
    for seq, kv_len in enumerate(inputs.seq_lens.tolist()):
        keys = torch.stack([real_k[int(inputs.block_table[seq, j // config.block_size]), j % config.block_size]
                            for j in range(kv_len)]).repeat_interleave(config.num_queries_per_kv, dim=1)
        rows = q[starts[seq]:starts[seq + 1]].abs()
        out[starts[seq]:starts[seq + 1], :, 0] = config.scale * torch.einsum("qhd,khd->qhk", rows, keys.abs()).amax(-1)
    return out


@pytest.mark.parametrize("out_dtype", ["float32", None])
@pytest.mark.parametrize("kv_cache_dtype,kv_quant_mode", [("int8", "INT8_PER_TOKEN_HEAD"),
                                                          ("float8_e4m3fn", "FP8_PER_TOKEN_HEAD")])
@pytest.mark.parametrize("device", DEVICES)
def test_large_per_token_scales_stay_within_the_float32_bound(kv_cache_dtype, kv_quant_mode, out_dtype, device):
    """Issue 15: a bf16 query over a per-token-head cache with scales up to 50. Dequantized into bf16 (the old
    code) each real key kept 8 mantissa bits, and the error was 2.7% (int8) / 12% (fp8) of max sum_j p_j |v_j|,
    100-300x this bound. In float32 the bound follows from the arithmetic:

    - each score s_j = scale * sum_i q_i k_ij (q exact in float32, k_ij = stored * scale rounded once) is off by
      at most delta = gamma_(D+2) * S with S = scale * sum_i |q_i| |k_ij| (a D-term dot product, the
      dequantization, the softmax scale);
    - scores off by at most delta move each softmax weight by a factor within exp(+-2 delta), so the output
      moves by at most expm1(2 delta) * A, A = sum_j p_j |v_j| (the oracle's with_abs);
    - exp, the running-max rescales, the sums and P @ V add at most (3 kv_len + 10) u * A;
    - a 16-bit output adds one rounding, u_out * |result|.
    q is scaled by 0.01 so the scores stay O(10), where that bound is tight enough to tell the two apart.
    """
    config = AttentionConfig(num_heads=8, num_kv_heads=2, head_size=32, q_dtype="bfloat16", out_dtype=out_dtype,
                             kv_cache_dtype=kv_cache_dtype, kv_quant_mode=kv_quant_mode, backend="sdpa")
    q_lens, kv_lens = [1, 5, 17, 40], [33, 129, 17, 64]
    inputs = _with_large_token_scales(make_inputs(config, q_lens, kv_lens, seed=5), seed=6, q_gain=0.01)
    ref, weighted_abs = reference_attention(*inputs.args, **inputs.oracle_kwargs(config), with_abs=True)
    on_device = _on(inputs, device)
    out = output_as_real(dispatch.attention(*on_device.args, config=config, **on_device.kwargs), config, inputs)
    u = unit_roundoff(torch.float32)
    roundings = (config.head_size + 2) * u
    delta = roundings / (1 - roundings) * _largest_abs_score(inputs, config)
    arithmetic = (torch.expm1(2 * delta) + (3 * max(kv_lens) + 10) * u) * weighted_abs
    bound = arithmetic + unit_roundoff(config.out_torch_dtype) * (ref.abs() + arithmetic)
    assert float(bound.max()) < 0.01 * float(weighted_abs.max())  # the bound itself is tight: < 1% of max A
    excess = (out - ref).abs() - bound
    worst = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
    assert float(excess.max()) <= 0, (f"worst element {worst}: |diff| {float((out - ref).abs()[worst]):.4g} > bound "
                               f"{float(bound[worst]):.4g} (max A {float(weighted_abs.max()):.4g})")


# Chunking and decode batching are exercised at small sizes by shrinking the element budget: prefill queries
# then run a few rows at a time (chunks that do not divide q_len) and decode sequences split into several batches.
@pytest.mark.parametrize("feature", ["causal", "window", "alibi", "all"])
@pytest.mark.parametrize("budget,decode_max", [(2000, 8), (1 << 25, 200), (1 << 25, 0)],
                         ids=["tiny_budget", "all_batched", "none_batched"])
def test_chunked_and_batched_paths_match_the_oracle(monkeypatch, budget, decode_max, feature):
    monkeypatch.setattr(sdpa, "MAX_SCORE_ELEMENTS", budget)
    monkeypatch.setattr(sdpa, "DECODE_MAX_Q_LEN", decode_max)
    run_and_compare(_config("fp16q_int8_per_token_head", feature))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_batch_of_mixed_lengths_matches_the_oracle(monkeypatch, device):
    """Many decode and speculative-decode sequences of different KV lengths in one batch: padding to the longest
    reads other pages (NaN-poisoned) and must be masked without a trace."""
    config = _config("bf16q_fp8kv", "all")
    kv_lens = [1, 15, 16, 17, 33, 64, 100, 129, 2, 48]
    q_lens = [1, 1, 4, 1, 8, 1, 3, 1, 2, 1]
    inputs = make_inputs(config, q_lens, kv_lens, seed=11)
    ref = reference_attention(*inputs.args, **inputs.oracle_kwargs(config))
    atol, rtol = tolerance(config, compute_dtype(config))
    for budget in (1 << 25, 40_000):  # one batch; several
        monkeypatch.setattr(sdpa, "MAX_SCORE_ELEMENTS", budget)
        on_device = _on(inputs, device)
        out = dispatch.attention(*on_device.args, config=config, **on_device.kwargs)
        assert_close_to_oracle(output_as_real(out, config, inputs), ref, atol=atol, rtol=rtol, label=f"{budget}")


# --- Strided views, as engines hold them ---------------------------------------------------------------------


def _vllm_kv_views(key_cache: torch.Tensor, value_cache: torch.Tensor, layout: str):
    """vLLM's per-layer cache, logically [num_blocks, num_kv_heads, block_size, 2 * head_size] (K and V packed in
    the last dimension; physically NHD or HND), split as its Triton backend does:
    kv_cache.transpose(1, 2).split(head_size, -1) -> two strided [num_blocks, block_size, num_kv_heads, head_size]."""
    num_blocks, block_size, kv_heads, head_size = key_cache.shape
    packed = torch.cat([key_cache, value_cache], dim=-1)  # [num_blocks, block_size, H_kv, 2D]
    if layout == "NHD":
        storage = torch.empty(num_blocks, block_size, kv_heads, 2 * head_size, dtype=key_cache.dtype,
                              device=key_cache.device)
        kv_cache = storage.transpose(1, 2)  # logical [num_blocks, H_kv, block_size, 2D]
    else:
        kv_cache = torch.empty(num_blocks, kv_heads, block_size, 2 * head_size, dtype=key_cache.dtype,
                               device=key_cache.device)
    kv_cache.transpose(1, 2).copy_(packed)
    key_view, value_view = kv_cache.transpose(1, 2).split(head_size, -1)
    assert not key_view.is_contiguous() and torch.equal(key_view.view(torch.uint8), key_cache.view(torch.uint8))
    return key_view, value_view


def _strided_copy(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as `t`, held as a view with other strides."""
    if how == "transposed_scales":  # [num_blocks, block_size, H_kv] stored as [num_blocks, H_kv, block_size]
        holder = torch.empty(t.shape[0], t.shape[2], t.shape[1], dtype=t.dtype, device=t.device)
        view = holder.transpose(1, 2)
    elif how == "every_other":  # x[::2] of a longer tensor
        holder = torch.empty(2 * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
        view = holder[::2]
    elif how == "column":  # param[:, 0] of a [n, 2] parameter
        holder = torch.empty(*t.shape, 2, dtype=t.dtype, device=t.device)
        view = holder[..., 0]
    elif how == "padded_rows":  # a slice of a larger buffer, last dimension contiguous
        holder = torch.empty(t.shape[0] + 3, t.shape[1] + 2, t.shape[2] + 8, dtype=t.dtype, device=t.device)
        view = holder[1 : t.shape[0] + 1, 1 : t.shape[1] + 1, : t.shape[2]]
    else:
        raise ValueError(how)
    view.copy_(t)  # same dtype: a bit copy, NaN poison included
    assert view.stride() != t.stride()
    return view


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("mode,feature", [("bf16", "all"), ("fp16q_int8_per_token_head", "all"),
                                          ("pr42080_fp8q_fp8kv", "fp8out"), ("bf16q_fp8_per_token_head", "alibi")])
@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_give_identical_results(mode, feature, layout, device):
    """Engine-held views (vLLM's K/V split, transposed scale caches, x[::2] slopes, param[:, 0] sinks, q and out
    inside larger buffers) give bit-identical results to contiguous copies, and `out` is written in place."""
    config = _config(mode, feature)
    inputs = make_inputs(config, Q_LENS, KV_LENS, device=device)
    expected = sdpa.forward(*inputs.args, config=config, **inputs.kwargs)

    key_view, value_view = _vllm_kv_views(inputs.key_cache, inputs.value_cache, layout)
    kwargs = dict(inputs.kwargs)
    for name in ("k_scale_cache", "v_scale_cache"):
        if name in kwargs:
            kwargs[name] = _strided_copy(kwargs[name], "transposed_scales")
    if "alibi_slopes" in kwargs:
        kwargs["alibi_slopes"] = _strided_copy(kwargs["alibi_slopes"], "every_other")
    if "sinks" in kwargs:
        kwargs["sinks"] = _strided_copy(kwargs["sinks"], "column")
    q_view = _strided_copy(inputs.q, "padded_rows")
    out_holder = torch.zeros(expected.shape[0] + 3, expected.shape[1] + 2, expected.shape[2] + 8,
                             dtype=expected.dtype, device=expected.device)
    out_view = out_holder[1 : expected.shape[0] + 1, 1 : expected.shape[1] + 1, : expected.shape[2]]
    result = sdpa.forward(q_view, key_view, value_view, *inputs.args[3:], config=config, out=out_view, **kwargs)

    assert result is out_view
    assert torch.equal(out_view.view(torch.uint8), expected.view(torch.uint8))
    untouched = torch.ones_like(out_holder, dtype=torch.bool)
    untouched[1 : expected.shape[0] + 1, 1 : expected.shape[1] + 1, : expected.shape[2]] = False
    assert not out_holder[untouched].view(torch.uint8).any(), "wrote outside out"


# --- Bounds checks (no debug mode needed: sdpa reads the lengths on the host anyway) ----------------------------


def _bounds_inputs():
    config = _config("fp16", "causal")
    return config, make_inputs(config, [1, 4, 20], [17, 4, 40])  # block_size 16: 2, 1 and 3 pages


def _call(config, inputs, **changes):
    """The backend itself, as plan.forward runs it: no call checks in front (an engine may call it this way)."""
    args = dict(zip(("q", "key_cache", "value_cache", "cu_seqlens_q", "seq_lens", "block_table"), inputs.args))
    kwargs = dict(inputs.kwargs)
    for name, value in changes.items():
        (args if name in args else kwargs)[name] = value
    return sdpa.forward(*args.values(), config=config, **kwargs)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize("change,message", [
    (lambda i: dict(cu_seqlens_q=_i32([1, 2, 5, 25])), r"cu_seqlens_q: expected cu_seqlens_q\[0\] == 0, got 1"),
    (lambda i: dict(cu_seqlens_q=_i32([0, 5, 1, 25])), r"cu_seqlens_q: expected non-decreasing offsets, got 5 then 1"),
    (lambda i: dict(cu_seqlens_q=_i32([0, 1, 5, 24])), r"cu_seqlens_q: expected cu_seqlens_q\[-1\] == num_tokens=25"),
    (lambda i: dict(seq_lens=_i32([17, 3, 40])), r"seq_lens: sequence 1 has kv_len=3 < its q_len=4"),
    (lambda i: dict(seq_lens=_i32([17, 4, 70])),
     r"block_table: sequence 2 needs 5 pages for kv_len=70, but the table has 4 columns"),
    (lambda i: dict(block_table=i.block_table[:, :2].contiguous()),
     r"block_table: sequence 2 needs 3 pages for kv_len=40, but the table has 2 columns"),
    (lambda i: dict(block_table=i.block_table[:2]),
     r"block_table: expected one row per sequence \(3, from seq_lens\)"),
    (lambda i: dict(key_cache=i.key_cache[:0], value_cache=i.value_cache[:0]),
     r"key_cache: expected at least one block .* got num_blocks=0"),
], ids=["cu_start", "cu_decreasing", "cu_end", "seq_shorter_than_q", "seq_lens_beyond_table", "table_too_narrow",
        "table_too_short", "no_blocks"])
def test_bad_lengths_and_tables_raise_input_error(change, message):
    config, inputs = _bounds_inputs()
    with pytest.raises(InputError, match=message):
        _call(config, inputs, **change(inputs))


@pytest.mark.parametrize("bad_id", [8, 1000, -1])
def test_out_of_range_page_id_raises_input_error(bad_id):
    config, inputs = _bounds_inputs()
    num_blocks = inputs.key_cache.shape[0]
    assert num_blocks == 8
    table = inputs.block_table.clone()
    table[2, 1] = bad_id
    message = rf"block_table: sequence 2, column 1: page id {bad_id} not in \[0, 8\)"
    with pytest.raises(InputError, match=message):
        _call(config, inputs, block_table=table)
    # The same through the public call without debug mode (which would check it before any backend runs).
    with pytest.raises(InputError, match=message):
        dispatch.attention(*inputs.args[:5], table, config=config, validate=False, **inputs.kwargs)


def test_unused_table_columns_may_hold_anything():
    """Only the pages seq_lens reaches are checked and read: padding columns may hold any id."""
    config, inputs = _bounds_inputs()
    expected = _call(config, inputs)
    table = inputs.block_table.clone()
    table[0, 2:] = 10**6
    table[1, 1:] = -5
    assert torch.equal(_call(config, inputs, block_table=table), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("feature", ["causal", "all", "fp8out"])
def test_on_cuda(mode, feature):
    run_and_compare(_config(mode, feature), device="cuda")
