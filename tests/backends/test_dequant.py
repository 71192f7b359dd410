"""The dequant backend: its workspace against a float64 dequantization, its attention against the oracle.

CPU (under TRITON_INTERPRET=1, tiny shapes, float16: the interpreter truncates fp32 ->
bfloat16 casts, so bf16 runs on the GPU only):
- the workspace equals the float64 dequantization stored * scale rounded once to the query's
  dtype, bit for bit, in every slot a sequence owns; the rest of each sequence's last page is
  zero and later pages are not written; strided (vLLM-layout) caches and scale caches give the
  same bits; values built so that a plain fp32 product would round twice come out right;
- attention through `dispatch.attention(backend="dequant")` against tests/oracle.py for each
  quantized mode, with GQA, lengths around page and tile edges, chunked prefill (q_len <
  kv_len, causal), NaN-poisoned unused pages, and cache pages smaller than, equal to and larger
  than the workspace's; the bound is the parity grid's: k x the error of a plain same-precision
  computation (tests/parity/same_precision.py, which rounds K and V to the query's dtype as this
  backend does) plus two roundings of the exact result into the output dtype;
- the capability: which inner backend runs, and every refusal with its reasons.

GPU (marked gpu): the workspace at serving sizes in bf16 and fp16, FlashAttention 4 as the inner
backend against the float64 reference, and the call without host syncs and inside a CUDA graph.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backends.dequant as dequant
import dispatch
from dispatch import AttentionConfig, KVQuantMode, UnsupportedConfigError
from dispatch.capabilities import DeviceInfo, reasons, resolve_device
from tests.cases import make_inputs, output_as_real
from tests.oracle import reference_attention
from tests.parity.same_precision import float64_attention, output_rounding_error, same_precision_attention

kernel = pytest.importorskip("backends.dequant.kernel")  # imports triton

CPU = DeviceInfo(type="cpu", name="cpu", triton_interpret=True)
CPU_WITHOUT_INTERPRETER = DeviceInfo(type="cpu", name="cpu", triton_interpret=False)
H200 = DeviceInfo(type="cuda", index=0, name="H200", compute_capability=(9, 0))

# (id, kv_cache_dtype, kv_quant_mode): every quantized mode, both fp8 formats.
MODES = [
    ("e4m3-per-tensor", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR),
    ("e5m2-per-tensor", "float8_e5m2", KVQuantMode.FP8_PER_TENSOR),
    ("e4m3-per-token-head", "float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD),
    ("e5m2-per-token-head", "float8_e5m2", KVQuantMode.FP8_PER_TOKEN_HEAD),
    ("int8-per-token-head", "int8", KVQuantMode.INT8_PER_TOKEN_HEAD),
]
# Lengths around page (16, 32) and tile (128) edges; decode, whole prompts and chunked prefill in one batch.
EDGE_Q_LENS = [1, 15, 16, 17, 1, 127, 3]
EDGE_KV_LENS = [1, 15, 16, 129, 128, 127, 129]


def make_config(kv_cache_dtype="float8_e4m3fn", kv_quant_mode=KVQuantMode.FP8_PER_TENSOR, *, q_dtype="float16",
                num_heads=4, num_kv_heads=2, head_size=32, block_size=16, **fields) -> AttentionConfig:
    return AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, q_dtype=q_dtype,
                           kv_cache_dtype=kv_cache_dtype, kv_quant_mode=kv_quant_mode, block_size=block_size,
                           backend="dequant", **fields)


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `x` rounded to nearest even in `dtype` (fp16 / bf16), directly.

    torch's own float64 -> 16-bit cast goes through float32 and so rounds twice. Here x is
    split into an integer number of ulps of its binade (x / ulp is exact: ulp is a power of two),
    rounded half to even in float64 (exact), and multiplied back, which lands on a value of
    `dtype` that the final cast keeps as it is. Subnormal results use the subnormal spacing.
    """
    digits = {torch.float16: 11, torch.bfloat16: 8}[dtype]
    _, exponent = torch.frexp(x)  # x = m * 2**exponent with 0.5 <= |m| < 1
    ulp = torch.ldexp(torch.ones_like(x), exponent - digits)
    smallest = torch.finfo(dtype).smallest_normal * 2.0 ** (1 - digits)
    ulp = torch.clamp(ulp, min=smallest)
    return (torch.round(x / ulp) * ulp).to(dtype)


def test_round_once_rounds_ties_to_even_and_is_not_torchs_double_rounding():
    tie = 1 + 2.0**-11  # halfway between the fp16 values 1 and 1 + 2**-10
    x = torch.tensor([tie, tie + 2.0**-40, tie - 2.0**-40, 3 * tie, -tie - 2.0**-40, 2.0**-25, 3 * 2.0**-26],
                     dtype=torch.float64)
    expected = [1.0, 1 + 2.0**-10, 1.0, 3 + 2.0**-9, -(1 + 2.0**-10), 0.0, 2.0**-24]
    assert round_once(x, torch.float16).double().tolist() == expected
    # What this helper exists for: torch rounds through float32 and loses the 2**-40.
    assert x[1].to(torch.float16).item() == 1.0


# ------------------------------------------------------------------------------------------------
# Module structure and capability
# ------------------------------------------------------------------------------------------------


def test_importing_the_backend_imports_no_triton_and_no_other_backend():
    code = ("import sys, backends.dequant as b; b.CAPABILITY; "
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('backends.') and "
            "not m.startswith('backends.dequant')))")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_forward_path_never_reads_device_values():
    # CUDA-graph safety: the workspace's size comes from shapes, lengths and scales are read by the kernel.
    source = (Path(kernel.__file__).read_text() + Path(dequant.__file__).read_text())
    for forbidden in (".item(", ".cpu(", ".tolist(", "bool(", ".numpy("):
        assert forbidden not in source, forbidden


def test_forward_takes_the_dispatch_keywords():
    expected = ["q", "key_cache", "value_cache", "cu_seqlens_q", "seq_lens", "block_table", "config", "q_scale",
                "k_scale", "v_scale", "k_scale_cache", "v_scale_cache", "alibi_slopes", "sinks", "output_scale", "out"]
    parameters = inspect.signature(dequant.forward).parameters
    assert list(parameters) == expected
    assert all(parameters[name].kind is inspect.Parameter.KEYWORD_ONLY for name in expected[6:])


def test_dequant_is_registered_but_not_in_autos_default_order():
    assert "dequant" in dispatch.backend_names()
    assert "dequant" not in dispatch.default_order()


def test_workspace_config_is_the_same_call_in_16_bits():
    config = make_config("int8", KVQuantMode.INT8_PER_TOKEN_HEAD, q_dtype="bfloat16", block_size=128,
                         sliding_window=7, use_sinks=True, out_dtype="float32")
    sixteen = dequant.workspace_config(config, "triton")
    assert (sixteen.q_dtype, sixteen.kv_cache_dtype, sixteen.kv_quant_mode) == ("bfloat16", "bfloat16",
                                                                                KVQuantMode.NONE)
    assert sixteen.block_size == dequant.WORKSPACE_BLOCK_SIZE and sixteen.backend == "triton"
    unchanged = ("num_heads", "num_kv_heads", "head_size", "sliding_window", "use_sinks", "out_dtype", "causal",
                 "softmax_scale", "logits_soft_cap", "use_alibi")
    assert all(getattr(sixteen, f) == getattr(config, f) for f in unchanged)


def test_inner_backend_on_cpu_is_triton_in_fp16_and_sdpa_where_triton_refuses():
    assert dequant.choose_inner(make_config(), CPU).name == "triton"
    # The interpreter mis-rounds fp8 outputs, so triton refuses them on the CPU; sdpa runs them.
    fp8_out = make_config(out_dtype="float8_e4m3fn")
    choice = dequant.choose_inner(fp8_out, CPU)
    assert choice.name == "sdpa"
    assert [name for name, _ in choice.refused] == ["flash_attn", "triton"]
    assert any("out_dtype=float8_e4m3fn" in r for r in dict(choice.refused)["triton"])


def test_inner_backend_on_a_gpu_is_graph_safe_and_follows_the_preference_order():
    # Without flash-attn installed (this machine) FA4 is refused and triton runs the 16-bit config.
    config = make_config(num_heads=32, num_kv_heads=8, head_size=128, q_dtype="bfloat16")
    choice = dequant.choose_inner(config, H200)
    if choice.refused and choice.refused[0][0] == "flash_attn":
        assert choice.name == "triton"
    else:
        assert choice.name == "flash_attn"
    # A head size no graph-safe 16-bit backend computes: sdpa would, but it reads lengths on the host.
    odd = make_config(head_size=36)
    assert dequant.choose_inner(odd, H200).plan is None
    why = reasons(dequant.CAPABILITY.replace(required_modules=()), odd, H200)
    assert [r.split(":")[0] for r in why] == [f"inner backend {name!r} cannot run the dequantized config "
                                              f"(kv_cache_dtype=float16, kv_quant_mode=NONE, block_size=32)"
                                              for name in ("flash_attn", "triton", "sdpa")]
    assert "not CUDA-graph safe" in why[2]
    assert "head_size=36" in why[1]


def test_refusals_name_the_field():
    def why(config, device=CPU):
        return reasons(dequant.CAPABILITY, config, device)

    assert why(make_config()) == []
    assert why(make_config(q_dtype="bfloat16")) == [
        "q_dtype=bfloat16 not supported on device='cpu': the Triton interpreter truncates fp32->bfloat16 casts, "
        "so the workspace would not be rounded to nearest (the GPU rounds it right)"]
    assert why(make_config(), CPU_WITHOUT_INTERPRETER) == [
        "device='cpu' needs TRITON_INTERPRET=1 (the dequantization kernel is Triton, which runs on CPU only "
        "through its interpreter)"]
    fp8_query = make_config(q_dtype="float8_e4m3fn")
    assert why(fp8_query) == ["q_dtype='float8_e4m3fn' not in {'bfloat16', 'float16'}"]
    sixteen_bit = make_config("float16", KVQuantMode.NONE)
    assert why(sixteen_bit) == [
        "kv_cache_dtype='float16' not in {'float8_e4m3fn', 'float8_e5m2', 'int8'}",
        "kv_quant_mode=NONE not in {'FP8_PER_TENSOR', 'FP8_PER_TOKEN_HEAD', 'INT8_PER_TOKEN_HEAD'}"]
    ampere = DeviceInfo(type="cuda", index=0, name="A100", compute_capability=(8, 0))
    assert any(r.startswith("compute capability 8.0 < 8.9") for r in why(make_config(), ampere))


def test_a_named_dequant_is_refused_not_replaced():
    config = make_config(q_dtype="bfloat16")
    inputs = make_inputs(config, [3], [20])
    with pytest.raises(UnsupportedConfigError, match="Backend 'dequant' cannot run this config"):
        dispatch.attention(*inputs.args, config=config, **inputs.kwargs)


def test_explain_describes_the_inner_preference():
    report = dispatch.explain(make_config(), "cpu").report("dequant")
    assert report.supported
    assert "flash_attn, triton, sdpa" in report.description


# ------------------------------------------------------------------------------------------------
# The workspace
# ------------------------------------------------------------------------------------------------


def reference_pages(cache, scale, scale_cache, block_table, seq, kv_len, block_size, dtype):
    """Sequence `seq`'s first kv_len tokens dequantized in float64, token by token through the block
    table, rounded once to `dtype`: [kv_len, num_kv_heads, head_size]."""
    rows = []
    for j in range(kv_len):
        page, slot = int(block_table[seq, j // block_size]), j % block_size
        real = cache[page, slot].double()
        if scale is not None:
            real = real * scale.double().reshape(())
        if scale_cache is not None:
            real = real * scale_cache[page, slot].double()[:, None]
        rows.append(real)
    return round_once(torch.stack(rows), dtype)


SENTINEL = -77.0  # what the workspace held before; pages past a sequence's end must keep it


def run_workspace(config, inputs, workspace_block_size, caches=None, scale_caches=None):
    """The kernel's workspace over a sentinel-filled buffer, with the inputs' caches or the given views."""
    key_cache, value_cache = caches or (inputs.key_cache, inputs.value_cache)
    kw = dict(inputs.kwargs)
    if scale_caches is not None:
        kw["k_scale_cache"], kw["v_scale_cache"] = scale_caches
    num_seqs, width = inputs.block_table.shape
    pages_per_seq = -(-width * config.block_size // workspace_block_size)
    workspace = torch.full((2, num_seqs * pages_per_seq, workspace_block_size, config.num_kv_heads,
                            config.head_size), SENTINEL, dtype=config.q_torch_dtype)
    return kernel.dequantize_pages(key_cache, value_cache, inputs.seq_lens, inputs.block_table,
                                   dtype=config.q_torch_dtype, workspace_block_size=workspace_block_size,
                                   k_scale=kw.get("k_scale"), v_scale=kw.get("v_scale"),
                                   k_scale_cache=kw.get("k_scale_cache"), v_scale_cache=kw.get("v_scale_cache"),
                                   workspace=workspace)


def assert_workspace_is_reference(config, inputs, workspace_block_size, result):
    """Every owned slot bit-equal to the float64 reference; the last page's tail zero; later pages untouched."""
    kw = inputs.kwargs
    key_ws, value_ws, table, _ = result
    num_seqs, pages_per_seq = table.shape
    assert torch.equal(table.flatten(), torch.arange(num_seqs * pages_per_seq, dtype=torch.int32))
    for name, cache, ws, scale, scale_cache in (
            ("key", inputs.key_cache, key_ws, kw.get("k_scale"), kw.get("k_scale_cache")),
            ("value", inputs.value_cache, value_ws, kw.get("v_scale"), kw.get("v_scale_cache"))):
        for seq, kv_len in enumerate(inputs.seq_lens.tolist()):
            owned = ws[table[seq].long()].flatten(0, 1)  # [pages_per_seq * workspace_block_size, H_kv, D]
            expected = reference_pages(cache, scale, scale_cache, inputs.block_table, seq, kv_len,
                                       config.block_size, config.q_torch_dtype)
            got = owned[:kv_len]
            mismatch = got.view(torch.int16) != expected.view(torch.int16)
            assert not mismatch.any(), (
                f"{name} seq {seq}: {int(mismatch.sum())} slots differ, first at "
                f"{tuple(int(i) for i in mismatch.nonzero()[0])}: {got[mismatch][0]} vs {expected[mismatch][0]}")
            written = -(-kv_len // workspace_block_size) * workspace_block_size
            assert torch.equal(owned[kv_len:written], torch.zeros_like(owned[kv_len:written])), \
                f"{name} seq {seq}: the tail of the last page is not zero"
            assert bool((owned[written:] == SENTINEL).all()), f"{name} seq {seq}: a page past the end was written"


@pytest.mark.parametrize("block_size, workspace_block_size", [(16, 32), (32, 32), (64, 32), (16, 16)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("mode_id, kv_cache_dtype, kv_quant_mode", MODES, ids=[m[0] for m in MODES])
def test_workspace_is_the_float64_dequantization_rounded_once(mode_id, kv_cache_dtype, kv_quant_mode, block_size,
                                                              workspace_block_size):
    config = make_config(kv_cache_dtype, kv_quant_mode, block_size=block_size, head_size=40)
    inputs = make_inputs(config, EDGE_KV_LENS, EDGE_KV_LENS, seed=3)  # NaN-poisoned unused slots
    assert_workspace_is_reference(config, inputs, workspace_block_size, run_workspace(config, inputs,
                                                                                      workspace_block_size))


def test_values_a_plain_float32_product_would_round_twice_come_out_right():
    """int8 values a with scales s whose float32 product lands exactly on a float16 tie while a * s does
    not: rounding that float32 product again gives the even neighbour, one ulp from the right answer."""
    candidates = []
    for a in range(3, 128, 2):
        # ties 1 + (2k + 1) 2**-11 between fp16 neighbours in [1, 2)
        ties = 1.0 + (2 * torch.arange(512, dtype=torch.float64) + 1) * 2.0**-11
        s = (ties / a).float()
        product = a * s.double()  # exact: 7 + 24 bits
        hits = (product.float().double() == ties) & (product != ties)
        candidates += [(a, float(v)) for v in s[hits]]
    assert len(candidates) >= 64
    tokens = 32
    values = torch.tensor([a for a, _ in candidates[:tokens * 2]], dtype=torch.int8)
    scales = torch.tensor([s for _, s in candidates[:tokens * 2]], dtype=torch.float32)
    # Token t of the key cache holds value a_t in every dimension with scale s_t (the value cache t + 32).
    key_cache = values[:tokens, None, None].expand(tokens, 1, 32).reshape(2, 16, 1, 32).contiguous()
    value_cache = values[tokens:, None, None].expand(tokens, 1, 32).reshape(2, 16, 1, 32).contiguous()
    k_scale_cache, v_scale_cache = scales[:tokens].reshape(2, 16, 1), scales[tokens:].reshape(2, 16, 1)
    block_table = torch.tensor([[1, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([tokens], dtype=torch.int32)
    key_ws, value_ws, _, _ = kernel.dequantize_pages(key_cache, value_cache, seq_lens, block_table,
                                                  dtype=torch.float16, workspace_block_size=32,
                                                  k_scale_cache=k_scale_cache, v_scale_cache=v_scale_cache)
    for cache, scale_cache, ws in ((key_cache, k_scale_cache, key_ws), (value_cache, v_scale_cache, value_ws)):
        real = (cache[[1, 0]].double() * scale_cache[[1, 0]].double()[..., None]).flatten(0, 1)
        assert torch.equal(ws.flatten(0, 1).view(torch.int16), round_once(real, torch.float16).view(torch.int16))
        twice = (cache[[1, 0]].float() * scale_cache[[1, 0]][..., None]).flatten(0, 1).to(torch.float16)
        assert not torch.equal(ws.flatten(0, 1), twice)  # the case really is one where rounding twice is wrong


def vllm_views(config, inputs):
    """The caches and scale caches as vLLM lays them out: K and V interleaved per page and head
    ([num_blocks, H_kv, block_size, 2 * D], then transpose(1, 2).split(D, -1)), the scales as
    [num_blocks, H_kv, block_size] transposed: same values, other strides."""
    key_cache, value_cache = inputs.key_cache, inputs.value_cache
    # Packed through uint8 views: the caches hold one-byte formats, and cat need not support fp8.
    packed = torch.cat([key_cache.view(torch.uint8), value_cache.view(torch.uint8)], dim=-1)
    packed = packed.transpose(1, 2).contiguous().view(key_cache.dtype)
    key_view, value_view = packed.transpose(1, 2).split(config.head_size, -1)
    assert torch.equal(key_view.view(torch.uint8), key_cache.view(torch.uint8)) and not key_view.is_contiguous()
    scale_views = None
    if "k_scale_cache" in inputs.kwargs:
        scale_views = tuple(inputs.kwargs[name].transpose(1, 2).contiguous().transpose(1, 2)
                            for name in ("k_scale_cache", "v_scale_cache"))
        assert not scale_views[0].is_contiguous()
    return (key_view, value_view), scale_views


@pytest.mark.parametrize("mode_id, kv_cache_dtype, kv_quant_mode", [MODES[0], MODES[4]],
                         ids=[MODES[0][0], MODES[4][0]])
def test_workspace_from_vllm_layout_views_is_the_same(mode_id, kv_cache_dtype, kv_quant_mode):
    config = make_config(kv_cache_dtype, kv_quant_mode, head_size=32)
    inputs = make_inputs(config, [1, 17, 40], [16, 17, 70], seed=5)
    caches, scale_caches = vllm_views(config, inputs)
    assert_workspace_is_reference(config, inputs, 32, run_workspace(config, inputs, 32, caches, scale_caches))


# ------------------------------------------------------------------------------------------------
# Attention through the backend
# ------------------------------------------------------------------------------------------------


def parity_bound(config, inputs, oracle: torch.Tensor, multiple: float = 2.0) -> float:
    """The parity grid's bound (tests/parity/test_parity.py): multiple x the error of the plain
    same-precision computation, plus two roundings of the exact result into the output dtype."""
    same = same_precision_attention(inputs, config).cpu()
    return multiple * float((same - oracle).abs().max()) + 2 * output_rounding_error(oracle, inputs, config) + 1e-6


def run_and_judge(config, q_lens, kv_lens, seed=0, multiple=2.0, inputs=None) -> torch.Tensor:
    inputs = inputs or make_inputs(config, q_lens, kv_lens, seed=seed)
    out = dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
    assert dispatch.select(config, "cpu").name == "dequant"
    assert out.dtype == config.out_torch_dtype and out.shape == inputs.q.shape
    got = output_as_real(out, config, inputs)
    oracle = reference_attention(*inputs.args, **inputs.oracle_kwargs(config))
    error = float((got - oracle).abs().max()) if torch.isfinite(got).all() else float("inf")
    bound = parity_bound(config, inputs, oracle, multiple)
    assert error <= bound, f"{config.summary()}: max error {error:.3g} > parity bound {bound:.3g}"
    return out


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("mode_id, kv_cache_dtype, kv_quant_mode", MODES, ids=[m[0] for m in MODES])
def test_attention_matches_the_oracle(mode_id, kv_cache_dtype, kv_quant_mode, block_size):
    config = make_config(kv_cache_dtype, kv_quant_mode, block_size=block_size)
    run_and_judge(config, EDGE_Q_LENS, EDGE_KV_LENS)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 2), (4, 4), (8, 1)], ids=["gqa4", "mha", "mqa"])
def test_attention_with_grouped_queries(num_heads, num_kv_heads):
    config = make_config("float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, head_size=64)
    # Short queries of 1, 3 and 4 tokens take one or two decode tiles (4 or 2 tokens per tile at GQA 4 / 8).
    run_and_judge(config, [1, 17, 4, 3, 5], [129, 17, 40, 3, 9])


@pytest.mark.parametrize("fields", [dict(causal=False), dict(sliding_window=8), dict(logits_soft_cap=2.0),
                                    dict(use_alibi=True), dict(use_sinks=True)],
                         ids=["non_causal", "window", "softcap", "alibi", "sinks"])
def test_attention_features_through_the_inner_triton_kernel(fields):
    config = make_config("int8", KVQuantMode.INT8_PER_TOKEN_HEAD, **fields)
    assert dequant.choose_inner(config, CPU).name == "triton"
    # softcap adds tanh's own rounding: the parity grid allows 3x there.
    run_and_judge(config, [1, 15, 17], [16, 15, 40], multiple=3.0 if "logits_soft_cap" in fields else 2.0)


def test_fp8_output_through_the_inner_sdpa():
    config = make_config("float8_e5m2", KVQuantMode.FP8_PER_TOKEN_HEAD, out_dtype="float8_e4m3fn")
    assert dequant.choose_inner(config, CPU).name == "sdpa"
    run_and_judge(config, [1, 15, 17], [16, 15, 40])


def test_poisoned_pages_do_not_change_a_bit():
    config = make_config("float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD)
    q_lens, kv_lens = [1, 15, 17], [17, 15, 40]
    poisoned = make_inputs(config, q_lens, kv_lens, seed=1)
    clean = make_inputs(config, q_lens, kv_lens, seed=1, poison=False)
    out = dispatch.attention(*poisoned.args, config=config, **poisoned.kwargs)
    again = dispatch.attention(*clean.args, config=config, **clean.kwargs)
    assert torch.isfinite(out).all()
    assert torch.equal(out.view(torch.int16), again.view(torch.int16))


def test_attention_on_vllm_layout_views_matches_contiguous_caches():
    config = make_config("int8", KVQuantMode.INT8_PER_TOKEN_HEAD)
    inputs = make_inputs(config, [1, 17, 5], [16, 17, 40], seed=2)
    caches, scale_caches = vllm_views(config, inputs)
    kwargs = dict(inputs.kwargs, k_scale_cache=scale_caches[0], v_scale_cache=scale_caches[1])
    strided = dispatch.attention(inputs.q, *caches, *inputs.args[3:], config=config, **kwargs)
    contiguous = dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
    assert torch.equal(strided, contiguous)


def test_writes_into_out():
    config = make_config()
    inputs = make_inputs(config, [1, 17], [16, 40], seed=4)
    out = torch.full_like(inputs.q, float("nan"))
    result = dispatch.attention(*inputs.args, config=config, out=out, **inputs.kwargs)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, dispatch.attention(*inputs.args, config=config, **inputs.kwargs))


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


def _gpu_choice(config: AttentionConfig):
    return dequant.choose_inner(config, resolve_device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode_id, kv_cache_dtype, kv_quant_mode", MODES, ids=[m[0] for m in MODES])
def test_gpu_workspace_at_serving_size_is_rounded_once(mode_id, kv_cache_dtype, kv_quant_mode, q_dtype):
    """4 x 4096 tokens plus a decode of 8192, 32/8 heads of 128, vLLM-layout views: bit-exact."""
    config = make_config(kv_cache_dtype, kv_quant_mode, q_dtype=q_dtype, num_heads=32, num_kv_heads=8,
                         head_size=128, block_size=16)
    kv_lens = [4096, 4095, 4097, 4000, 8192]
    inputs = make_inputs(config, [1] * len(kv_lens), kv_lens, device="cuda", seed=7, generate_on_device=True)
    caches, scale_caches = vllm_views(config, inputs)
    key_ws, value_ws, table, _ = run_gpu_workspace(config, inputs, caches, scale_caches)
    dtype = config.q_torch_dtype
    kw = inputs.kwargs
    for cache, ws, scale, scale_cache in ((inputs.key_cache, key_ws, kw.get("k_scale"), kw.get("k_scale_cache")),
                                          (inputs.value_cache, value_ws, kw.get("v_scale"), kw.get("v_scale_cache"))):
        for seq, kv_len in enumerate(kv_lens):
            pages = inputs.block_table[seq, : -(-kv_len // config.block_size)].long()
            real = cache[pages].double()
            if scale is not None:
                real = real * scale.double().reshape(())
            if scale_cache is not None:
                real = real * scale_cache[pages].double()[..., None]
            expected = round_once(real.flatten(0, 1)[:kv_len], dtype)
            owned = ws[table[seq].long()].flatten(0, 1)
            assert torch.equal(owned[:kv_len].view(torch.int16), expected.view(torch.int16)), f"seq {seq}"
            written = -(-kv_len // dequant.WORKSPACE_BLOCK_SIZE) * dequant.WORKSPACE_BLOCK_SIZE
            assert not owned[kv_len:written].any(), f"seq {seq}: the tail of the last page is not zero"


def run_gpu_workspace(config, inputs, caches, scale_caches):
    kw = dict(inputs.kwargs)
    if scale_caches is not None:
        kw["k_scale_cache"], kw["v_scale_cache"] = scale_caches
    return kernel.dequantize_pages(*caches, inputs.seq_lens, inputs.block_table, dtype=config.q_torch_dtype,
                                   workspace_block_size=dequant.WORKSPACE_BLOCK_SIZE,
                                   k_scale=kw.get("k_scale"), v_scale=kw.get("v_scale"),
                                   k_scale_cache=kw.get("k_scale_cache"), v_scale_cache=kw.get("v_scale_cache"))


GPU_Q_LENS = [1, 1, 16, 5, 127, 1, 40, 150]
GPU_KV_LENS = [1, 15, 16, 17, 127, 128, 129, 300]


@pytest.mark.gpu
@pytest.mark.parametrize("mode_id, kv_cache_dtype, kv_quant_mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("block_size", [16, 128])
def test_gpu_attention_through_the_inner_backend(mode_id, kv_cache_dtype, kv_quant_mode, block_size):
    """On an H100 / H200 with flash-attn-4 installed the inner backend is FlashAttention 4 (else triton):
    its error against float64 stays within the parity bound, and it agrees with the sdpa backend."""
    config = make_config(kv_cache_dtype, kv_quant_mode, q_dtype="bfloat16", num_heads=8, num_kv_heads=2,
                         head_size=128, block_size=block_size)
    choice = _gpu_choice(config)
    assert choice.name in ("flash_attn", "triton"), choice.refused
    inputs = make_inputs(config, GPU_Q_LENS, GPU_KV_LENS, device="cuda", seed=11)
    out = dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
    exact = float64_attention(inputs, config)
    error = float((out.double() - exact).abs().max())
    bound = parity_bound(config, inputs, exact.cpu())
    assert error <= bound, f"inner {choice.name}: max error {error:.3g} > {bound:.3g}"
    sdpa = dispatch.attention(*inputs.args, config=config.model_copy(update={"backend": "sdpa"}), **inputs.kwargs)
    assert float((out.double() - sdpa.double()).abs().max()) <= 2 * bound


@pytest.mark.gpu
def test_gpu_inner_is_flash_attention_4_where_it_runs():
    config = make_config(q_dtype="bfloat16", num_heads=32, num_kv_heads=8, head_size=128)
    choice = _gpu_choice(config)
    fa4 = dispatch.explain(dequant.workspace_config(config, "flash_attn"), "cuda").report("flash_attn")
    if not fa4.supported:
        pytest.skip(f"flash_attn does not run here: {fa4.reasons[0]}")
    assert choice.name == "flash_attn"


@pytest.mark.gpu
def test_gpu_call_has_no_host_sync():
    config = make_config("float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD, q_dtype="bfloat16", num_heads=8,
                         num_kv_heads=2, head_size=128)
    inputs = make_inputs(config, [1, 7, 1], [100, 40, 17], device="cuda", poison=False)
    dispatch.attention(*inputs.args, config=config, **inputs.kwargs)  # warm: compile, select, cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("kv_quant_mode, kv_cache_dtype", [(KVQuantMode.FP8_PER_TENSOR, "float8_e4m3fn"),
                                                           (KVQuantMode.INT8_PER_TOKEN_HEAD, "int8")])
def test_gpu_cuda_graph_capture_and_replay(kv_quant_mode, kv_cache_dtype):
    config = make_config(kv_cache_dtype, kv_quant_mode, q_dtype="bfloat16", num_heads=8, num_kv_heads=2,
                         head_size=128)
    q_lens, kv_lens = [1, 33, 1], [300, 40, 64]
    inputs = make_inputs(config, q_lens, kv_lens, device="cuda", poison=False)
    static = [t.clone() for t in inputs.args]
    kwargs = {k: v.clone() for k, v in inputs.kwargs.items()}
    dispatch.attention(*static, config=config, **kwargs)  # warm up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dispatch.attention(*static, config=config, **kwargs)
    fresh = make_inputs(config, q_lens, kv_lens, device="cuda", poison=False, seed=1)
    for buffer, tensor in zip(static[:3], fresh.args[:3]):
        buffer.copy_(tensor)
    for name, tensor in fresh.kwargs.items():
        kwargs[name].copy_(tensor)
    static[4].copy_(torch.tensor([k - 5 for k in kv_lens], dtype=torch.int32))
    graph.replay()
    eager = dispatch.attention(*static, config=config, **kwargs)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# ------------------------------------------------------------------------------------------------
# Decodes straight from the cache (SHORT_QUERIES): only the other sequences are dequantized
# ------------------------------------------------------------------------------------------------

MIXED_Q_LENS, MIXED_KV_LENS = [1, 17, 4, 5, 1], [40, 17, 129, 33, 16]


def test_short_query_sequences_are_not_dequantized():
    config = make_config("float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD)
    inputs = make_inputs(config, MIXED_Q_LENS, MIXED_KV_LENS, seed=5)
    num_seqs, width = inputs.block_table.shape
    pages_per_seq = -(-width * config.block_size // 32)
    workspace = torch.full((2, num_seqs * pages_per_seq, 32, config.num_kv_heads, config.head_size), SENTINEL,
                           dtype=config.q_torch_dtype)
    result = kernel.dequantize_pages(inputs.key_cache, inputs.value_cache, inputs.seq_lens, inputs.block_table,
                                     dtype=config.q_torch_dtype, workspace_block_size=32, workspace=workspace,
                                     k_scale_cache=inputs.kwargs["k_scale_cache"],
                                     v_scale_cache=inputs.kwargs["v_scale_cache"],
                                     cu_seqlens_q=inputs.cu_seqlens_q, short_queries=4)
    short = [q <= 4 for q in MIXED_Q_LENS]
    assert result.seq_lens.tolist() == [q if s else kv for q, kv, s in zip(MIXED_Q_LENS, MIXED_KV_LENS, short)]
    full = kernel.dequantize_pages(inputs.key_cache, inputs.value_cache, inputs.seq_lens, inputs.block_table,
                                   dtype=config.q_torch_dtype, workspace_block_size=32,
                                   k_scale_cache=inputs.kwargs["k_scale_cache"],
                                   v_scale_cache=inputs.kwargs["v_scale_cache"])
    for seq, (q_len, kv_len) in enumerate(zip(MIXED_Q_LENS, MIXED_KV_LENS)):
        for ws, reference in ((result.key_cache, full.key_cache), (result.value_cache, full.value_cache)):
            pages = ws[seq * pages_per_seq:(seq + 1) * pages_per_seq].flatten(0, 1)
            expected = reference[seq * pages_per_seq:(seq + 1) * pages_per_seq].flatten(0, 1)
            if short[seq]:
                assert torch.equal(pages[:q_len], torch.zeros_like(pages[:q_len]))  # q_len keys of zeros
                assert (pages[32:] == SENTINEL).all()  # nothing else written: only page 0, of zeros
            else:
                assert torch.equal(pages[:kv_len], expected[:kv_len])


def _with_split(monkeypatch, enabled: bool):
    monkeypatch.setattr(dequant, "DECODES_FROM_THE_CACHE", enabled)
    dequant._clear_caches()


@pytest.mark.parametrize("mode_id, kv_cache_dtype, kv_quant_mode", MODES, ids=[m[0] for m in MODES])
def test_mixed_batch_decodes_run_on_triton_and_prefills_are_unchanged(monkeypatch, mode_id, kv_cache_dtype,
                                                                       kv_quant_mode):
    config = make_config(kv_cache_dtype, kv_quant_mode)
    inputs = make_inputs(config, MIXED_Q_LENS, MIXED_KV_LENS, seed=6)
    try:
        _with_split(monkeypatch, True)
        assert dequant.short_queries_on_triton(config, CPU) == dequant.SHORT_QUERIES == 4
        assert "run on triton straight from the cache" in str(dispatch.explain(config, "cpu"))
        split = run_and_judge(config, MIXED_Q_LENS, MIXED_KV_LENS, seed=6)
        _with_split(monkeypatch, False)
        assert "straight from the cache" not in str(dispatch.explain(config, "cpu"))
        whole = run_and_judge(config, MIXED_Q_LENS, MIXED_KV_LENS, seed=6)
    finally:
        _with_split(monkeypatch, True)
    on_triton = config.model_copy(update=dict(backend="triton"))
    starts = inputs.cu_seqlens_q.tolist()
    for seq, q_len in enumerate(MIXED_Q_LENS):
        rows = slice(starts[seq], starts[seq + 1])
        if q_len <= 4:
            # The Triton kernel on this sequence alone (a decode-shaped call, as the split's pass is), bit for bit.
            expected = dispatch.attention(inputs.q[rows], inputs.key_cache, inputs.value_cache,
                                          torch.tensor([0, q_len], dtype=torch.int32), inputs.seq_lens[seq:seq + 1],
                                          inputs.block_table[seq:seq + 1], config=on_triton, **inputs.kwargs)
        else:
            expected = whole[rows]  # prefill rows: the same workspace and inner call as without the split
        assert torch.equal(split[rows], expected), seq


def test_the_split_needs_triton_to_accept_the_config():
    # An fp8 output on the CPU: the Triton kernel is refused there, so everything is dequantized (as before).
    config = make_config("float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR, out_dtype="float8_e4m3fn")
    assert dequant.short_queries_on_triton(config, CPU) == 0
    assert "straight from the cache" not in str(dispatch.explain(config, "cpu"))
    run_and_judge(config, MIXED_Q_LENS, MIXED_KV_LENS)


@pytest.mark.gpu
@pytest.mark.parametrize("mode_id, kv_cache_dtype, kv_quant_mode", MODES, ids=[m[0] for m in MODES])
def test_gpu_mixed_batch_decodes_from_the_cache(monkeypatch, mode_id, kv_cache_dtype, kv_quant_mode):
    """With the inner FlashAttention 4 (or triton): decode rows come from the Triton kernel on the cache and
    stay within the parity bound; prefill rows are bit for bit those of the call that dequantizes everything."""
    config = make_config(kv_cache_dtype, kv_quant_mode, q_dtype="bfloat16", num_heads=8, num_kv_heads=2,
                         head_size=128)
    q_lens, kv_lens = [1, 300, 3, 1, 129, 1], [1000, 300, 517, 17, 2000, 129]
    inputs = make_inputs(config, q_lens, kv_lens, device="cuda", seed=12)
    try:
        _with_split(monkeypatch, True)
        assert dequant.short_queries_on_triton(config, resolve_device("cuda")) == dequant.SHORT_QUERIES
        split = dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
        _with_split(monkeypatch, False)
        whole = dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
    finally:
        _with_split(monkeypatch, True)
    exact = float64_attention(inputs, config)
    bound = parity_bound(config, inputs, exact.cpu())
    assert float((split.double() - exact).abs().max()) <= bound
    starts = inputs.cu_seqlens_q.tolist()
    for seq, q_len in enumerate(q_lens):
        if q_len > dequant.SHORT_QUERIES:
            rows = slice(starts[seq], starts[seq + 1])
            assert torch.equal(split[rows], whole[rows]), seq


def test_workspace_pages_are_fa4s_kv_tile_with_fa4_inside(monkeypatch):
    """Pages of exactly FA4's KV tile load by TMA (its fast path); the zeros past each sequence's end make
    the tail FA4's record worries about harmless. Other inner backends keep WORKSPACE_BLOCK_SIZE."""
    from backends.flash_attn import fa4
    from dispatch.selector import Plan

    config = make_config(q_dtype="bfloat16", num_heads=32, num_kv_heads=8, head_size=128)
    inner_config = dequant.workspace_config(config, "flash_attn")
    fa4_plan = Plan("flash_attn", inner_config, H200, fa4.CAPABILITY, fa4.forward)
    assert dequant.workspace_block_size(fa4_plan, H200) == fa4.kv_tile(inner_config, H200) == 128
    monkeypatch.setattr(dequant, "FA4_TILE_PAGES", False)
    assert dequant.workspace_block_size(fa4_plan, H200) == dequant.WORKSPACE_BLOCK_SIZE
    monkeypatch.setattr(dequant, "FA4_TILE_PAGES", True)
    triton_plan = Plan("triton", dequant.workspace_config(config, "triton"), H200, fa4.CAPABILITY, lambda *a, **k: None)
    assert dequant.workspace_block_size(triton_plan, H200) == dequant.WORKSPACE_BLOCK_SIZE
    # A tile that is not a power of two (head size 96, non-causal: 144) cannot be one Triton block.
    odd = dequant.workspace_config(make_config(q_dtype="bfloat16", head_size=96, causal=False), "flash_attn")
    assert fa4.kv_tile(odd, H200) == 144
    assert dequant.workspace_block_size(Plan("flash_attn", odd, H200, fa4.CAPABILITY, fa4.forward), H200) == 32
