"""The Triton backend against the float64 oracle, on CPU under TRITON_INTERPRET=1.

Tiny shapes (head size 32-80, 4 heads, lengths up to 129) keep the whole file
fast under the interpreter; tests/backends/test_triton_gpu.py runs realistic
sizes and bfloat16 on a GPU.

Tolerances come from the arithmetic, not from observed errors:
- P is rounded to fp16 before the P @ V dot (relative error <= 2^-11 per
  probability; the FP8-query path too, see kernel.py); the per-token-head
  modes round P * v_scale[j] to fp16 instead (also <= 2^-11), and a bf16
  query against a quantized cache is moved to fp16 exactly. Each rounding
  moves the weighted average by at most 2^-11 * max|V|, so atol = 2^-10 *
  max|V|, and the fp16 output cast adds rtol = 2^-11. Products of the stored
  values are exact and sums run in fp32 (~1e-7, ignored).
- fp8 output: the e4m3 cast rounds to within 2^-4 relative (half an ulp), plus
  half the smallest subnormal (2^-10) times output_scale.

Interpreter bugs worked around (see ../shared/notes/triton-on-cpu.md):
bfloat16 dots multiply raw bits (triton issue 11584), so bf16 runs only on the
GPU; fp32 -> fp8e4nv casts mis-round inside kernels, so the tests with fp8
output use the `gpu_like_fp8_rounding` fixture, which sends that one
conversion through torch's round-to-nearest-even saturated at +-448 as the
GPU's cvt.rn.satfinite does. The kernel itself is unchanged. Two more
interpreter conversions differ from the GPU and are harmless here: e4m3 NaN
widens to 480 (poisoned fp8 slots are never loaded; the NaN test runs in
fp16) and e5m2 subnormals widen to 0 (values below 2^-14 * k_scale: far below
the tolerance).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dispatch.capabilities import DeviceInfo, reasons
from dispatch.cases import case
from dispatch.config import AttentionConfig, KVQuantMode
from tests.cases import AttentionInputs, assert_close_to_oracle, make_inputs, output_as_real
from tests.interpreter_patches import round_fp8_like_the_gpu
from tests.oracle import reference_attention

import backends.triton as triton_backend

launcher = pytest.importorskip("backends.triton.launcher")  # imports triton

FP16_U = 2.0**-11  # unit roundoff of float16
E4M3_HALF_ULP = 2.0**-4  # relative rounding error bound of e4m3 (3 mantissa bits)
E4M3_MIN_SUBNORMAL = 2.0**-9

# The case table's "triton" length sets (dispatch/cases.py): sequences mixing decode (q_len 1), full
# prefill (q_len == kv_len) and chunked prefill; and lengths around tile and page edges in one batch.
Q_LENS, KV_LENS = list(case("triton-mixed").q_lens), list(case("triton-mixed").kv_lens)
EDGE_Q_LENS, EDGE_KV_LENS = list(case("triton-edges").q_lens), list(case("triton-edges").kv_lens)

SLIDING_WINDOW = 8
SOFT_CAP = 2.0

FEATURES = {
    "causal": dict(causal=True),
    "non_causal": dict(causal=False),
    "sliding_window": dict(sliding_window=SLIDING_WINDOW),
    "sliding_window_non_causal": dict(causal=False, sliding_window=SLIDING_WINDOW),
    "softcap": dict(logits_soft_cap=SOFT_CAP),
    "alibi": dict(use_alibi=True),
    "sinks": dict(use_sinks=True),
    "all": dict(sliding_window=SLIDING_WINDOW, logits_soft_cap=SOFT_CAP, use_alibi=True, use_sinks=True),
}

# (id, q_dtype, kv_cache_dtype, kv_quant_mode) for the 16-bit-query paths.
SIXTEEN_BIT_MODES = [
    ("none-fp16", "float16", "float16", KVQuantMode.NONE),
    ("fp8_per_tensor-e4m3-fp16", "float16", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR),
    ("fp8_per_tensor-e5m2-fp16", "float16", "float8_e5m2", KVQuantMode.FP8_PER_TENSOR),
    ("fp8_per_token_head-e4m3-fp16", "float16", "float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD),
    ("fp8_per_token_head-e5m2-fp16", "float16", "float8_e5m2", KVQuantMode.FP8_PER_TOKEN_HEAD),
    ("int8_per_token_head-fp16", "float16", "int8", KVQuantMode.INT8_PER_TOKEN_HEAD),
]

BF16_SKIP = pytest.mark.skip(
    reason="bfloat16 tl.dot is wrong under the Triton interpreter (triton issue 11584); bf16 is tested on the GPU"
)


def make_config(
    *,
    q_dtype="float16",
    kv_cache_dtype="float16",
    kv_quant_mode=KVQuantMode.NONE,
    num_heads=4,
    num_kv_heads=2,
    head_size=32,
    block_size=16,
    **features,
) -> AttentionConfig:
    return AttentionConfig(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        q_dtype=q_dtype,
        kv_cache_dtype=kv_cache_dtype,
        kv_quant_mode=kv_quant_mode,
        block_size=block_size,
        backend="triton",
        **features,
    )


def run_triton(config: AttentionConfig, inputs: AttentionInputs, **launch) -> torch.Tensor:
    """The kernel's output as float64 real values; `launch` goes to launcher.unified_attention."""
    if launch:
        out = launcher.unified_attention(*inputs.args, config=config, **launch, **inputs.kwargs)
    else:
        out = triton_backend.forward(*inputs.args, config=config, **inputs.kwargs)
    assert out.dtype == config.out_torch_dtype
    assert out.shape == inputs.q.shape
    return output_as_real(out, config, inputs)


def oracle(config: AttentionConfig, inputs: AttentionInputs) -> torch.Tensor:
    return reference_attention(*inputs.args, **inputs.oracle_kwargs(config))


def real_values(inputs: AttentionInputs) -> torch.Tensor:
    """The dequantized value cache (float64; NaN where poisoned)."""
    v = inputs.value_cache.to(torch.float64)
    if "v_scale" in inputs.kwargs:
        v = v * float(inputs.kwargs["v_scale"][0])
    if "v_scale_cache" in inputs.kwargs:
        v = v * inputs.kwargs["v_scale_cache"].to(torch.float64)[..., None]
    return v


def sixteen_bit_tolerance(inputs: AttentionInputs) -> dict:
    """atol/rtol for a 16-bit (fp16) compute path, derived in the module docstring."""
    v = real_values(inputs)
    v_max = float(v[torch.isfinite(v)].abs().max())
    return dict(atol=2 * FP16_U * v_max + 1e-6, rtol=FP16_U)


def fp8_output_tolerance(config: AttentionConfig, inputs: AttentionInputs, atol: float, rtol: float) -> dict:
    """Widen a tolerance by the e4m3 output cast's rounding."""
    if not config.out_is_fp8:
        return dict(atol=atol, rtol=rtol)
    output_scale = float(inputs.kwargs["output_scale"][0])
    return dict(atol=atol + E4M3_MIN_SUBNORMAL / 2 * output_scale, rtol=rtol + E4M3_HALF_ULP)


@pytest.fixture
def gpu_like_fp8_rounding(monkeypatch):
    """Make the interpreter's fp32/fp16 -> e4m3 cast round like the GPU (test-only patch).

    The interpreter's `_convert_float` drops the carry when rounding up to the
    next power of two (1.97 -> 1.0); the GPU's cvt.rn.satfinite rounds to
    nearest even and saturates at +-448. Only that one conversion is replaced.
    """
    round_fp8_like_the_gpu(monkeypatch)


# ---------------------------------------------------------------------------------------------
# Capability and module structure
# ---------------------------------------------------------------------------------------------


def test_import_does_not_import_triton():
    code = "import sys, backends.triton as b; b.CAPABILITY; print('triton' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_launch_path_never_reads_device_values():
    # CUDA-graph safety: sizes come from shapes, scales are read by the kernel.
    source = "".join((Path(launcher.__file__).parent / name).read_text() for name in ("launcher.py", "__init__.py"))
    for forbidden in (".item(", ".cpu(", ".tolist(", "bool(", ".numpy("):
        assert forbidden not in source, forbidden


def test_capability_cpu_needs_interpreter():
    config = make_config()
    plain_cpu = DeviceInfo(type="cpu", triton_interpret=False)
    interpreted_cpu = DeviceInfo(type="cpu", triton_interpret=True)
    assert reasons(triton_backend.CAPABILITY, config, interpreted_cpu) == []
    assert "device='cpu' needs TRITON_INTERPRET=1 (Triton runs on CPU only through its interpreter)" in reasons(
        triton_backend.CAPABILITY, config, plain_cpu
    )


def test_capability_refuses_what_the_interpreter_computes_wrongly():
    """bf16 and fp8 output are wrong under the interpreter: refused on CPU, allowed on GPU.

    (This file still runs fp8 output on CPU by calling the backend directly with the
    `gpu_like_fp8_rounding` patch.)"""
    cap = triton_backend.CAPABILITY
    cpu = DeviceInfo(type="cpu", triton_interpret=True)
    hopper = DeviceInfo(type="cuda", index=0, name="H100", compute_capability=(9, 0))
    bf16 = make_config(q_dtype="bfloat16", kv_cache_dtype="int8", kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD)
    fp8_q = fp8_q_config(out_dtype="float16")
    fp8_q_default_out = fp8_q_config(out_dtype=None)  # bfloat16
    fp8_out = make_config(out_dtype="float8_e4m3fn")
    assert reasons(cap, bf16, cpu) == [
        "out_dtype=bfloat16 not supported on device='cpu': under the Triton interpreter bfloat16 "
        "dots multiply raw bit patterns (triton issue 11584) and fp32->bfloat16 casts truncate"
    ]
    # Against a quantized cache a bf16 query is moved to fp16 before any dot: fine on CPU.
    assert reasons(cap, bf16.model_copy(update={"out_dtype": "float32"}), cpu) == []
    assert [r[:30] for r in reasons(cap, make_config(q_dtype="bfloat16", kv_cache_dtype="bfloat16",
                                                     out_dtype="float32"), cpu)] == ["q_dtype=bfloat16, kv_cache_dty"]
    assert reasons(cap, fp8_q, cpu) == []
    assert [r[:40] for r in reasons(cap, fp8_q_default_out, cpu)] == ["out_dtype=bfloat16 not supported on devi"]
    assert [r[:40] for r in reasons(cap, fp8_out, cpu)] == ["out_dtype=float8_e4m3fn not supported on"]
    for config in (bf16, fp8_q, fp8_q_default_out, fp8_out):
        assert reasons(cap, config, hopper) == []


def test_capability_compute_capability_and_sizes():
    cap = triton_backend.CAPABILITY
    ampere = DeviceInfo(type="cuda", index=0, name="A100", compute_capability=(8, 0))
    hopper = DeviceInfo(type="cuda", index=0, name="H100", compute_capability=(9, 0))
    turing = DeviceInfo(type="cuda", index=0, name="T4", compute_capability=(7, 5))
    fp8 = make_config(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn", kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)
    assert reasons(cap, make_config(), ampere) == []
    assert reasons(cap, fp8, hopper) == []
    assert any("compute capability 8.0 < 8.9" in r for r in reasons(cap, fp8, ampere))
    assert any("compute capability 7.5 < 8.0" in r for r in reasons(cap, make_config(), turing))
    assert any("head_size=264" in r for r in reasons(cap, make_config(head_size=264), hopper))
    assert any("block_size=8" in r for r in reasons(cap, make_config(block_size=8), hopper))
    for mode in KVQuantMode:
        assert mode in cap.kv_quant_modes


def test_through_dispatch_attention():
    """The dispatcher runs this backend when named, and picks it first for a 16-bit config on CPU."""
    import dispatch

    config = make_config(kv_cache_dtype="int8", kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD, use_sinks=True)
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    out = output_as_real(dispatch.attention(*inputs.args, config=config, **inputs.kwargs), config, inputs)
    assert_close_to_oracle(out, oracle(config, inputs), **sixteen_bit_tolerance(inputs))
    assert dispatch.select(config.model_copy(update={"backend": "auto"}), device="cpu").name == "triton"


def test_split_heuristic(monkeypatch):
    monkeypatch.setattr(launcher, "_multiprocessor_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    # 8 decode sequences x 8 KV heads = 64 programs < 2 x 132: split into as many segments as one wave
    # holds, 264 // 64 = 4 (5 would start a second wave of 56 programs).
    assert launcher.choose_num_kv_splits(8, 8, 8, 8192, cuda) == 4
    assert launcher.choose_num_kv_splits(5, 5, 8, 8192, cuda) == 6  # 40 programs, 240 with 6 segments
    # More than half a wave already: a split would only add a second wave.
    assert launcher.choose_num_kv_splits(19, 19, 8, 8192, cuda) == 1
    # One decode sequence: capped at MAX_KV_SPLITS.
    assert launcher.choose_num_kv_splits(1, 1, 8, 65536, cuda) == launcher.MAX_KV_SPLITS
    # Capped by the block table's bound on kv_len: 1024 keys / 256 per split.
    assert launcher.choose_num_kv_splits(1, 1, 8, 1024, cuda) == 4
    # Short contexts, prefill-shaped launches, full GPUs and the CPU: no split.
    assert launcher.choose_num_kv_splits(1, 1, 8, 255, cuda) == 1
    assert launcher.choose_num_kv_splits(4096, 2, 8, 8192, cuda) == 1
    assert launcher.choose_num_kv_splits(64, 64, 8, 8192, cuda) == 1
    assert launcher.choose_num_kv_splits(1, 1, 8, 8192, torch.device("cpu")) == 1


# ---------------------------------------------------------------------------------------------
# 16-bit query: every KV-cache mode x every feature
# ---------------------------------------------------------------------------------------------


def _mode_feature_params():
    for mode_id, q_dtype, kv_dtype, mode in SIXTEEN_BIT_MODES:
        for feature_id, features in FEATURES.items():
            yield pytest.param(q_dtype, kv_dtype, mode, features, id=f"{mode_id}-h32-bs16-{feature_id}")
    yield pytest.param("bfloat16", "bfloat16", KVQuantMode.NONE, {}, id="none-bf16-h32-bs16-causal", marks=BF16_SKIP)
    # A bf16 query against a quantized cache is rescaled to fp16 in the kernel (no bf16 dot), so it
    # runs here; fp32 output avoids the interpreter's truncating fp32 -> bf16 cast.
    for mode_id, kv_dtype, mode in [
        ("fp8_per_tensor-e4m3-bf16", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR),
        ("fp8_per_token_head-e4m3-bf16", "float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD),
        ("int8_per_token_head-bf16", "int8", KVQuantMode.INT8_PER_TOKEN_HEAD),
    ]:
        for feature_id in ("causal", "all"):
            yield pytest.param("bfloat16", kv_dtype, mode, dict(FEATURES[feature_id], out_dtype="float32"),
                               id=f"{mode_id}-h32-bs16-{feature_id}-out_fp32")


@pytest.mark.parametrize("q_dtype, kv_cache_dtype, kv_quant_mode, features", list(_mode_feature_params()))
def test_sixteen_bit_query_matches_oracle(q_dtype, kv_cache_dtype, kv_quant_mode, features):
    config = make_config(q_dtype=q_dtype, kv_cache_dtype=kv_cache_dtype, kv_quant_mode=kv_quant_mode, **features)
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    assert_close_to_oracle(run_triton(config, inputs), oracle(config, inputs), **sixteen_bit_tolerance(inputs))


@pytest.mark.parametrize("q_exponent", [-40, 24], ids=["q_times_2^-40", "q_times_2^24"])
@pytest.mark.parametrize(
    "kv_cache_dtype, kv_quant_mode",
    [("float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR), ("int8", KVQuantMode.INT8_PER_TOKEN_HEAD)],
    ids=["fp8_per_tensor", "int8_per_token_head"],
)
def test_bf16_query_far_outside_fp16_range(q_exponent, kv_cache_dtype, kv_quant_mode):
    """A bf16 query against a quantized cache runs on fp16 dots after a power-of-two rescale in the
    kernel: queries far above fp16's range (2^24 * q overflows fp16) or below its subnormals (2^-40)
    must still give the exact scores. The softmax scale undoes the query's factor, so the softmax
    itself sees ordinary scores."""
    config = make_config(q_dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, kv_quant_mode=kv_quant_mode,
                         out_dtype="float32", softmax_scale=2.0**-q_exponent / 32**0.5)
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    inputs.q.mul_(2.0**q_exponent)  # exact: a power of two, inside bf16's range
    assert_close_to_oracle(run_triton(config, inputs), oracle(config, inputs), **sixteen_bit_tolerance(inputs))


@pytest.mark.parametrize("scale_exponent", [-30, 0, 30])
def test_per_token_head_scales_far_apart(scale_exponent):
    """Per-key V scales spread over 2^40 inside one sequence, around 2^-30, 1 and 2^30: P * v_scale is
    renormalized per tile by a power of two (kernel.py), so no tile overflows or underflows fp16."""
    config = make_config(kv_cache_dtype="int8", kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD,
                         out_dtype="float32", num_kv_heads=1)
    inputs = make_inputs(config, [1, 17], [70, 129], seed=3)
    v_scales = inputs.kwargs["v_scale_cache"]
    spread = torch.randint(-20, 21, v_scales.shape, generator=torch.Generator().manual_seed(4))
    v_scales.mul_(torch.pow(2.0, (spread + scale_exponent).to(torch.float32)))
    expected = oracle(config, inputs)
    out = run_triton(config, inputs)
    # Error bound as for the other 16-bit paths, relative to the largest |V| that a row can see.
    assert_close_to_oracle(out, expected, **sixteen_bit_tolerance(inputs))


@pytest.mark.parametrize("num_kv_heads", [1, 4], ids=["gqa4to1", "mha1to1"])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_edge_lengths(num_kv_heads, block_size):
    """Lengths 1/15/16/17/127/128/129 around page and tile edges, decode + prefill in one batch."""
    config = make_config(num_kv_heads=num_kv_heads, block_size=block_size)
    inputs = make_inputs(config, EDGE_Q_LENS, EDGE_KV_LENS, seed=block_size)
    assert_close_to_oracle(run_triton(config, inputs), oracle(config, inputs), **sixteen_bit_tolerance(inputs))


@pytest.mark.parametrize(
    "kv_quant_mode, kv_cache_dtype",
    [(KVQuantMode.NONE, "float16"), (KVQuantMode.FP8_PER_TOKEN_HEAD, "float8_e4m3fn")],
    ids=["none-fp16", "fp8_per_token_head-e4m3-fp16"],
)
@pytest.mark.parametrize(
    "tiles",
    [
        launcher.Tiles(block_m=16, tile_n=16),
        launcher.Tiles(block_m=32, tile_n=32),
        launcher.Tiles(block_m=16, tile_n=16, unmasked_interior=False),
    ],
    ids=["m16n16", "m32n32", "m16n16-one_masked_loop"],
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
def test_small_tiles_many_programs(kv_quant_mode, kv_cache_dtype, tiles, causal):
    """Many query tiles per sequence (binary search over tile starts), tiles smaller than a page, so
    many interior (unmasked) and edge (masked) KV tiles around a sliding window, and the single
    masked loop that replaces them where the launcher picks it."""
    config = make_config(kv_quant_mode=kv_quant_mode, kv_cache_dtype=kv_cache_dtype, block_size=64, sliding_window=40,
                         causal=causal)
    inputs = make_inputs(config, [1, 0, 47, 3, 129], [1, 20, 90, 33, 129])  # one sequence with no new query
    out = run_triton(config, inputs, tiles=tiles)
    assert_close_to_oracle(out, oracle(config, inputs), **sixteen_bit_tolerance(inputs))


@pytest.mark.parametrize("kv_quant_mode, kv_cache_dtype", [(KVQuantMode.NONE, "float16"),
                                                            (KVQuantMode.INT8_PER_TOKEN_HEAD, "int8")],
                         ids=["none-fp16", "int8_per_token_head"])
def test_int32_and_int64_page_offsets_agree(kv_quant_mode, kv_cache_dtype, monkeypatch):
    """The launcher's int32 page offsets (caches whose largest element offset is under 2^31, strided
    views included) and forced int64 ones give bit-identical outputs; a cache whose offsets reach 2^31
    gets int64, and asking for int32 there is refused. (test_triton_gpu.py runs caches past 2^31
    elements.)"""
    config = make_config(kv_quant_mode=kv_quant_mode, kv_cache_dtype=kv_cache_dtype)
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    narrow = launcher.unified_attention(*inputs.args, config=config, **inputs.kwargs)
    wide = launcher.unified_attention(*inputs.args, config=config, wide_offsets=True, **inputs.kwargs)
    assert torch.equal(narrow, wide)
    assert_close_to_oracle(output_as_real(narrow, config, inputs), oracle(config, inputs),
                           **sixteen_bit_tolerance(inputs))
    cache = inputs.key_cache
    padded = torch.zeros(*cache.shape[:3], cache.shape[3] + 1, dtype=cache.dtype)
    padded[..., : cache.shape[3]] = cache
    args = list(inputs.args)
    args[1] = padded[..., : cache.shape[3]]  # same values, not contiguous: offsets still fit int32
    assert not launcher._needs_wide_offsets(args[1])
    assert torch.equal(launcher.unified_attention(*args, config=config, wide_offsets=False, **inputs.kwargs), narrow)
    # Offsets from the strides alone (metadata, no memory): a view reaching 2^31 elements needs int64.
    far = torch.empty(2, 16, 2, 8, device="meta").as_strided((2, 16, 2, 8), (2**31, 16, 8, 1))
    assert launcher._needs_wide_offsets(far)
    assert not launcher._needs_wide_offsets(torch.empty(2, 16, 2, 8, device="meta").as_strided(
        (2, 16, 2, 8), (2**30, 16, 8, 1)))
    with monkeypatch.context() as patch:  # a cache that needs int64 refuses a forced int32
        patch.setattr(launcher, "_needs_wide_offsets", lambda t: True)
        with pytest.raises(ValueError, match="wide_offsets"):
            launcher.unified_attention(*args, config=config, wide_offsets=False, **inputs.kwargs)


@pytest.mark.parametrize(
    "head_size, kv_quant_mode, kv_cache_dtype",
    [
        (80, KVQuantMode.NONE, "float16"),
        (80, KVQuantMode.INT8_PER_TOKEN_HEAD, "int8"),
        (8, KVQuantMode.FP8_PER_TENSOR, "float8_e5m2"),
        (64, KVQuantMode.FP8_PER_TENSOR, "float8_e4m3fn"),
    ],
    ids=["none-fp16-h80-bs16", "int8_per_token_head-fp16-h80-bs16", "fp8_per_tensor-e5m2-fp16-h8-bs16",
         "fp8_per_tensor-e4m3-fp16-h64-bs16"],
)
def test_head_sizes(head_size, kv_quant_mode, kv_cache_dtype):
    config = make_config(head_size=head_size, kv_quant_mode=kv_quant_mode, kv_cache_dtype=kv_cache_dtype)
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    assert_close_to_oracle(run_triton(config, inputs), oracle(config, inputs), **sixteen_bit_tolerance(inputs))


def test_group_not_a_power_of_two_and_block_size_48():
    """3 query heads per KV head: BLOCK_M rows beyond 3 * BLOCK_Q stay unused."""
    config = make_config(num_heads=6, num_kv_heads=2, block_size=48, use_alibi=True)
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    assert_close_to_oracle(run_triton(config, inputs), oracle(config, inputs), **sixteen_bit_tolerance(inputs))


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_out_dtype_and_preallocated_out(out_dtype):
    config = make_config(kv_cache_dtype="float8_e4m3fn", kv_quant_mode=KVQuantMode.FP8_PER_TENSOR, out_dtype=out_dtype)
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    out = torch.full(inputs.q.shape, float("nan"), dtype=config.out_torch_dtype)
    returned = triton_backend.forward(*inputs.args, config=config, out=out, **inputs.kwargs)
    assert returned is out
    assert_close_to_oracle(output_as_real(out, config, inputs), oracle(config, inputs), **sixteen_bit_tolerance(inputs))


def test_poisoned_slots_are_never_read():
    """make_inputs fills every slot no sequence owns with NaN; one read would show as NaN."""
    config = make_config(block_size=32)
    inputs = make_inputs(config, EDGE_Q_LENS, EDGE_KV_LENS)
    assert torch.isnan(inputs.key_cache).any() and torch.isnan(inputs.value_cache).any()
    for num_kv_splits in (1, 4):
        out = run_triton(config, inputs, num_kv_splits=num_kv_splits)
        assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Split-KV path, forced on
# ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("gpu_like_fp8_rounding")
@pytest.mark.parametrize("num_kv_splits", [3, 8])
@pytest.mark.parametrize(
    "kv_cache_dtype, kv_quant_mode, features",
    [
        pytest.param("float16", KVQuantMode.NONE, dict(use_sinks=True), id="none-fp16-sinks"),
        pytest.param(
            "float8_e4m3fn",
            KVQuantMode.FP8_PER_TENSOR,
            dict(use_sinks=True, out_dtype="float8_e4m3fn"),
            id="fp8_per_tensor-e4m3-fp16-sinks-fp8out",
        ),
        pytest.param(
            "int8",
            KVQuantMode.INT8_PER_TOKEN_HEAD,
            dict(sliding_window=SLIDING_WINDOW),
            id="int8_per_token_head-fp16-window",
        ),
        pytest.param(
            "float8_e5m2",
            KVQuantMode.FP8_PER_TOKEN_HEAD,
            dict(logits_soft_cap=SOFT_CAP, use_alibi=True),
            id="fp8_per_token_head-e5m2-fp16-softcap-alibi",
        ),
    ],
)
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_split_kv_forced(num_kv_splits, kv_cache_dtype, kv_quant_mode, features, batch):
    config = make_config(kv_cache_dtype=kv_cache_dtype, kv_quant_mode=kv_quant_mode, **features)
    q_lens, kv_lens = ([1, 1, 1, 1], [1, 17, 70, 129]) if batch == "decode" else (Q_LENS, KV_LENS)
    inputs = make_inputs(config, q_lens, kv_lens)
    out = run_triton(config, inputs, num_kv_splits=num_kv_splits)
    tol = sixteen_bit_tolerance(inputs)
    assert_close_to_oracle(out, oracle(config, inputs), **fp8_output_tolerance(config, inputs, **tol))


# ---------------------------------------------------------------------------------------------
# FP8 query (both dots in e4m3), the vLLM PR #42080 case
# ---------------------------------------------------------------------------------------------


def fp8_q_config(out_dtype="float32", **kw) -> AttentionConfig:
    # float32 output by default: an fp8 query's default output, bfloat16, is cast wrongly by the
    # interpreter (it truncates); bfloat16 output is checked on the GPU.
    return make_config(
        q_dtype="float8_e4m3fn",
        kv_cache_dtype="float8_e4m3fn",
        kv_quant_mode=KVQuantMode.FP8_PER_TENSOR,
        out_dtype=out_dtype,
        **kw,
    )


@pytest.mark.parametrize(
    "features", list(FEATURES.values()), ids=[f"fp8_per_tensor-fp8q-h32-bs16-{f}" for f in FEATURES]
)
def test_fp8_query_features(features):
    config = fp8_q_config(**features)
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    assert_close_to_oracle(run_triton(config, inputs), oracle(config, inputs), **sixteen_bit_tolerance(inputs))


def test_pr42080_fp8_query_with_scales():
    """e4m3 Q and KV quantized as (x / scale).to(fp8) with q_scale=0.75, k_scale=0.5, v_scale=0.25."""
    config = fp8_q_config(head_size=64, num_kv_heads=1)
    inputs = make_inputs(config, EDGE_Q_LENS, EDGE_KV_LENS, q_scale=0.75, k_scale=0.5, v_scale=0.25)
    assert_close_to_oracle(run_triton(config, inputs), oracle(config, inputs), **sixteen_bit_tolerance(inputs))


@pytest.mark.usefixtures("gpu_like_fp8_rounding")
@pytest.mark.parametrize(
    "head_size, num_kv_heads, num_kv_splits, out_dtype, features",
    [
        (32, 2, 3, "float32", dict(use_sinks=True)),
        (32, 4, 3, "float8_e4m3fn", dict(use_alibi=True, sliding_window=SLIDING_WINDOW)),
        (80, 1, 1, "float16", {}),
        (80, 1, 5, "float32", dict(logits_soft_cap=SOFT_CAP)),
        (8, 2, 1, "float16", {}),
    ],
    ids=[
        "fp8_per_tensor-fp8q-h32-bs16-split3-sinks",
        "fp8_per_tensor-fp8q-h32-bs16-split3-fp8out-alibi-window",
        "fp8_per_tensor-fp8q-h80-bs16-fp16out",
        "fp8_per_tensor-fp8q-h80-bs16-split5-softcap",
        "fp8_per_tensor-fp8q-h8-bs16-fp16out",
    ],
)
def test_fp8_query_split_head_size_and_outputs(head_size, num_kv_heads, num_kv_splits, out_dtype, features):
    config = fp8_q_config(out_dtype=out_dtype, head_size=head_size, num_kv_heads=num_kv_heads, **features)
    inputs = make_inputs(config, [1, 1, 17, 1], [1, 40, 70, 129])
    out = run_triton(config, inputs, num_kv_splits=num_kv_splits)
    tol = fp8_output_tolerance(config, inputs, **sixteen_bit_tolerance(inputs))
    assert_close_to_oracle(out, oracle(config, inputs), **tol)


# ---------------------------------------------------------------------------------------------
# Every scale is applied: right scales match, any one replaced by 1.0 does not
# ---------------------------------------------------------------------------------------------


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.mark.usefixtures("gpu_like_fp8_rounding")
@pytest.mark.parametrize(
    "q_dtype, kv_cache_dtype, kv_quant_mode, out_dtype, scale_names",
    [
        ("float8_e4m3fn", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR, "float32", ["q_scale", "k_scale", "v_scale"]),
        ("float8_e4m3fn", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR, "float8_e4m3fn", ["output_scale"]),
        ("float16", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR, "float16", ["k_scale", "v_scale"]),
        ("float16", "float8_e5m2", KVQuantMode.FP8_PER_TOKEN_HEAD, "float16", ["k_scale_cache", "v_scale_cache"]),
        ("float16", "int8", KVQuantMode.INT8_PER_TOKEN_HEAD, "float16", ["k_scale_cache", "v_scale_cache"]),
    ],
    ids=["fp8_per_tensor-fp8q", "fp8_per_tensor-fp8q-fp8out", "fp8_per_tensor-e4m3-fp16",
         "fp8_per_token_head-e5m2-fp16", "int8_per_token_head-fp16"],
)
@pytest.mark.parametrize("num_kv_splits", [1, 2], ids=["single_pass", "split2"])
def test_each_scale_is_applied(q_dtype, kv_cache_dtype, kv_quant_mode, out_dtype, scale_names, num_kv_splits):
    config = make_config(
        q_dtype=q_dtype, kv_cache_dtype=kv_cache_dtype, kv_quant_mode=kv_quant_mode, out_dtype=out_dtype
    )
    inputs = make_inputs(config, Q_LENS, KV_LENS)
    ref = oracle(config, inputs)
    right = run_triton(config, inputs, num_kv_splits=num_kv_splits)
    # With the right scales: rounding only (fp8 output: <= 2^-4 relative; otherwise ~1e-3).
    right_error = relative_error(right, ref)
    assert right_error < (E4M3_HALF_ULP if config.out_is_fp8 else 2e-3), right_error
    for name in scale_names:
        wrong_kwargs = dict(inputs.kwargs, **{name: torch.ones_like(inputs.kwargs[name])})
        out = launcher.unified_attention(*inputs.args, config=config, num_kv_splits=num_kv_splits, **wrong_kwargs)
        # Read the output with the right output_scale, as the caller would.
        wrong_error = relative_error(output_as_real(out, config, inputs), ref)
        assert wrong_error > 0.1 and wrong_error > 10 * right_error, (name, wrong_error, right_error)
