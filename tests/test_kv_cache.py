"""dispatch.kv_cache: the quantizing KV writer against float64 references.

The reference here is written from the documented semantics alone: a scale is a
dequantization factor (real = stored * scale), per-token-head scales are
amax(|row|) / format max (MIN_SCALE for an all-zero row), and rounding to the
format is to nearest, so a round trip errs by at most the format's unit
roundoff relative to the value (plus half the smallest subnormal step, times
the scale, where fp8 runs out of normal numbers; half a step for int8).
"""

import math

import pytest
import torch

import dispatch
from dispatch import AttentionConfig, InputError, KVQuantMode
from dispatch.kv_cache import (
    FORMAT_MAX,
    MIN_SCALE,
    calibrate_scale,
    paged_kv_from_dense,
    slots_for,
    write_kv,
    zeros_cache,
)

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 4, 2, 32, 16
# Unit roundoff and smallest subnormal step of each fp8 format.
FP8_UNIT_ROUNDOFF = {torch.float8_e4m3fn: 2.0**-4, torch.float8_e5m2: 2.0**-3}
FP8_MIN_SUBNORMAL = {torch.float8_e4m3fn: 2.0**-9, torch.float8_e5m2: 2.0**-16}

PER_TOKEN_HEAD = [
    ("float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD),
    ("float8_e5m2", KVQuantMode.FP8_PER_TOKEN_HEAD),
    ("int8", KVQuantMode.INT8_PER_TOKEN_HEAD),
]


def config(kv_cache_dtype="float16", mode=KVQuantMode.NONE, q_dtype="float16"):
    return AttentionConfig(num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, q_dtype=q_dtype,
                           kv_cache_dtype=kv_cache_dtype, kv_quant_mode=mode, block_size=BLOCK, backend="sdpa")


def new_tokens(num_tokens, dtype=torch.float16, seed=0):
    """Keys and values with per-head magnitudes 0.01 .. 40 (so per-token-head scales really differ),
    a zero row (token 0, head 0) and a row with values down in fp16's subnormal range."""
    gen = torch.Generator().manual_seed(seed)
    gain = torch.tensor([0.01, 40.0]).view(1, KV_HEADS, 1)
    key = torch.randn(num_tokens, KV_HEADS, HEAD_SIZE, generator=gen) * gain
    value = torch.randn(num_tokens, KV_HEADS, HEAD_SIZE, generator=gen) * gain.flip(1)
    key[0, 0] = 0.0
    value[0, 0] = 0.0
    key[1, 0] = torch.randn(HEAD_SIZE, generator=gen) * 1e-6
    return key.to(dtype), value.to(dtype)


def permuted_slots(num_tokens, num_blocks, seed=1):
    """Distinct slots scattered over the pages, so placement is really tested."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks * BLOCK, generator=gen)[:num_tokens]


def poisoned(num_blocks, dtype):
    """A cache whose every byte is 0x7F (NaN in fp8, 127 in int8, a large finite fp16), to see untouched slots."""
    cache = zeros_cache((num_blocks, BLOCK, KV_HEADS, HEAD_SIZE), dtype, "cpu")
    cache.view(torch.uint8).fill_(0x7F)
    return cache


def rows_at(cache, slots):
    return cache[slots // BLOCK, slots % BLOCK]


def assert_round_trip(stored, scale, original, dtype):
    """|stored * scale - x| within one rounding of the format, in float64.

    The quotient x / scale is formed in float32 before it is rounded to the format, which may
    move a value off a rounding tie: that adds at most one float32 rounding, |x| * 2^-24.
    """
    real = stored.double() * scale.double()[..., None]
    x = original.double()
    if dtype == torch.int8:
        bound = 0.5 * scale.double()[..., None]
    else:
        bound = (FP8_UNIT_ROUNDOFF[dtype] * x.abs()
                 + 0.5 * FP8_MIN_SUBNORMAL[dtype] * scale.double()[..., None])
    excess = (real - x).abs() - (bound + x.abs() * 2.0**-24)
    assert excess.max() <= 0, f"round trip error exceeds one rounding by {excess.max():.3g}"


@pytest.mark.parametrize("cache_dtype,mode", PER_TOKEN_HEAD, ids=[d for d, _ in PER_TOKEN_HEAD])
def test_per_token_head_scales_round_trip_and_placement(cache_dtype, mode):
    cfg = config(cache_dtype, mode)
    dtype = cfg.kv_cache_torch_dtype
    num_blocks, num_tokens = 5, 37
    key, value = new_tokens(num_tokens)
    slots = permuted_slots(num_tokens, num_blocks)
    key_cache, value_cache = poisoned(num_blocks, dtype), poisoned(num_blocks, dtype)
    k_scales = torch.full((num_blocks, BLOCK, KV_HEADS), -1.0)
    v_scales = torch.full((num_blocks, BLOCK, KV_HEADS), -1.0)
    write_kv(key, value, key_cache, value_cache, slots.to(torch.int32), config=cfg,
             k_scale_cache=k_scales, v_scale_cache=v_scales, validate=True)

    fmax = FORMAT_MAX[dtype]
    for original, cache, scales in ((key, key_cache, k_scales), (value, value_cache, v_scales)):
        amax = original.double().abs().amax(-1)
        expected = torch.where(amax > 0, (amax / fmax).float(), torch.tensor(MIN_SCALE))
        got = rows_at(scales, slots)
        assert torch.equal(got, expected), "per-token-head scales differ from amax / format max"
        stored = rows_at(cache, slots)
        assert_round_trip(stored, got, original, dtype)
        # The row's largest element uses the whole range.
        nonzero = amax > 0
        assert torch.equal(stored.float().abs().amax(-1)[nonzero], torch.full_like(amax[nonzero], fmax).float())
        # The all-zero row: stored zeros with a positive, finite scale, so it reads back as zeros.
        assert torch.equal(stored[0, 0].float(), torch.zeros(HEAD_SIZE))
        assert got[0, 0] == MIN_SCALE and math.isfinite(MIN_SCALE) and MIN_SCALE > 0
        # Nothing else was written.
        untouched = torch.ones(num_blocks * BLOCK, dtype=torch.bool)
        untouched[slots] = False
        assert (cache.view(torch.uint8).reshape(num_blocks * BLOCK, -1)[untouched] == 0x7F).all()
        assert (scales.reshape(num_blocks * BLOCK, -1)[untouched] == -1.0).all()


@pytest.mark.parametrize("cache_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_per_tensor_uses_the_given_scales_and_saturates(cache_dtype):
    cfg = config(cache_dtype, KVQuantMode.FP8_PER_TENSOR)
    dtype = cfg.kv_cache_torch_dtype
    num_blocks, num_tokens = 4, 29
    key, value = new_tokens(num_tokens)
    # Distinct, non-unit scales whose range (about +-22 and +-56) cuts into the keys of magnitude ~40.
    k_value, v_value = (0.05, 0.125) if dtype == torch.float8_e4m3fn else (2.0**-11, 2.0**-10)
    k_scale, v_scale = torch.tensor([k_value]), torch.tensor([v_value])
    slots = permuted_slots(num_tokens, num_blocks)
    key_cache, value_cache = poisoned(num_blocks, dtype), poisoned(num_blocks, dtype)
    write_kv(key, value, key_cache, value_cache, slots, config=cfg, k_scale=k_scale, v_scale=v_scale)
    fmax = FORMAT_MAX[dtype]
    for original, cache, scale in ((key, key_cache, k_value), (value, value_cache, v_value)):
        stored = rows_at(cache, slots)
        inside = original.double().abs() <= fmax * scale
        real = stored.double() * scale
        x = original.double()
        bound = FP8_UNIT_ROUNDOFF[dtype] * x.abs() + 0.5 * FP8_MIN_SUBNORMAL[dtype] * scale + x.abs() * 2.0**-24
        assert ((real - x).abs() <= bound)[inside].all()
        # Values beyond the range saturate to +-format max (never NaN).
        assert torch.equal(stored.float()[~inside].abs(), torch.full_like(x[~inside], fmax).float())
        assert torch.isfinite(stored.float()).all()
    assert (key.double().abs() > fmax * k_value).any(), "the case should include saturated keys"


def test_sixteen_bit_cache_is_an_exact_copy():
    cfg = config("bfloat16", KVQuantMode.NONE, q_dtype="bfloat16")
    key, value = new_tokens(21, dtype=torch.bfloat16)
    slots = permuted_slots(21, 3)
    key_cache, value_cache = poisoned(3, torch.bfloat16), poisoned(3, torch.bfloat16)
    write_kv(key, value, key_cache, value_cache, slots, config=cfg)
    assert torch.equal(rows_at(key_cache, slots), key)
    assert torch.equal(rows_at(value_cache, slots), value)


@pytest.mark.parametrize("cache_dtype,mode", [("float16", KVQuantMode.NONE),
                                              ("float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR)] + PER_TOKEN_HEAD)
def test_strided_vllm_views_get_the_same_bytes(cache_dtype, mode):
    """vLLM allocates [num_blocks, 2, block_size, heads, head_size] and writes through kv[:, 0] / kv[:, 1]."""
    cfg = config(cache_dtype, mode)
    dtype = cfg.kv_cache_torch_dtype
    num_blocks, num_tokens = 4, 23
    key, value = new_tokens(num_tokens)
    slots = permuted_slots(num_tokens, num_blocks)
    scales = {}
    if mode is KVQuantMode.FP8_PER_TENSOR:
        scales = dict(k_scale=torch.tensor([0.5]), v_scale=torch.tensor([0.25]))

    def scale_caches():
        if not mode.is_per_token_head:
            return {}
        return dict(k_scale_cache=torch.zeros(num_blocks, BLOCK, KV_HEADS),
                    v_scale_cache=torch.zeros(num_blocks, BLOCK, KV_HEADS))

    kv = zeros_cache((num_blocks, 2, BLOCK, KV_HEADS, HEAD_SIZE), dtype, "cpu")
    strided = scale_caches()
    write_kv(key, value, kv[:, 0], kv[:, 1], slots, config=cfg, **scales, **strided)
    assert not kv[:, 0].is_contiguous()
    key_cache = zeros_cache((num_blocks, BLOCK, KV_HEADS, HEAD_SIZE), dtype, "cpu")
    value_cache = zeros_cache((num_blocks, BLOCK, KV_HEADS, HEAD_SIZE), dtype, "cpu")
    dense = scale_caches()
    write_kv(key, value, key_cache, value_cache, slots, config=cfg, **scales, **dense)
    assert torch.equal(kv[:, 0].contiguous().view(torch.uint8), key_cache.view(torch.uint8))
    assert torch.equal(kv[:, 1].contiguous().view(torch.uint8), value_cache.view(torch.uint8))
    for name in dense:
        assert torch.equal(strided[name], dense[name])


def test_slots_for_follows_the_vllm_convention():
    block_table = torch.tensor([[3, 0, 7], [5, 2, 1]], dtype=torch.int32)
    seq_index = torch.tensor([0, 0, 0, 1, 1])
    positions = torch.tensor([0, 15, 16, 17, 40])
    expected = torch.tensor([3 * 16 + 0, 3 * 16 + 15, 0 * 16 + 0, 2 * 16 + 1, 1 * 16 + 8])
    assert torch.equal(slots_for(block_table, seq_index, positions, BLOCK), expected)


def test_calibrate_scale_is_amax_over_format_max():
    x = torch.tensor([[0.5, -3.0], [2.0, 1.0]], dtype=torch.float16)
    assert torch.equal(calibrate_scale(x, "float8_e4m3fn"), torch.tensor([3.0 / 448.0]))
    assert torch.equal(calibrate_scale(x, torch.float8_e4m3fn, headroom=2.0), torch.tensor([6.0 / 448.0]))
    assert torch.equal(calibrate_scale(torch.zeros(3), "float8_e5m2"), torch.tensor([MIN_SCALE]))
    with pytest.raises(InputError, match="headroom"):
        calibrate_scale(x, "float8_e4m3fn", headroom=0.5)


@pytest.mark.parametrize("cache_dtype,mode", [("float16", KVQuantMode.NONE),
                                              ("float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR)] + PER_TOKEN_HEAD)
def test_paged_kv_from_dense_places_every_token_and_attention_reads_it(cache_dtype, mode):
    """Lengths around the page edge; the pages read back through the block table are the input
    (within one rounding), and dispatch.attention on them matches the float64 oracle."""
    from tests.oracle import reference_attention

    cfg = config(cache_dtype, mode)
    lengths = [1, 15, 16, 17]
    gen = torch.Generator().manual_seed(3)
    keys = [torch.randn(n, KV_HEADS, HEAD_SIZE, generator=gen).half() for n in lengths]
    values = [torch.randn(n, KV_HEADS, HEAD_SIZE, generator=gen).half() for n in lengths]
    paged = paged_kv_from_dense(keys, values, config=cfg, spare_blocks=1)
    assert paged.seq_lens.tolist() == lengths
    assert paged.block_table.dtype == torch.int32 and paged.seq_lens.dtype == torch.int32
    dtype = cfg.kv_cache_torch_dtype
    for s, n in enumerate(lengths):
        pages = paged.block_table[s, torch.arange(n) // BLOCK].long()
        offsets = torch.arange(n) % BLOCK
        for original, cache, scale, scale_cache in ((keys[s], paged.key_cache, paged.k_scale, paged.k_scale_cache),
                                                    (values[s], paged.value_cache, paged.v_scale,
                                                     paged.v_scale_cache)):
            stored = cache[pages, offsets]
            if mode is KVQuantMode.NONE:
                assert torch.equal(stored, original)
                continue
            row_scale = (scale_cache[pages, offsets] if scale_cache is not None
                         else scale.expand(n, KV_HEADS))
            assert_round_trip(stored, row_scale, original, dtype)
    if mode is KVQuantMode.FP8_PER_TENSOR:
        assert torch.equal(paged.k_scale, calibrate_scale(torch.cat(keys), dtype))

    q_lens = [1, 3, 16, 2]
    q = torch.randn(sum(q_lens), HEADS, HEAD_SIZE, generator=gen).half()
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    out = dispatch.attention(q, paged.key_cache, paged.value_cache, cu, paged.seq_lens, paged.block_table,
                             config=cfg, **paged.scales())
    expected = reference_attention(q, paged.key_cache, paged.value_cache, cu, paged.seq_lens, paged.block_table,
                                   causal=True, softmax_scale=cfg.scale, **paged.scales())
    # sdpa computes in fp16 from the dequantized cache: a few fp16 roundings of |v| ~ 3.
    assert (out.double() - expected).abs().max() < 3e-2


def test_refusals_name_the_argument():
    cfg = config("float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR)
    key, value = new_tokens(3)
    key_cache, value_cache = poisoned(2, cfg.kv_cache_torch_dtype), poisoned(2, cfg.kv_cache_torch_dtype)
    slots = torch.tensor([0, 1, 2])
    scale = torch.tensor([1.0])
    with pytest.raises(InputError, match=r"k_scale: required for kv_quant_mode=FP8_PER_TENSOR, got None"):
        write_kv(key, value, key_cache, value_cache, slots, config=cfg, v_scale=scale)
    with pytest.raises(InputError, match=r"k_scale_cache: must be None"):
        write_kv(key, value, key_cache, value_cache, slots, config=cfg, k_scale=scale, v_scale=scale,
                 k_scale_cache=torch.zeros(2, BLOCK, KV_HEADS))
    with pytest.raises(InputError, match=r"slot_mapping: expected an int32 or int64 tensor \[num_tokens=3\]"):
        write_kv(key, value, key_cache, value_cache, slots[:2], config=cfg, k_scale=scale, v_scale=scale)
    with pytest.raises(InputError, match=r"key: expected float16 or bfloat16, got torch.float32"):
        write_kv(key.float(), value.float(), key_cache, value_cache, slots, config=cfg, k_scale=scale, v_scale=scale)
    with pytest.raises(InputError, match=r"key_cache: expected dtype torch.float8_e4m3fn"):
        write_kv(key, value, key_cache.view(torch.uint8), value_cache, slots, config=cfg, k_scale=scale,
                 v_scale=scale)
    with pytest.raises(InputError, match=r"slot_mapping: token 1 has slot 32, not in \[0, 32\)"):
        write_kv(key, value, key_cache, value_cache, torch.tensor([0, 32, 1]), config=cfg, k_scale=scale,
                 v_scale=scale, validate=True)
    with pytest.raises(InputError, match=r"slot_mapping: slots must be distinct"):
        write_kv(key, value, key_cache, value_cache, torch.tensor([4, 4, 1]), config=cfg, k_scale=scale,
                 v_scale=scale, validate=True)
    sixteen = config("float16", KVQuantMode.NONE)
    with pytest.raises(InputError, match=r"key: expected dtype torch.float16 for kv_quant_mode=NONE"):
        write_kv(key.bfloat16(), value.bfloat16(), poisoned(2, torch.float16), poisoned(2, torch.float16), slots,
                 config=sixteen)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype,mode", [("bfloat16", KVQuantMode.NONE),
                                              ("float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR)] + PER_TOKEN_HEAD)
def test_write_kv_never_syncs_on_cuda(cache_dtype, mode):
    cfg = config(cache_dtype, mode, q_dtype="bfloat16")
    dtype = cfg.kv_cache_torch_dtype
    key, value = (t.cuda() for t in new_tokens(40, dtype=torch.bfloat16))
    slots = permuted_slots(40, 4).cuda()
    kv = zeros_cache((4, 2, BLOCK, KV_HEADS, HEAD_SIZE), dtype, "cuda")
    kwargs = {}
    if mode is KVQuantMode.FP8_PER_TENSOR:
        kwargs = dict(k_scale=torch.tensor([0.5], device="cuda"), v_scale=torch.tensor([0.25], device="cuda"))
    elif mode.is_per_token_head:
        kwargs = dict(k_scale_cache=torch.zeros(4, BLOCK, KV_HEADS, device="cuda"),
                      v_scale_cache=torch.zeros(4, BLOCK, KV_HEADS, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        write_kv(key, value, kv[:, 0], kv[:, 1], slots, config=cfg, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = zeros_cache((4, 2, BLOCK, KV_HEADS, HEAD_SIZE), dtype, "cpu")
    cpu_kwargs = {name: t.cpu() * 0 if name.endswith("cache") else t.cpu() for name, t in kwargs.items()}
    write_kv(key.cpu(), value.cpu(), reference[:, 0], reference[:, 1], slots.cpu(), config=cfg, **cpu_kwargs)
    assert torch.equal(kv.cpu().view(torch.uint8), reference.view(torch.uint8))
