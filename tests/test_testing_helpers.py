"""dispatch.testing (used by the selftest and to build inputs) checked against the naive oracle."""

import pytest
import torch

from dispatch import AttentionConfig
from dispatch.testing import make_inputs, reference_attention
from tests.oracle import reference_attention as oracle


@pytest.mark.parametrize("fields", [
    dict(q_dtype="fp8", kv_cache_dtype="fp8", kv_quant_mode="FP8_PER_TENSOR", sliding_window=9, use_sinks=True),
    dict(q_dtype="fp16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD", logits_soft_cap=3.0,
         use_alibi=True, causal=False),
    dict(q_dtype="bf16", kv_cache_dtype="e5m2", kv_quant_mode="FP8_PER_TOKEN_HEAD"),
], ids=["fp8-window-sinks", "int8-softcap-alibi-noncausal", "per-token-e5m2"])
def test_selftest_reference_agrees_with_the_oracle(fields):
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=16, **fields)
    inputs = make_inputs(config, [1, 4, 17], [1, 16, 33])
    fast = reference_attention(inputs, config)
    slow = oracle(*inputs.args, **inputs.oracle_kwargs(config))
    assert torch.allclose(fast, slow, atol=1e-12, rtol=1e-12)


def test_poisoning_covers_every_unread_slot():
    config = AttentionConfig(num_heads=2, num_kv_heads=1, head_size=8, q_dtype="fp16", kv_cache_dtype="fp16")
    inputs = make_inputs(config, [1, 2], [3, 20], extra_blocks=2)
    nan_slots = torch.isnan(inputs.key_cache).all(-1).sum().item()
    total_slots = inputs.key_cache.shape[0] * inputs.key_cache.shape[1]
    assert nan_slots == total_slots - (3 + 20)
    # The block table's padding column points at a poisoned page.
    pad = inputs.block_table[:, -1].long()
    assert torch.isnan(inputs.key_cache[pad]).all()
