"""`auto` with a workload: measured speed rules order the walk, among correct backends only (dispatch/speed.py)."""

from __future__ import annotations

import pytest
import torch

import dispatch
from dispatch import AttentionConfig, speed
from dispatch.capabilities import DeviceInfo
from dispatch.speed import SpeedRule
from dispatch.testing import make_inputs

H200 = DeviceInfo(type="cuda", index=0, name="NVIDIA H200", compute_capability=(9, 0))
BF16 = AttentionConfig(num_heads=32, num_kv_heads=8, head_size=128)


def test_workload_from_the_hint():
    assert speed.workload_of(1) == "decode"
    assert speed.workload_of(speed.DECODE_MAX_QUERY_LEN) == "decode"
    assert speed.workload_of(speed.DECODE_MAX_QUERY_LEN + 1) == "prefill"


def test_every_rule_names_registered_backends_and_its_evidence():
    names = dispatch.backend_names()
    for rule in speed.SPEED_RULES:
        assert set(rule.order) <= set(names), rule
        assert rule.workload in speed.WORKLOADS and rule.query in ("16-bit", "fp8")
        assert rule.cache in ("16-bit", "quantized") and "RESULTS.md" in rule.evidence


def test_a_prefill_rule_reorders_auto_and_explain_prints_it():
    plain = dispatch.explain(BF16, H200)
    assert plain.order == dispatch.default_order() and plain.speed_rule is None
    prefill = dispatch.explain(BF16, H200, workload="prefill")
    rule = speed.rule_for(BF16, H200, "prefill")
    assert rule is not None and prefill.speed_rule == rule
    assert prefill.order[: len(rule.order)] == rule.order
    assert sorted(prefill.order) == sorted(plain.order)
    assert "workload: prefill; speed rule: sm90 prefill" in str(prefill)
    assert rule.evidence in str(prefill)
    # The rule only orders: the backend chosen still has to be supported (flash_attn is not installed
    # on a CPU-only machine, so auto moves on, with its reasons).
    if not prefill.report("flash_attn").supported:
        assert prefill.chosen != "flash_attn"


def test_rules_never_change_a_named_backend_or_a_scoped_order():
    named = BF16.model_copy(update={"backend": "sdpa"})
    assert dispatch.explain(named, H200, workload="prefill").speed_rule is None
    with dispatch.use(order=["sdpa", "triton"]):
        scoped = dispatch.explain(BF16, H200, workload="prefill")
    assert scoped.order == ("sdpa", "triton") and scoped.speed_rule is None


def test_unknown_workload_is_refused():
    with pytest.raises(ValueError, match="workload: expected one of"):
        dispatch.explain(BF16, H200, workload="training")


def test_attention_with_max_query_len_runs_the_rule_backend(monkeypatch):
    """On the CPU a test rule sends prefill-heavy calls to a fake backend; decode and hint-less calls keep
    the default order, and each workload's plan is cached separately."""
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, q_dtype="fp16", kv_cache_dtype="fp16")
    sdpa = dispatch.select(config.model_copy(update={"backend": "sdpa"}), "cpu")
    calls = []

    def fast(*args, **kwargs):
        calls.append("fast")
        return sdpa.backend_forward(*args, **kwargs)

    dispatch.register_backend("fast_prefill", capability=sdpa.capability, forward=fast)
    monkeypatch.setattr(speed, "SPEED_RULES", (SpeedRule("cpu", "prefill", "16-bit", "16-bit", ("fast_prefill",),
                                                         "a test rule (RESULTS.md)"),))
    try:
        inputs = make_inputs(config, [1, 9], [5, 20])
        with dispatch.use(order=None):
            dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
            assert calls == []
            out = dispatch.attention(*inputs.args, config=config, max_query_len=9, **inputs.kwargs)
            assert calls == ["fast"]
            assert torch.equal(out, sdpa.forward(*inputs.args, **inputs.kwargs))
            dispatch.attention(*inputs.args, config=config, max_query_len=1, **inputs.kwargs)
            dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
            assert calls == ["fast"]
            dispatch.attention(*inputs.args, config=config, max_query_len=64, **inputs.kwargs)
            assert calls == ["fast", "fast"]
        explanation = dispatch.explain(config, "cpu", workload="prefill")
        assert explanation.chosen == "fast_prefill" and "a test rule" in str(explanation)
    finally:
        dispatch.unregister_backend("fast_prefill")


def test_a_rule_whose_needs_are_not_installed_does_not_apply():
    """Quantized-cache prefill goes through dequant only where FlashAttention 4 is there to run inside it."""
    config = AttentionConfig(num_heads=32, num_kv_heads=8, head_size=128, kv_cache_dtype="float8_e4m3fn",
                             kv_quant_mode="FP8_PER_TENSOR")
    rule = speed.rule_for(config, H200, "prefill")
    assert rule is not None and rule.order[0] == "dequant" and rule.needs == ("flash_attn",)
    assert speed.rule_for(config, H200, "prefill", installed=lambda name: False) is None
    assert speed.rule_for(config, H200, "decode") is None  # decode keeps the default order
    flash_installed = dispatch.explain(BF16, H200).report("flash_attn").available
    explanation = dispatch.explain(config, H200, workload="prefill")
    assert (explanation.speed_rule == rule) == flash_installed
