"""reasons(capability, config, device): every reason, each naming field, value and what is allowed."""

import pytest

from dispatch.capabilities import Capability, DeviceInfo, reasons
from dispatch.config import AttentionConfig, KVQuantMode

CPU = DeviceInfo(type="cpu", name="cpu")
AMPERE = DeviceInfo(type="cuda", index=0, name="A100", compute_capability=(8, 0))
HOPPER = DeviceInfo(type="cuda", index=0, name="H100", compute_capability=(9, 0))

NARROW = Capability(
    description="a deliberately narrow test backend",
    q_dtypes=frozenset({"float16", "bfloat16"}),
    kv_cache_dtypes=frozenset({"float16", "bfloat16"}),
    out_dtypes=frozenset({"float16", "bfloat16"}),
    kv_quant_modes=frozenset({KVQuantMode.NONE}),
    devices=frozenset({"cuda"}),
    head_sizes=frozenset({64, 128}),
    block_size_multiple=256,
    features=frozenset({"causal"}),
    min_compute_capability=(8, 0),
    min_compute_capability_by_dtype=(("float8_e4m3fn", (8, 9)),),
)


def cfg(**changes):
    return AttentionConfig(**dict(dict(num_heads=8, num_kv_heads=2, head_size=64, block_size=256), **changes))


def test_no_reasons_when_everything_fits():
    assert reasons(NARROW, cfg(), AMPERE) == []


def test_every_reason_is_reported_not_just_the_first():
    config = cfg(q_dtype="fp8", kv_cache_dtype="fp8", kv_quant_mode="FP8_PER_TENSOR", head_size=80, block_size=16,
                 causal=False, sliding_window=4, logits_soft_cap=10.0, use_alibi=True, use_sinks=True)
    got = reasons(NARROW, config, CPU)
    expected = [
        "device='cpu' not in {'cuda'}",
        "q_dtype='float8_e4m3fn' not in {'bfloat16', 'float16'}",
        "kv_cache_dtype='float8_e4m3fn' not in {'bfloat16', 'float16'}",
        "kv_quant_mode=FP8_PER_TENSOR not in {'NONE'}",
        "head_size=80 not supported (allowed: {64, 128})",
        "block_size=16 not supported (allowed: multiple of 256)",
        "causal=False not supported: feature 'non_causal' not in {'causal'}",
        "sliding_window=4 not supported: feature 'sliding_window' not in {'causal'}",
        "logits_soft_cap=10.0 not supported: feature 'softcap' not in {'causal'}",
        "use_alibi=True not supported: feature 'alibi' not in {'causal'}",
        "use_sinks=True not supported: feature 'sinks' not in {'causal'}",
    ]
    assert got == expected


def test_compute_capability_overall_and_per_dtype():
    old = DeviceInfo(type="cuda", index=0, name="V100", compute_capability=(7, 0))
    assert reasons(NARROW, cfg(), old) == [
        "compute capability 7.0 < 8.0 required for q_dtype=bfloat16, kv_cache_dtype=bfloat16, out_dtype=bfloat16"
    ]
    fp8_everywhere = NARROW.replace(
        q_dtypes=frozenset({"float8_e4m3fn"}), kv_cache_dtypes=frozenset({"float8_e4m3fn"}),
        kv_quant_modes=frozenset({KVQuantMode.FP8_PER_TENSOR}),
    )
    fp8 = cfg(q_dtype="fp8", kv_cache_dtype="fp8", kv_quant_mode="FP8_PER_TENSOR")
    assert reasons(fp8_everywhere, fp8, HOPPER) == []
    assert reasons(fp8_everywhere, fp8, AMPERE) == [
        "compute capability 8.0 < 8.9 required for q_dtype=float8_e4m3fn, kv_cache_dtype=float8_e4m3fn, "
        "out_dtype=bfloat16"
    ]


def test_cuda_without_a_gpu_is_a_reason():
    no_gpu = DeviceInfo(type="cuda", name="unavailable")
    assert reasons(NARROW, cfg(), no_gpu) == ["device='cuda' but CUDA is not available in this process"]


def test_missing_module_carries_the_import_error_text():
    needs = NARROW.replace(required_modules=("surely_not_a_module_xyz",))
    got = reasons(needs, cfg(), AMPERE)
    assert got == [
        "module 'surely_not_a_module_xyz' not importable: ModuleNotFoundError: No module named 'surely_not_a_module_xyz'"
    ]


def test_extra_rules_add_their_reasons():
    def no_gqa(config, device):
        return [f"num_heads={config.num_heads} != num_kv_heads={config.num_kv_heads}: no GQA"] \
            if config.num_heads != config.num_kv_heads else []

    with_rule = NARROW.replace(extra_rules=(no_gqa,))
    assert reasons(with_rule, cfg(), AMPERE) == ["num_heads=8 != num_kv_heads=2: no GQA"]


def test_head_size_rule_by_multiple_and_maximum():
    cap = NARROW.replace(head_sizes=None, max_head_size=256, head_size_multiple=8)
    assert cap.supports_head_size(80) and cap.supports_head_size(256)
    assert not cap.supports_head_size(84) and not cap.supports_head_size(264)
    assert reasons(cap, cfg(head_size=264), AMPERE) == [
        "head_size=264 not supported (allowed: multiple of 8, at most 256)"
    ]


def test_unknown_feature_name_is_refused_when_declaring():
    with pytest.raises(ValueError, match="features: unknown"):
        NARROW.replace(features=frozenset({"causal", "dropout"}))
