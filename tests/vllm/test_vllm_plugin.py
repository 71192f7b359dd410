"""The vLLM plugin against vLLM 0.33's own Triton backend and the float64 oracle, on CPU.

Runs in the separate environment that scripts/vllm-tests.sh builds (vLLM, torch 2.14, triton 3.8,
TRITON_INTERPRET=1, no GPU); in the main environment this module skips at import.

Each comparison case builds one batch mixing prefill, chunked prefill and decode (lengths at page
edges), packs its K/V into vLLM's per-layer cache ([num_blocks, num_kv_heads, block_size,
2 * content], stored NHD as vLLM allocates it, fp8 as uint8, per-token-head scales inline), takes
the metadata from vLLM's TritonAttentionMetadataBuilder, and runs the same (layer, query, cache,
metadata, output) through TritonAttentionImpl.forward and DispatchAttentionImpl.forward. The query
and output carry padding rows past num_actual_tokens, as under vLLM's CUDA-graph padding.

What each comparison proves:
- plugin vs oracle: the plugin reads vLLM's cache, metadata and scales as vLLM means them (a
  misread layout or a dropped scale fails it). The dispatch backend that ran is asserted: triton
  for float16 work, sdpa for bfloat16 (dispatch refuses bfloat16 Triton on CPU: the interpreter's
  bfloat16 dots are wrong, triton issue 11584).
- vLLM vs oracle: the test's packing is what vLLM's kernel reads, so the plugin is judged against
  vLLM's own interpretation and not only against this file's. Skipped for bfloat16, where vLLM's
  kernel hits the same interpreter bug (its bfloat16 numbers on CPU say nothing about the GPU).
- plugin vs vLLM: the two agree within the sum of their bounds.

Bounds come from each kernel's arithmetic, never from observed errors. A kernel that rounds the
softmax weights P to a format with unit roundoff u before its P @ V dot moves an output by at most
u * sum_j p_j |v_j| (the oracle's ``with_abs`` term); twice that, plus the output's own rounding
(rtol) and the project's 16-bit atol (2u max|V|), is the bound. P is rounded to fp16 by dispatch's
triton kernel and by vLLM's kernel with a 16-bit query; vLLM's fp8-query kernel rounds P to e4m3
(u = 2^-4, its `(P * p_scale).to(V.dtype)`), and needs the interpreter's fp8 rounding fixed
(`gpu_like_fp8_rounding`). sdpa computes in bfloat16 for a bfloat16 query: the project's
`tolerance(config, bfloat16)`.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

import dispatch  # noqa: E402
from dispatch.__main__ import main as dispatch_cli  # noqa: E402
from dispatch.config import AttentionConfig  # noqa: E402
from dispatch.integrations import vllm as plugin  # noqa: E402
from tests.cases import OUTPUT_SCALE, make_inputs, tolerance, unit_roundoff  # noqa: E402
from tests.oracle import reference_attention  # noqa: E402
from tests.vllm.conftest import HEAD_SIZE, NUM_HEADS, NUM_KV_HEADS  # noqa: E402

BLOCK_SIZE = 16
# Full prefill across a page edge, decode at a page edge, chunked prefill, decode of a one-page sequence.
Q_LENS = [17, 1, 5, 1]
KV_LENS = [17, 33, 40, 16]
PADDING_ROWS = 3  # query/output rows past num_actual_tokens (CUDA-graph padding): must stay untouched
SENTINEL = 7.0
SCALE = HEAD_SIZE**-0.5
SLIDING_WINDOW = 8
SOFT_CAP = 2.0
ALIBI_SLOPES = [0.5, 0.25, 0.125, 0.0625]
E4M3_U = 2.0**-4


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype  # the model's activation dtype
    kv_cache_dtype: str = "auto"
    quantized_query: bool = False  # vLLM hands the query quantized to fp8 (layer._q_scale)
    sliding_window: Optional[int] = None
    logits_soft_cap: Optional[float] = None
    alibi_slopes: Optional[tuple] = None
    sinks: bool = False
    fp8_output: bool = False  # vLLM fused static per-tensor fp8 output quantization (output_scale)
    dispatch_backend: str = "triton"  # what auto must pick on CPU for this case

    def config(self) -> AttentionConfig:
        return plugin.config_from_vllm(
            head_size=HEAD_SIZE, dtype=self.dtype, kv_cache_dtype=self.kv_cache_dtype, block_size=BLOCK_SIZE,
            num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, scale=SCALE, sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap, use_alibi=self.alibi_slopes is not None, has_sink=self.sinks,
            quantized_query=self.quantized_query, fp8_output=self.fp8_output, fp8_dtype=plugin.fp8_storage_dtype())


CASES = [
    Case("fp16", torch.float16),
    Case("bf16", torch.bfloat16, dispatch_backend="sdpa"),
    # The seed's case (vLLM PR #42080): FP8 query, FP8 per-tensor cache, q/k/v scales 0.75 / 0.5 / 0.25.
    Case("fp8q-fp8kv", torch.float16, kv_cache_dtype="fp8", quantized_query=True),
    Case("fp16q-fp8kv", torch.float16, kv_cache_dtype="fp8"),
    Case("fp16q-fp8e5m2-name", torch.float16, kv_cache_dtype="fp8_e5m2"),  # vLLM stores it as e4m3
    Case("sliding-window", torch.float16, sliding_window=SLIDING_WINDOW),
    Case("sinks", torch.float16, sinks=True),
    Case("softcap-alibi", torch.float16, logits_soft_cap=SOFT_CAP, alibi_slopes=tuple(ALIBI_SLOPES)),
    Case("fp8-per-token-head", torch.float16, kv_cache_dtype="fp8_per_token_head"),
    Case("int8-per-token-head", torch.float16, kv_cache_dtype="int8_per_token_head"),
    # dispatch refuses fp8 output from Triton on CPU (the interpreter mis-rounds the cast): sdpa serves it.
    Case("fp8q-fp8kv-fp8out", torch.float16, kv_cache_dtype="fp8", quantized_query=True, fp8_output=True,
         dispatch_backend="sdpa"),
]


# ---- building vLLM's side ----------------------------------------------------------------------------


class Layer(torch.nn.Module):
    """What forward reads from vLLM's Attention layer: its 0-d fp32 scales."""

    def __init__(self, q_scale=1.0, k_scale=1.0, v_scale=1.0):
        super().__init__()
        self._q_scale = torch.tensor(float(q_scale), dtype=torch.float32)
        self._k_scale = torch.tensor(float(k_scale), dtype=torch.float32)
        self._v_scale = torch.tensor(float(v_scale), dtype=torch.float32)


def make_impls(case: Case, sinks: Optional[torch.Tensor]):
    """vLLM's TritonAttentionImpl and the plugin's impl, built as vLLM's Attention layer builds them
    (under the model's default dtype)."""
    args = (NUM_HEADS, HEAD_SIZE, SCALE, NUM_KV_HEADS, list(case.alibi_slopes) if case.alibi_slopes else None,
            case.sliding_window, case.kv_cache_dtype, case.logits_soft_cap, AttentionType.DECODER, None, sinks)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(case.dtype)
    try:
        return TritonAttentionImpl(*args), plugin.DispatchAttentionImpl(*args)
    finally:
        torch.set_default_dtype(previous)


def pack_vllm_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, config: AttentionConfig):
    """key_cache/value_cache [num_blocks, block_size, num_kv_heads, head_size] -> vLLM's packed cache,
    logically [num_blocks, num_kv_heads, block_size, 2 * content], stored NHD like vLLM's allocation.

    fp8 is stored as uint8 (vLLM's allocation dtype). Per-token-head scales are written through
    vLLM's own scale views (TritonAttentionImpl._ensure_scale_caches), so their place in the cache is
    vLLM's, not this file's.
    """
    num_blocks, block_size, kv_heads, head_size = key_cache.shape
    storage = torch.uint8 if key_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else key_cache.dtype
    content = head_size + (4 // key_cache.element_size() if config.kv_quant_mode.is_per_token_head else 0)
    physical = torch.zeros(num_blocks, block_size, kv_heads, 2 * content, dtype=storage)
    physical[..., :head_size] = key_cache.view(storage)
    physical[..., content:content + head_size] = value_cache.view(storage)
    return physical.permute(0, 2, 1, 3)  # logical [num_blocks, num_kv_heads, block_size, 2 * content]


def vllm_metadata(vllm_config, inputs, kv_cache_spec_dtype: torch.dtype):
    """TritonAttentionMetadata from vLLM's own builder for the inputs' batch."""
    builder_cls = plugin.DispatchAttentionBackend.get_builder_cls()
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE,
                             dtype=kv_cache_spec_dtype)
    builder = builder_cls(spec, ["model.layers.0.self_attn.attn"], vllm_config, torch.device("cpu"))
    num_tokens = int(inputs.cu_seqlens_q[-1])
    common = CommonAttentionMetadata(
        query_start_loc=inputs.cu_seqlens_q, query_start_loc_cpu=inputs.cu_seqlens_q.clone(),
        seq_lens=inputs.seq_lens, num_reqs=len(Q_LENS), num_actual_tokens=num_tokens, max_query_len=max(Q_LENS),
        max_seq_len=max(KV_LENS), block_table_tensor=inputs.block_table,
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64),
    )
    return builder.build(0, common)


def padded(t: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
    """t with `rows` extra rows at the end (t's values first), for num_actual_tokens < len."""
    extra = torch.full((rows, *t.shape[1:]), fill, dtype=torch.float32).to(t.dtype)
    return torch.cat([t, extra])


@dataclass
class Run:
    config: AttentionConfig
    inputs: object
    layer: Layer
    kv_cache: torch.Tensor
    metadata: object
    vllm_impl: TritonAttentionImpl
    plugin_impl: object
    query: torch.Tensor


def prepare(case: Case, vllm_config) -> Run:
    config = case.config()
    inputs = make_inputs(config, Q_LENS, KV_LENS, seed=len(case.name))
    sinks = inputs.kwargs["sinks"].to(case.dtype) if case.sinks else None
    if sinks is not None:
        inputs.kwargs["sinks"] = sinks.float()  # the oracle sees exactly the model's sink values
    if case.alibi_slopes is not None:
        inputs.kwargs["alibi_slopes"] = torch.tensor(case.alibi_slopes, dtype=torch.float32)
    vllm_impl, plugin_impl = make_impls(case, sinks)
    kv_cache = pack_vllm_cache(inputs.key_cache, inputs.value_cache, config)
    if config.kv_quant_mode.is_per_token_head:
        vllm_impl._ensure_scale_caches(kv_cache)  # vLLM's views of the inline scales (filled with 1.0)
        vllm_impl._k_scale_cache.copy_(inputs.kwargs["k_scale_cache"])
        vllm_impl._v_scale_cache.copy_(inputs.kwargs["v_scale_cache"])
    kw = inputs.kwargs
    layer = Layer(*(float(kw[name].reshape(-1)[0]) if name in kw else 1.0 for name in ("q_scale", "k_scale", "v_scale")))
    metadata = vllm_metadata(vllm_config, inputs, config.kv_cache_torch_dtype)
    query = padded(inputs.q, PADDING_ROWS, 100.0)
    if case.fp8_output:
        from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym

        assert plugin_impl.fused_output_quant_supported(kFp8StaticTensorSym)  # as vLLM's fusion pass asks
    return Run(config, inputs, layer, kv_cache, metadata, vllm_impl, plugin_impl, query)


def run(impl, r: Run, out_dtype: torch.dtype) -> torch.Tensor:
    """impl.forward on the shared inputs; returns the whole (padded) output buffer."""
    output = torch.full((r.query.shape[0], NUM_HEADS, HEAD_SIZE), SENTINEL, dtype=out_dtype)
    output_scale = r.inputs.kwargs["output_scale"].reshape(()) if r.config.out_is_fp8 else None
    result = impl.forward(r.layer, r.query, None, None, r.kv_cache, r.metadata, output, output_scale=output_scale)
    assert result is output
    return output


def real(r: Run, output: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first num_tokens rows as float64 real values (an fp8 output times output_scale)."""
    values = output[:num_tokens].to(torch.float64)
    return values * float(r.inputs.kwargs["output_scale"].reshape(-1)[0]) if r.config.out_is_fp8 else values


# ---- judging -----------------------------------------------------------------------------------------


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, label: str) -> None:
    """|out - ref| <= bound element-wise; the message names the worst element."""
    out = out.to(torch.float64)
    if not torch.isfinite(out).all():
        raise AssertionError(f"{label}: non-finite output at {tuple(int(i) for i in (~torch.isfinite(out)).nonzero()[0])}")
    excess = (out - ref).abs() - bound
    worst = torch.unravel_index(excess.argmax(), out.shape)
    if excess[worst] > 0:
        raise AssertionError(f"{label}: worst element {tuple(int(i) for i in worst)}: got {float(out[worst]):.6g}, "
                             f"expected {float(ref[worst]):.6g} +- {float(bound[worst]):.3g}; "
                             f"max |diff| {float((out - ref).abs().max()):.3g}")


def bound(ref: torch.Tensor, ref_abs: torch.Tensor, v_max: float, p_unit: float, out_dtype: torch.dtype):
    """The error bound of a kernel that rounds P with unit roundoff p_unit (module docstring); an e4m3
    output adds half its smallest subnormal step (2^-10) times output_scale."""
    floor = 2.0**-10 * OUTPUT_SCALE if out_dtype == torch.float8_e4m3fn else 0.0
    return 2 * p_unit * ref_abs + 2 * p_unit * v_max + unit_roundoff(out_dtype) * ref.abs() + 1e-6 + floor


def plugin_bound(case: Case, config: AttentionConfig, ref, ref_abs, v_max):
    if case.dispatch_backend == "sdpa":
        atol, rtol = tolerance(config, case.dtype)  # computes in the model's 16-bit dtype
        return atol + rtol * ref.abs()
    return bound(ref, ref_abs, v_max, unit_roundoff(torch.float16), config.out_torch_dtype)


def vllm_bound(case: Case, config: AttentionConfig, ref, ref_abs, v_max):
    p_unit = E4M3_U if config.q_is_fp8 else unit_roundoff(torch.float16)
    return bound(ref, ref_abs, v_max, p_unit, config.out_torch_dtype)


def real_value_max(inputs) -> float:
    v = inputs.value_cache.to(torch.float64)
    if "v_scale" in inputs.kwargs:
        v = v * float(inputs.kwargs["v_scale"].reshape(-1)[0])
    if "v_scale_cache" in inputs.kwargs:
        v = v * inputs.kwargs["v_scale_cache"].to(torch.float64)[..., None]
    return float(v[torch.isfinite(v)].abs().max())


# ---- the comparisons -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plugin_matches_vllm_triton_backend_and_oracle(case, vllm_config, gpu_like_fp8_rounding):
    r = prepare(case, vllm_config)
    config = r.config
    assert dispatch.select(config, "cpu").name == case.dispatch_backend
    ref, ref_abs = reference_attention(*r.inputs.args, **r.inputs.oracle_kwargs(config), with_abs=True)
    v_max = real_value_max(r.inputs)
    num_tokens = ref.shape[0]

    plugin_out = run(r.plugin_impl, r, config.out_torch_dtype)
    assert (plugin_out[num_tokens:].float() == SENTINEL).all(), "the plugin wrote past num_actual_tokens"
    plugin_real = real(r, plugin_out, num_tokens)
    plugin_tol = plugin_bound(case, config, ref, ref_abs, v_max)
    assert_within(plugin_real, ref, plugin_tol, f"{case.name}: plugin vs oracle")

    if case.dtype == torch.bfloat16:
        return  # vLLM's bf16 kernel is wrong under the interpreter (module docstring): nothing to compare on CPU
    vllm_out = run(r.vllm_impl, r, config.out_torch_dtype)
    vllm_real = real(r, vllm_out, num_tokens)
    vllm_tol = vllm_bound(case, config, ref, ref_abs, v_max)
    assert_within(vllm_real, ref, vllm_tol, f"{case.name}: vLLM's TritonAttentionImpl vs oracle")
    assert_within(plugin_real, vllm_real, plugin_tol + vllm_tol, f"{case.name}: plugin vs vLLM")


def test_plugin_reads_what_vllms_cache_writer_wrote(vllm_config, monkeypatch, gpu_like_fp8_rounding):
    """New keys and values go through vLLM's own writer (do_kv_cache_update, inherited) for an
    fp8_e5m2-named cache, which vLLM stores as e4m3: the plugin and vLLM's kernel read the same.
    (The writer quantizes inside a Triton kernel: its e4m3 cast needs the interpreter fix too.)"""
    case = Case("written-fp8", torch.float16, kv_cache_dtype="fp8_e5m2")
    r = prepare(case, vllm_config)
    # The writer asks the platform for an fp8-capable GPU (SM89+) and, on its "cuda" branch, for the
    # compute capability; there is no GPU here, so both answer as an H100 would.
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "has_device_capability", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: (9, 0))
    new_keys = torch.randn(len(Q_LENS), NUM_KV_HEADS, HEAD_SIZE, dtype=torch.float16)
    new_values = torch.randn(len(Q_LENS), NUM_KV_HEADS, HEAD_SIZE, dtype=torch.float16)
    # Overwrite each sequence's last key slot: page block_table[s, (kv_len - 1) // 16], row (kv_len - 1) % 16.
    slots = torch.tensor([int(r.inputs.block_table[s, (n - 1) // BLOCK_SIZE]) * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
                          for s, n in enumerate(KV_LENS)], dtype=torch.int64)
    r.plugin_impl.do_kv_cache_update(r.layer, new_keys, new_values, r.kv_cache, slots)
    plugin_out = run(r.plugin_impl, r, torch.float16)
    vllm_out = run(r.vllm_impl, r, torch.float16)
    key_cache, value_cache, _, _ = plugin.split_kv_cache(r.kv_cache, r.config)
    assert key_cache.dtype == torch.float8_e4m3fn
    written = key_cache.reshape(-1, NUM_KV_HEADS, HEAD_SIZE)[slots].float() * 0.5  # dequantized with k_scale
    torch.testing.assert_close(written, new_keys.float(), atol=0.5 * 2**-6, rtol=E4M3_U)
    ref, ref_abs = reference_attention(
        r.query[: sum(Q_LENS)], key_cache, value_cache, r.inputs.cu_seqlens_q, r.inputs.seq_lens,
        r.inputs.block_table, softmax_scale=SCALE, k_scale=r.layer._k_scale, v_scale=r.layer._v_scale, with_abs=True)
    tol = bound(ref, ref_abs, real_value_max(r.inputs) + 4 * 0.25, unit_roundoff(torch.float16), torch.float16)
    assert_within(plugin_out[: ref.shape[0]].to(torch.float64), ref, tol, "plugin vs oracle after vLLM's writer")
    assert_within(vllm_out[: ref.shape[0]].to(torch.float64), ref, tol, "vLLM vs oracle after vLLM's writer")


# ---- start-up: selection, refusals, the CLI's verdict ---------------------------------------------------

SELECTOR_DEFAULTS = dict(block_size=BLOCK_SIZE, use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                         use_per_head_quant_scales=False, device_capability=None, attn_type=AttentionType.DECODER)


def validate(**settings) -> list[str]:
    return plugin.DispatchAttentionBackend.validate_configuration(**dict(SELECTOR_DEFAULTS, **settings))


def test_accepted_configurations_have_no_reasons():
    for kv_cache_dtype in plugin.KV_CACHE_DTYPES:
        dtype = torch.bfloat16 if kv_cache_dtype == "bfloat16" else torch.float16
        assert validate(head_size=HEAD_SIZE, dtype=dtype, kv_cache_dtype=kv_cache_dtype) == [], kv_cache_dtype
    assert validate(head_size=64, dtype=torch.float16, kv_cache_dtype="fp8", has_sink=True,
                    has_sliding_window=True) == []


def test_refuses_what_vllm_triton_allows_but_dispatch_cannot_serve():
    """vLLM's Triton backend runs these; the plugin refuses them at start-up with dispatch's reasons."""
    float32 = dict(head_size=HEAD_SIZE, dtype=torch.float32, kv_cache_dtype="auto")
    assert TritonAttentionBackend.validate_configuration(**dict(SELECTOR_DEFAULTS, **float32)) == []
    reasons = validate(**float32)
    assert "dtype not supported" in reasons  # vLLM's own check, from the class attributes
    assert any(r.startswith("dispatch: q_dtype=float32 not in") for r in reasons), reasons

    int4 = dict(head_size=HEAD_SIZE, dtype=torch.float16, kv_cache_dtype="int4_per_token_head")
    assert TritonAttentionBackend.validate_configuration(**dict(SELECTOR_DEFAULTS, **int4)) == []
    assert any("kv_cache_dtype='int4_per_token_head': dispatch reads no such KV cache" in r for r in validate(**int4))

    # A dispatch backend named by the user (DISPATCH_BACKEND, or a dispatch.use() scope): its own reason.
    odd_head = dict(head_size=36, dtype=torch.float16, kv_cache_dtype="auto")
    assert TritonAttentionBackend.validate_configuration(**dict(SELECTOR_DEFAULTS, **odd_head)) == []
    with dispatch.use(backend="triton"):
        reasons = validate(**odd_head)
    assert reasons == ["dispatch backend 'triton': head_size=36 not supported (allowed: multiple of 8, at most 256)"]
    assert validate(**odd_head) == []  # auto: sdpa takes any head size


def test_refuses_what_one_config_per_layer_cannot_express():
    reasons = validate(head_size=HEAD_SIZE, dtype=torch.float16, kv_cache_dtype="auto", use_non_causal=True,
                       use_mm_prefix=True, use_rswa=True, use_batch_invariant=True, attn_type=AttentionType.ENCODER_ONLY)
    for expected in ("non-causal attention not supported", "partial multimodal token full attention not supported",
                     "R-SWA not supported", "batch invariance not supported",
                     f"attention type {AttentionType.ENCODER_ONLY} not supported"):
        assert expected in reasons, (expected, reasons)


def test_impl_refuses_at_construction():
    """Head counts, softcap and ALiBi reach dispatch only when the layer is built (model construction)."""
    with dispatch.use(backend="flash_attn"), pytest.raises(dispatch.UnsupportedConfigError, match="flash_attn"):
        make_impls(Case("named-flash-attn-on-cpu", torch.float16), None)
    with pytest.raises(dispatch.UnsupportedConfigError, match="chunk_lookback=4: dispatch has no chunked attention"):
        plugin.DispatchAttentionImpl(NUM_HEADS, HEAD_SIZE, SCALE, NUM_KV_HEADS, None, None, "auto",
                                     chunk_lookback=4)
    # The model's dtype is the default dtype while vLLM builds the layer: float32 here, which dispatch refuses.
    assert torch.get_default_dtype() == torch.float32
    with pytest.raises(dispatch.UnsupportedConfigError, match="q_dtype=float32 not in"):
        plugin.DispatchAttentionImpl(NUM_HEADS, HEAD_SIZE, SCALE, NUM_KV_HEADS, None, None, "auto")


@pytest.mark.parametrize("settings", [
    dict(head_size=HEAD_SIZE, dtype=torch.float16, kv_cache_dtype="fp8", quantized_query=True),
    dict(head_size=HEAD_SIZE, dtype=torch.bfloat16, kv_cache_dtype="fp8_per_token_head", has_sink=True),
    dict(head_size=36, dtype=torch.float16, kv_cache_dtype="auto", backend="triton"),
    dict(head_size=HEAD_SIZE, dtype=torch.float16, kv_cache_dtype="auto", backend="flash_attn"),
], ids=["fp8q-fp8kv", "bf16-fp8-per-token-head-sinks", "triton-head-36", "flash-attn-on-cpu"])
def test_cli_explain_gives_the_plugins_verdict(settings, capsys):
    """`python -m dispatch explain` on config_from_vllm's config says what validate_configuration says."""
    config = plugin.config_from_vllm(fp8_dtype=plugin.fp8_storage_dtype(), **settings)
    reasons = plugin.dispatch_reasons(config, "cpu")
    exit_code = dispatch_cli(["explain", *plugin.explain_arguments(config), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert exit_code == (1 if reasons else 0), printed
    for reason in reasons:
        assert reason.split(": ", 1)[1] in printed
    if "quantized_query" not in settings and settings.get("backend", "auto") == "auto":
        selector = dict(head_size=settings["head_size"], dtype=settings["dtype"],
                        kv_cache_dtype=settings["kv_cache_dtype"], has_sink=settings.get("has_sink", False))
        assert validate(**selector) == reasons


def test_cli_explain_in_a_subprocess():
    config = plugin.config_from_vllm(head_size=36, dtype=torch.float16, backend="triton")
    result = subprocess.run([sys.executable, "-m", "dispatch", "explain", *plugin.explain_arguments(config),
                             "--device", "cpu"], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "head_size=36 not supported (allowed: multiple of 8, at most 256)" in result.stdout


def test_cuda_graph_support_is_what_the_chosen_backends_declare(vllm_config):
    builder_cls = plugin.DispatchAttentionBackend.get_builder_cls()
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float16)
    context = vllm_config.compilation_config.static_forward_context
    for dtype, backend in ((torch.float16, "triton"), (torch.bfloat16, "sdpa")):
        impl = make_impls(Case("graph", dtype), None)[1]
        layer = torch.nn.Module()
        layer.impl = impl
        context["model.layers.0.self_attn.attn"] = layer
        try:
            expected = dispatch.select(impl._calls[(dtype, dtype, BLOCK_SIZE)].config, "cpu").capability
            assert expected.cuda_graph_safe == (backend == "triton")
            level = builder_cls.get_cudagraph_support(vllm_config, spec)
            assert level.name == ("ALWAYS" if expected.cuda_graph_safe else "NEVER"), (backend, level)
        finally:
            del context["model.layers.0.self_attn.attn"]


# ---- registration -------------------------------------------------------------------------------------


def test_entry_point_registers_the_backend_in_a_fresh_process():
    """vLLM's plugin loader finds the installed entry point; registering imports no vLLM backend code."""
    code = (
        "import sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "print('triton_attn' in ' '.join(sys.modules))\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum\n"
        "cls = AttentionBackendEnum.CUSTOM.get_class()\n"
        "print(cls.__module__, cls.__name__, cls.get_name())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2:] == ["False", "dispatch.integrations.vllm DispatchAttentionBackend CUSTOM"], result.stdout


def test_registered_class_path_resolves():
    plugin.register()
    assert AttentionBackendEnum.CUSTOM.get_class() is plugin.DispatchAttentionBackend
    assert plugin.DispatchAttentionBackend.get_impl_cls() is plugin.DispatchAttentionImpl


def test_forward_reads_no_device_value():
    """CUDA-graph safety of the plugin's own code: the per-call path never reads a tensor on the host."""
    import inspect

    source = "".join(inspect.getsource(f) for f in (plugin.DispatchAttentionImpl.forward, plugin.split_kv_cache,
                                                     plugin.DispatchAttentionImpl._vectors))
    for forbidden in (".item(", ".cpu(", ".tolist(", "bool(", ".numpy(", "float(", "int("):
        assert forbidden not in source, forbidden
