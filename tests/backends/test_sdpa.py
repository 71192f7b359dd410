"""The sdpa backend against the float64 oracle, through dispatch.attention."""

import functools

import pytest
import torch

import dispatch
from dispatch import AttentionConfig
from tests.cases import assert_close_to_oracle, make_inputs, output_as_real, tolerance
from tests.oracle import reference_attention

# Lengths around page (16) and tile (128) edges, with decode, whole-prompt and chunked-prefill sequences.
KV_LENS = [1, 15, 16, 17, 127, 128, 129]
Q_LENS = [1, 1, 16, 5, 127, 1, 40]

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
    return torch.float32 if config.q_is_fp8 else config.q_torch_dtype


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
@pytest.mark.parametrize("mode", ["pr42080_fp8q_fp8kv", "fp16q_int8_per_token_head", "bf16q_fp8kv"])
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


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("feature", ["causal", "all", "fp8out"])
def test_on_cuda(mode, feature):
    run_and_compare(_config(mode, feature), device="cuda")
