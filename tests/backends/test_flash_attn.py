"""The flash_attn backend: its capability records on any machine, FlashAttention itself on a GPU.

CPU (CI, flash-attn not installed): the module imports no flash-attn, a missing
install is a reason (explain), a refusal (named backend) and a skip (auto); each
version's record is checked against the rules its module docstring cites, with
the reason wording pinned.

GPU (marked gpu; FA4 tests also need flash_attn.cute): FlashAttention 4 through
`dispatch.attention`, on the case table's "gpu flash_attn" cases
(dispatch/cases.py), against a float64 reference and against the sdpa and
triton backends, with flash-attn's own accuracy rule: its error against the
float64 reference is at most 2x (3x with softcap) the error of a same-precision
PyTorch implementation, plus an atol of two roundings of the output. Both
references are tests/parity/same_precision.py's (float64_attention, which
tests/test_testing_helpers.py ties to the oracle, and same_precision_attention).
FA3 and FA2 tests run only where those packages import.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import backends.flash_attn as flash
import dispatch
from backends.flash_attn import Installation, choose, common, fa2, fa3, fa4
from dispatch import AttentionConfig, UnsupportedConfigError
from dispatch.capabilities import Capability, DeviceInfo, missing_modules, reasons
from dispatch.cases import case as named_case
from dispatch.cases import cases
from tests.cases import make_inputs, unit_roundoff
from tests.parity.same_precision import float64_attention, same_precision_attention

H100 = DeviceInfo(type="cuda", index=0, name="H100", compute_capability=(9, 0))
B200 = DeviceInfo(type="cuda", index=0, name="B200", compute_capability=(10, 0))
A100 = DeviceInfo(type="cuda", index=0, name="A100", compute_capability=(8, 0))
RTX5090 = DeviceInfo(type="cuda", index=0, name="RTX 5090", compute_capability=(12, 0))
CPU = DeviceInfo(type="cpu", name="cpu")


def cfg(**fields) -> AttentionConfig:
    base = dict(num_heads=8, num_kv_heads=2, head_size=128, q_dtype="bfloat16", kv_cache_dtype="bfloat16")
    return AttentionConfig(**dict(base, **fields))


def why(capability: Capability, config: AttentionConfig, device: DeviceInfo = H100) -> list[str]:
    """The reasons against `config`, as if the version were installed (the records are tested as data)."""
    return reasons(capability.replace(required_modules=()), config, device)


# ------------------------------------------------------------------------------------------------
# Import, detection and the missing install
# ------------------------------------------------------------------------------------------------


def test_importing_the_backend_imports_no_flash_attn():
    code = (
        "import sys, backends.flash_attn as b; b.CAPABILITY; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flash_attn', 'flash_attn_interface', 'cutlass')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_adapters_take_the_dispatch_keywords():
    expected = ["q", "key_cache", "value_cache", "cu_seqlens_q", "seq_lens", "block_table", "config", "q_scale",
                "k_scale", "v_scale", "k_scale_cache", "v_scale_cache", "alibi_slopes", "sinks", "output_scale", "out"]
    for module in (fa4, fa3, fa2):
        parameters = inspect.signature(module.forward).parameters
        assert list(parameters) == expected, module.__name__
        assert all(parameters[name].kind is inspect.Parameter.KEYWORD_ONLY for name in expected[6:])


def test_detection_finds_fa4_by_its_files_without_importing_it(tmp_path):
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "interface.py").write_text("raise RuntimeError('imported')\n")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import backends.flash_attn as b; "
        "found = b.INSTALLED[0]; print(found); "
        "sys.exit(0 if found.major == 4 and found.module == 'flash_attn.cute' and 'flash_attn' not in sys.modules "
        "else 1)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_newest_installed_version_is_chosen_and_named():
    fa4_found = Installation(4, "flash_attn.cute", "flash-attn-4", "4.0.0b36")
    fa2_found = Installation(2, "flash_attn", "flash-attn", "2.8.3")
    capability, forward = choose((fa4_found, fa2_found))
    assert capability.description == "FlashAttention 4 (flash-attn-4 4.0.0b36, flash_attn.cute)"
    assert forward is fa4.forward
    assert capability.replace(description="x") == flash.FA4_CAPABILITY.replace(description="x")
    capability, forward = choose((fa2_found,))
    assert capability.description == "FlashAttention 2 (flash-attn 2.8.3, flash_attn)" and forward is fa2.forward
    capability, _ = choose((Installation(3, "flash_attn_interface", "flash_attn_3", None),))
    assert capability.description == "FlashAttention 3 (flash_attn_3 version unknown, flash_attn_interface)"


def test_an_old_fa2_is_refused_with_its_version():
    capability, _ = choose((Installation(2, "flash_attn", "flash-attn", "2.5.8"),))
    assert ("flash-attn 2.5.8 is older than 2.6, the first release whose flash_attn_varlen_func takes block_table "
            "and softcap") in why(capability, cfg(block_size=256), A100)


not_installed = pytest.mark.skipif(bool(flash.INSTALLED), reason="a FlashAttention is installed here")


@not_installed
def test_without_flash_attn_explain_gives_the_reason():
    report = dispatch.explain(cfg(), H100).report("flash_attn")
    assert not report.available and not report.supported
    assert report.reasons[0].startswith("module 'flash_attn.cute' not importable: ModuleNotFoundError")
    assert report.reasons[-1] == (
        "no FlashAttention installed (looked for flash_attn.cute, flash_attn_interface, flash_attn): install "
        "FlashAttention 4 with pip install 'attention-dispatch[flash]' (needs a CUDA build of torch)")
    assert flash.CAPABILITY.description.startswith("FlashAttention: not installed; install FlashAttention 4")


@not_installed
def test_without_flash_attn_a_named_backend_is_refused():
    config = cfg(backend="flash_attn", num_heads=4, head_size=32)
    with pytest.raises(UnsupportedConfigError, match="module 'flash_attn.cute' not importable") as info:
        dispatch.select(config, H100)
    assert "Backend 'flash_attn' cannot run this config" in str(info.value)
    inputs = make_inputs(config, [1, 3], [5, 3])
    with pytest.raises(UnsupportedConfigError, match="`flash_attn` is not supported because:"):
        dispatch.attention(*inputs.args, config=config, **inputs.kwargs)


@not_installed
def test_without_flash_attn_auto_moves_on():
    # The same module registered first in the order, so auto must consider it before anything else.
    dispatch.register_backend("flash_attn_first", module="backends.flash_attn", position=0)
    try:
        plan = dispatch.select(cfg(), H100)
    finally:
        dispatch.unregister_backend("flash_attn_first")
    assert plan.name not in ("flash_attn_first", "flash_attn")
    skipped = dict(plan.skipped)
    assert skipped["flash_attn_first"][0].startswith("module 'flash_attn.cute' not importable")


# ------------------------------------------------------------------------------------------------
# The capability records
# ------------------------------------------------------------------------------------------------

ALL = {"fa4": flash.FA4_CAPABILITY, "fa3": flash.FA3_CAPABILITY, "fa2": flash.FA2_CAPABILITY}
# A device and block size each version runs on, for tests of everything else.
HOME = {"fa4": (H100, 16), "fa3": (H100, 16), "fa2": (A100, 256)}


@pytest.mark.parametrize("version", list(ALL))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_version_runs_16_bit_gqa_causal_and_noncausal(version, dtype):
    device, block_size = HOME[version]
    for causal in (True, False):
        config = cfg(q_dtype=dtype, kv_cache_dtype=dtype, block_size=block_size, causal=causal)
        assert why(ALL[version], config, device) == []


REFUSED_BY_ALL = {
    "int8": (dict(q_dtype="float16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD"),
             "kv_quant_mode=INT8_PER_TOKEN_HEAD: FlashAttention has no int8 KV cache"),
    "fp8_per_token_head": (
        dict(kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TOKEN_HEAD"),
        "kv_quant_mode=FP8_PER_TOKEN_HEAD: FlashAttention has no per-token-head KV scales (its descales are one per "
        "(sequence, KV head))"),
    "e5m2": (dict(q_dtype="float16", kv_cache_dtype="float8_e5m2", kv_quant_mode="FP8_PER_TENSOR"),
             "kv_cache_dtype='float8_e5m2' not in"),
    "bf16q_fp8kv": (dict(kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
                    "kv_quant_mode=FP8_PER_TENSOR with q_dtype=bfloat16: FlashAttention reads q, k and v in one dtype"),
    "fp8_out": (dict(out_dtype="float8_e4m3fn"),
                "out_dtype=float8_e4m3fn != q_dtype=bfloat16: FlashAttention writes the output in the query's dtype "
                "(no output conversion, no fp8 output scale)"),
    "fp32_out": (dict(out_dtype="float32"), "out_dtype=float32 != q_dtype=bfloat16"),
    "out_not_q": (dict(q_dtype="float16", kv_cache_dtype="float16", out_dtype="bfloat16"),
                  "out_dtype=bfloat16 != q_dtype=float16"),
    "cpu": (dict(), "device='cpu' not in {'cuda'}"),
    "head_size_300": (dict(head_size=300), "head_size=300 not supported (allowed: multiple of"),
}


@pytest.mark.parametrize("version", list(ALL))
@pytest.mark.parametrize("case", list(REFUSED_BY_ALL))
def test_every_version_refuses(version, case):
    fields, reason = REFUSED_BY_ALL[case]
    device, block_size = HOME[version]
    config = cfg(**dict(dict(block_size=block_size), **fields))
    found = why(ALL[version], config, CPU if case == "cpu" else device)
    assert any(r.startswith(reason) for r in found), found


def test_fa4_features():
    fa4_record = flash.FA4_CAPABILITY
    for fields in (dict(use_sinks=True), dict(logits_soft_cap=30.0), dict(sliding_window=128),
                   dict(sliding_window=7, causal=False), dict(use_sinks=True, logits_soft_cap=5.0, sliding_window=3)):
        assert why(fa4_record, cfg(**fields)) == [], fields
    assert why(fa4_record, cfg(use_alibi=True)) == [
        "use_alibi=True not supported: feature 'alibi' not in {'causal', 'non_causal', 'sinks', 'sliding_window', "
        "'softcap'}"]


def test_fa4_refuses_fp8_on_hopper_and_until_verified_on_blackwell():
    config = cfg(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR")
    on_hopper = why(flash.FA4_CAPABILITY, config, H100)
    assert ("q_dtype=float8_e4m3fn: FlashAttention 4's FP8 forward needs compute capability 10.x (SM100); this "
            "device is 9.0") in on_hopper
    assert "q_dtype='float8_e4m3fn' not in {'bfloat16', 'float16'}" in on_hopper
    assert ("q_dtype=float8_e4m3fn: FlashAttention 4's FP8 forward (SM100 only) is not verified by this backend"
            in why(flash.FA4_CAPABILITY, config, B200))


def test_fa4_compute_capabilities():
    assert why(flash.FA4_CAPABILITY, cfg(), B200) == []
    assert why(flash.FA4_CAPABILITY, cfg(), A100) == [
        "compute capability 8.0 < 9.0 required for q_dtype=bfloat16, kv_cache_dtype=bfloat16, out_dtype=bfloat16"]
    assert why(flash.FA4_CAPABILITY, cfg(), RTX5090) == [
        "compute capability 12.0: FlashAttention 4 has a paged-KV forward on 9.x (Hopper) and 10.x / 11.x "
        "(Blackwell) only"]


@pytest.mark.parametrize("head_size,on_hopper,on_blackwell", [
    (8, False, False), (40, False, False), (64, True, True), (96, True, True), (128, True, True),
    (192, True, False), (256, True, True), (272, False, False),
])
def test_fa4_head_sizes(head_size, on_hopper, on_blackwell):
    config = cfg(head_size=head_size)
    assert (why(flash.FA4_CAPABILITY, config, H100) == []) is on_hopper
    assert (why(flash.FA4_CAPABILITY, config, B200) == []) is on_blackwell
    if not on_blackwell and on_hopper:
        assert why(flash.FA4_CAPABILITY, config, B200) == [
            f"head_size={head_size} not supported by FlashAttention 4 on compute capability 10.0 (allowed: multiple "
            "of 16, at most 128, or 256)"]


@pytest.mark.parametrize("head_size,fields,tile", [
    (64, {}, 128), (96, {}, 128), (96, dict(causal=False), 144), (96, dict(sliding_window=9, causal=False), 128),
    (128, {}, 128), (128, dict(sliding_window=9), 128), (192, {}, 112), (192, dict(sliding_window=9), 96),
    (256, {}, 80), (256, dict(sliding_window=9), 64),
])
def test_fa4_kv_tile_on_hopper_follows_tile_size_fwd_sm90(head_size, fields, tile):
    assert fa4.kv_tile(cfg(head_size=head_size, **fields), H100) == tile
    assert fa4.kv_tile(cfg(head_size=head_size, **fields), B200) == 128
    assert fa4.kv_tile(cfg(head_size=head_size, **fields), A100) is None


def test_fa4_refuses_the_block_size_that_loads_pages_by_tma():
    assert why(flash.FA4_CAPABILITY, cfg(block_size=128)) == [
        "block_size=128 equals FlashAttention 4's KV tile for head_size=128 on compute capability 9.0: such pages "
        "load by TMA, which reads the unused tail of each sequence's last page, where a NaN or Inf makes the output "
        "NaN; choose another block size"]
    for block_size in (16, 32, 64, 256):
        assert why(flash.FA4_CAPABILITY, cfg(block_size=block_size)) == []
    assert why(flash.FA4_CAPABILITY, cfg(head_size=192, block_size=128)) == []  # tile 112: cp.async pages
    assert why(flash.FA4_CAPABILITY, cfg(block_size=8)) == ["block_size=8 not supported (allowed: multiple of 16)"]


def test_fa3_fp8_only_with_the_exact_mapping():
    fp8 = dict(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR")
    assert cfg(**fp8).out_dtype == "bfloat16"
    assert why(flash.FA3_CAPABILITY, cfg(**fp8)) == []
    assert flash.FA3_CAPABILITY.fp8_query_p_dtype == "float8_e4m3fn"
    assert ("out_dtype=float16 with q_dtype=float8_e4m3fn: FlashAttention 3 writes an FP8 attention's output in "
            "bfloat16 only") in why(flash.FA3_CAPABILITY, cfg(**fp8, out_dtype="float16"))
    assert why(flash.FA3_CAPABILITY, cfg(**fp8, head_size=40)) == [
        "head_size=40 with q_dtype=float8_e4m3fn: FlashAttention 3's FP8 path needs a multiple of 16"]
    assert why(flash.FA3_CAPABILITY, cfg(head_size=40)) == []
    assert ("kv_quant_mode=FP8_PER_TENSOR with q_dtype=bfloat16: FlashAttention reads q, k and v in one dtype; an "
            "fp8 cache needs q_dtype=float8_e4m3fn") in why(flash.FA3_CAPABILITY, cfg(
                kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"))
    assert ("kv_cache_dtype=float8_e5m2: FlashAttention's FP8 path is e4m3 (q, k and v in one dtype), and an e5m2 "
            "cache cannot serve a 16-bit query") in why(flash.FA3_CAPABILITY, cfg(
                kv_cache_dtype="float8_e5m2", kv_quant_mode="FP8_PER_TENSOR"))


def test_fa3_is_hopper_only_without_sinks_or_alibi():
    assert why(flash.FA3_CAPABILITY, cfg(), B200) == [
        "compute capability 10.0: FlashAttention 3 runs on 9.x (Hopper) only"]
    assert why(flash.FA3_CAPABILITY, cfg(), A100)[0].startswith("compute capability 8.0 < 9.0 required")
    assert why(flash.FA3_CAPABILITY, cfg(sliding_window=5, logits_soft_cap=3.0)) == []
    assert len(why(flash.FA3_CAPABILITY, cfg(use_sinks=True, use_alibi=True))) == 2


def test_fa2_pages_of_256_and_causal_alibi():
    assert why(flash.FA2_CAPABILITY, cfg(block_size=16), A100) == [
        "block_size=16 not supported (allowed: multiple of 256)"]
    assert why(flash.FA2_CAPABILITY, cfg(block_size=512, use_alibi=True, sliding_window=64,
                                         logits_soft_cap=10.0), A100) == []
    assert why(flash.FA2_CAPABILITY, cfg(block_size=256, use_alibi=True, causal=False), A100) == [
        "use_alibi=True with causal=False: FlashAttention 2's bias is -slope * |pos - j|, which differs from "
        "slope * (j - pos) for keys after the query"]
    assert why(flash.FA2_CAPABILITY, cfg(block_size=256, use_sinks=True), A100)[0].startswith(
        "use_sinks=True not supported")
    assert why(flash.FA2_CAPABILITY, cfg(block_size=256, head_size=36), A100) == [
        "head_size=36 not supported (allowed: multiple of 8, at most 256)"]
    assert why(flash.FA2_CAPABILITY, cfg(block_size=256), DeviceInfo(type="cuda", compute_capability=(7, 5)))


@pytest.mark.parametrize("window", [1, 2, 5, 40])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 9), (4, 9), (9, 9)])
def test_window_mapping_reproduces_the_design_rule(window, causal, q_len, kv_len):
    """flash-attn keeps key j for query i when pos - left <= j <= pos + right, pos = i + kv_len - q_len,
    with right = 0 under causal and unlimited otherwise; docs/DESIGN.md keeps j when pos - j < W (and j <= pos
    if causal)."""
    config = cfg(sliding_window=window, causal=causal)
    left = common.window_size_left(config)
    pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    key = torch.arange(kv_len)[None, :]
    flash_rule = (key >= pos - left) & ((key <= pos) if causal else torch.ones_like(key, dtype=torch.bool))
    design_rule = (pos - key < window) & ((key <= pos) if causal else torch.ones_like(key, dtype=torch.bool))
    assert torch.equal(flash_rule, design_rule)
    assert common.window_size_left(cfg()) is None


def test_can_write_into_needs_contiguous_aligned_memory():
    buffer = torch.empty(2 * 4 * 32 + 1, dtype=torch.bfloat16)
    assert common.can_write_into(buffer[: 2 * 4 * 32].view(2, 4, 32))
    assert not common.can_write_into(buffer[1:].view(2, 4, 32))  # 2-byte offset
    assert not common.can_write_into(torch.empty(2, 8, 32, dtype=torch.bfloat16)[:, :4])
    assert not common.can_write_into(None)


# ------------------------------------------------------------------------------------------------
# FlashAttention 4 on a GPU
# ------------------------------------------------------------------------------------------------


def _fa4_unavailable() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if not flash.INSTALLED or flash.INSTALLED[0].major != 4:
        return "FlashAttention 4 (flash-attn-4) is not the installed FlashAttention"
    problems = missing_modules((fa4.MODULE,))
    return problems[0] if problems else ""


FA4_SKIP = _fa4_unavailable()
fa4_only = pytest.mark.skipif(bool(FA4_SKIP), reason=FA4_SKIP or "-")

# The FlashAttention 4 cases of the shared table, by name; they share one batch: decode, whole prompts and
# chunked prefill, KV lengths around the page edges (16, 64) and the 128-key tile, a sequence of two query tiles.
GPU_CASES = [c.name for c in cases("gpu", "flash_attn")]
Q_LENS = list(named_case(GPU_CASES[0]).q_lens)
KV_LENS = list(named_case(GPU_CASES[0]).kv_lens)


def gpu_config(case: str, **changes) -> AttentionConfig:
    return named_case(case).config(backend="flash_attn", **changes)


@dataclass
class Outcome:
    """One FA4 run through dispatch.attention and what it is judged by (float64 tensors on the GPU)."""

    config: AttentionConfig
    out: torch.Tensor
    judge: torch.Tensor  # the float64 reference
    others: dict  # backend name -> its output, for each of sdpa / triton that accepts the config
    errors: dict  # name -> max |output - judge|; "pytorch" is plain PyTorch in q's dtype

    @property
    def factor(self) -> int:
        # flash-attn's own tests allow 3x with softcap (its tanh is the fast approximation), 2x otherwise.
        return 3 if self.config.logits_soft_cap is not None else 2

    @property
    def yardstick(self) -> float:
        """The error of a same-precision implementation: plain PyTorch in q's dtype, or the sdpa backend."""
        return max(self.errors["pytorch"], self.errors.get("sdpa", 0.0))

    @property
    def bound(self) -> float:
        """flash-attn's rule: factor x the yardstick, plus two roundings of the largest output."""
        atol = 2 * unit_roundoff(self.config.q_torch_dtype) * self.judge.abs().max().item()
        return self.factor * self.yardstick + atol

    def label(self) -> str:
        return f"{self.config.summary()}: max errors against float64 {self.errors}, bound {self.bound:.4g}"


_outcomes: dict = {}


def run_fa4(config: AttentionConfig, q_lens=tuple(Q_LENS), kv_lens=tuple(KV_LENS), seed: int = 0) -> Outcome:
    """FA4 and the other backends on one set of inputs, computed once per test session."""
    key = (config, tuple(q_lens), tuple(kv_lens), seed)
    if key not in _outcomes:
        inputs = make_inputs(config, list(q_lens), list(kv_lens), device="cuda", seed=seed)
        out = dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
        assert out.dtype == config.q_torch_dtype and out.shape == inputs.q.shape
        judge = float64_attention(inputs, config)
        errors = {"flash_attn": (out.double() - judge).abs().max().item(),
                  "pytorch": (same_precision_attention(inputs, config) - judge).abs().max().item()}
        others = {}
        for name in ("sdpa", "triton"):
            other_config = config.model_copy(update={"backend": name})
            try:
                dispatch.select(other_config, "cuda")
            except UnsupportedConfigError:
                continue
            others[name] = dispatch.attention(*inputs.args, config=other_config, **inputs.kwargs).double()
            errors[name] = (others[name] - judge).abs().max().item()
        _outcomes[key] = Outcome(config, out.double(), judge, others, errors)
    return _outcomes[key]


def assert_within_flash_attn_rule(outcome: Outcome) -> None:
    assert outcome.errors["flash_attn"] <= outcome.bound, outcome.label()


def assert_agrees_with(outcome: Outcome, name: str) -> None:
    """Two implementations that each meet flash-attn's rule differ by at most twice its bound."""
    if name not in outcome.others:
        pytest.skip(f"backend {name!r} refuses {outcome.config.summary()}")
    disagreement = (outcome.out - outcome.others[name]).abs().max().item()
    assert disagreement <= 2 * outcome.bound, (
        f"|flash_attn - {name}| = {disagreement:.4g}; {outcome.label()} (the one far from float64 is off)")


@pytest.mark.gpu
@fa4_only
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_fa4_matches_the_float64_reference_and_sdpa(case):
    outcome = run_fa4(gpu_config(case))
    assert_within_flash_attn_rule(outcome)
    assert_agrees_with(outcome, "sdpa")


@pytest.mark.gpu
@fa4_only
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_fa4_agrees_with_the_triton_backend(case):
    assert_agrees_with(run_fa4(gpu_config(case)), "triton")


@pytest.mark.gpu
@fa4_only
@pytest.mark.parametrize("q_lens,kv_lens", [
    ([1] * 7, [1, 15, 16, 17, 127, 128, 129]),  # decode only
    ([1, 15, 16, 17, 127, 128, 129], [1, 15, 16, 17, 127, 128, 129]),  # whole prompts only
    ([3, 1, 64], [300, 1, 64]),  # chunked prefill, decode, prompt
], ids=["decode", "prefill", "mixed"])
def test_fa4_batches(q_lens, kv_lens):
    outcome = run_fa4(gpu_config("bf16-h128-bs16-causal"), q_lens, kv_lens, seed=1)
    assert_within_flash_attn_rule(outcome)
    assert_agrees_with(outcome, "sdpa")


@pytest.mark.gpu
@fa4_only
def test_fa4_writes_into_out_in_place_or_by_copy():
    config = gpu_config("bf16-h128-bs16-window")
    inputs = make_inputs(config, Q_LENS, KV_LENS, device="cuda")
    expected = dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
    out = torch.full_like(inputs.q, float("nan"))
    assert dispatch.attention(*inputs.args, config=config, out=out, **inputs.kwargs) is out
    assert torch.equal(out, expected)
    # A view two bytes past an aligned address: FA4 cannot take it, so the result is copied in.
    buffer = torch.full((inputs.q.numel() + 1,), float("nan"), dtype=inputs.q.dtype, device="cuda")
    misaligned = buffer[1:].view(inputs.q.shape)
    assert not common.can_write_into(misaligned)
    assert dispatch.attention(*inputs.args, config=config, out=misaligned, **inputs.kwargs) is misaligned
    assert torch.equal(misaligned, expected)


@pytest.mark.gpu
@fa4_only
def test_fa4_public_entry_point_gives_the_same_result(monkeypatch):
    """If a later flash-attn-4 changes its internal signature, the public function plus a copy takes over."""
    from flash_attn.cute import interface

    config = gpu_config("bf16-h128-bs16-sinks", sliding_window=40, logits_soft_cap=6.0)
    inputs = make_inputs(config, Q_LENS, KV_LENS, device="cuda")
    assert fa4._entry()[1], "flash-attn-4's _flash_attn_fwd no longer takes the keywords the adapter passes"
    internal = fa4.forward(*inputs.args, config=config, **inputs.kwargs)
    monkeypatch.setattr(fa4, "_entry", lambda: (interface.flash_attn_varlen_func, False))
    out = torch.empty_like(inputs.q)
    public = fa4.forward(*inputs.args, config=config, out=out, **inputs.kwargs)
    assert public is out and torch.equal(public, internal)


@pytest.mark.gpu
@fa4_only
def test_fa4_tma_pages_read_the_tail_of_the_last_page():
    """Why block_size == KV tile is refused: FA4 run directly (bypassing the refusal) on such pages
    returns NaN when the unused tail slots hold NaN, and the right values when they are finite."""
    config = cfg(block_size=128, backend="flash_attn")
    assert fa4.kv_tile(config, dispatch.capabilities.resolve_device("cuda")) == 128
    with pytest.raises(UnsupportedConfigError, match="equals FlashAttention 4's KV tile"):
        dispatch.select(config, "cuda")
    poisoned = make_inputs(config, Q_LENS, KV_LENS, device="cuda", poison=True)
    out = fa4.forward(*poisoned.args, config=config, **poisoned.kwargs)
    assert torch.isnan(out).any(), (
        "FA4 with TMA-loaded pages no longer reads the tail of the last page: the block_size rule can be relaxed")
    clean = make_inputs(config, Q_LENS, KV_LENS, device="cuda", poison=False)
    out = fa4.forward(*clean.args, config=config, **clean.kwargs).double()
    judge = float64_attention(clean, config)
    errors = {"flash_attn": (out - judge).abs().max().item(),
              "pytorch": (same_precision_attention(clean, config) - judge).abs().max().item()}
    assert_within_flash_attn_rule(Outcome(config, out, judge, {}, errors))


REFUSED_ON_HOPPER = {
    "fp8q": dict(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
    "bf16q-fp8kv": dict(kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
    "fp16q-e5m2kv": dict(q_dtype="float16", kv_cache_dtype="float8_e5m2", kv_quant_mode="FP8_PER_TENSOR"),
    "fp8-per-token-head": dict(kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TOKEN_HEAD"),
    "int8-per-token-head": dict(q_dtype="float16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD"),
    "alibi": dict(use_alibi=True),
    "fp8-out": dict(out_dtype="float8_e4m3fn"),
    "fp32-out": dict(out_dtype="float32"),
    "fp16q-bf16-out": dict(q_dtype="float16", kv_cache_dtype="float16", out_dtype="bfloat16"),
    "block-size-8": dict(block_size=8),
    "block-size-tile": dict(block_size=128),
    "head-size-40": dict(head_size=40),
    "head-size-512": dict(head_size=512),
}


@pytest.mark.gpu
@fa4_only
@pytest.mark.parametrize("case", list(REFUSED_ON_HOPPER))
def test_fa4_refuses_rather_than_computes(case):
    config = cfg(backend="flash_attn", **REFUSED_ON_HOPPER[case])
    device = dispatch.capabilities.resolve_device("cuda")
    if device.compute_capability[0] != 9:
        pytest.skip(f"the refusals listed are Hopper's; this is sm {device.compute_capability}")
    inputs = make_inputs(config, [1, 5], [7, 5], device="cuda")
    with pytest.raises(UnsupportedConfigError, match="`flash_attn` is not supported because:"):
        dispatch.attention(*inputs.args, config=config, **inputs.kwargs)


@pytest.mark.gpu
@fa4_only
def test_explain_names_the_fa4_version_found():
    assert flash.CAPABILITY.description.startswith("FlashAttention 4 (flash-attn-4 ")
    report = dispatch.explain(cfg(), "cuda")
    assert report.report("flash_attn").supported, report


# ------------------------------------------------------------------------------------------------
# FlashAttention 3 and 2: only where they are installed
# ------------------------------------------------------------------------------------------------


def _version_unavailable(module) -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    problems = missing_modules((module.MODULE,))
    return problems[0] if problems else ""


@pytest.mark.gpu
@pytest.mark.parametrize("version,fields", [
    ("fa3", dict()),
    ("fa3", dict(sliding_window=20, logits_soft_cap=5.0, causal=False)),
    ("fa3", dict(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR")),
    ("fa2", dict(block_size=256)),
    ("fa2", dict(block_size=256, use_alibi=True, sliding_window=20, logits_soft_cap=5.0)),
], ids=["fa3-bf16", "fa3-window-softcap", "fa3-fp8", "fa2-bf16", "fa2-alibi-window-softcap"])
def test_older_versions_where_installed(version, fields):
    module = {"fa3": fa3, "fa2": fa2}[version]
    skip = _version_unavailable(module)
    if skip:
        pytest.skip(skip)
    name = f"flash_attn_{version}_under_test"
    dispatch.register_backend(name, module=f"backends.flash_attn.{version}")
    try:
        config = cfg(backend=name, **fields)
        inputs = make_inputs(config, Q_LENS, KV_LENS, device="cuda")
        out = dispatch.attention(*inputs.args, config=config, **inputs.kwargs).double()
    finally:
        dispatch.unregister_backend(name)
    judge = float64_attention(inputs, config)
    if config.q_is_fp8:
        # FA3 rounds P to e4m3 before the PV product: allow a few e4m3 roundings of the output.
        assert (out - judge).abs().max().item() <= 4 * unit_roundoff(torch.float8_e4m3fn) * judge.abs().max().item()
        return
    errors = {"flash_attn": (out - judge).abs().max().item(),
              "pytorch": (same_precision_attention(inputs, config) - judge).abs().max().item()}
    assert_within_flash_attn_rule(Outcome(config, out, judge, {}, errors))


def test_fa4_refuses_non_causal_head_sizes_measured_wrong():
    """Non-causal head_size 80 gave max errors of 0.27 on an H200 (GPU parity); multiples of 32 stay."""
    assert why(flash.FA4_CAPABILITY, cfg(head_size=80, causal=False)) == [
        "causal=False with head_size=80: FlashAttention 4 (4.0.0b36) computed non-causal head_size 80 wrongly on an "
        "H200 (GPU parity matrix); non-causal needs a head_size multiple of 32"]
    assert why(flash.FA4_CAPABILITY, cfg(head_size=80)) == []
    assert why(flash.FA4_CAPABILITY, cfg(head_size=96, causal=False)) == []
