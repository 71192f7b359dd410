"""The test machinery itself: the oracle's independence, the one other attention implementation
(tests/parity/same_precision.py) checked against it, the input builder, and the case table."""

import ast
import pathlib

import pytest
import torch

from dispatch import AttentionConfig
from dispatch.cases import CASES, DTYPE_MODES, FEATURES, PARITY_DTYPE_MODES, case, cases
from dispatch.testing import make_inputs, unit_roundoff
from tests.oracle import reference_attention as oracle
from tests.parity.same_precision import float64_attention, same_precision_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]

FIELDS = {
    "fp8-window-sinks": dict(q_dtype="fp8", kv_cache_dtype="fp8", kv_quant_mode="FP8_PER_TENSOR", sliding_window=9,
                             use_sinks=True),
    "int8-softcap-alibi-noncausal": dict(q_dtype="fp16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD",
                                         logits_soft_cap=3.0, use_alibi=True, causal=False),
    "per-token-e5m2": dict(q_dtype="bf16", kv_cache_dtype="e5m2", kv_quant_mode="FP8_PER_TOKEN_HEAD"),
    "window-softcap-sinks-noncausal": dict(sliding_window=5, logits_soft_cap=3.0, use_sinks=True, causal=False),
    "alibi-window": dict(use_alibi=True, sliding_window=4),
    "fp8-out": dict(q_dtype="fp16", kv_cache_dtype="fp16", out_dtype="float8_e4m3fn", softmax_scale=0.3),
}


def test_the_oracle_imports_nothing_but_torch_and_the_standard_library():
    """Independence: a bug in dispatch or a backend cannot be repeated in the judge."""
    tree = ast.parse((ROOT / "dispatch" / "reference.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "math", "typing", "torch"}


@pytest.mark.parametrize("fields", list(FIELDS.values()), ids=list(FIELDS))
def test_the_float64_implementation_agrees_with_the_oracle(fields):
    """float64_attention stands in for the oracle at GPU sizes only because it agrees with it here,
    query rows split into chunks included."""
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=16, **fields)
    inputs = make_inputs(config, [1, 4, 17, 0], [1, 16, 33, 5])
    expected = oracle(*inputs.args, **inputs.oracle_kwargs(config))
    assert torch.allclose(float64_attention(inputs, config), expected, atol=1e-12, rtol=1e-12)
    assert torch.allclose(float64_attention(inputs, config, rows_per_chunk=3), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("fields", list(FIELDS.values()), ids=list(FIELDS))
def test_the_same_precision_yardstick_errs_by_a_few_roundings(fields):
    """The parity bound is k x the yardstick's error: a yardstick that were exact would fail every
    backend, and one far off would pass wrong ones. Its error is of the order of one rounding in
    the least precise step (P for an fp8 query is e4m3; the output dtype), relative to max |out|."""
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=16, **fields)
    inputs = make_inputs(config, [1, 4, 17], [1, 16, 33])
    expected = oracle(*inputs.args, **inputs.oracle_kwargs(config))
    step = max(unit_roundoff("float8_e4m3fn" if config.q_is_fp8 else config.q_dtype), unit_roundoff(config.out_dtype))
    error = float((same_precision_attention(inputs, config) - expected).abs().max()) / float(expected.abs().max())
    assert step / 10 < error < 4 * step, (error, step)


def test_poisoning_covers_every_unread_slot():
    config = AttentionConfig(num_heads=2, num_kv_heads=1, head_size=8, q_dtype="fp16", kv_cache_dtype="fp16")
    inputs = make_inputs(config, [1, 2], [3, 20], extra_blocks=2)
    nan_slots = torch.isnan(inputs.key_cache).all(-1).sum().item()
    total_slots = inputs.key_cache.shape[0] * inputs.key_cache.shape[1]
    assert nan_slots == total_slots - (3 + 20)
    # The block table's padding column points at a poisoned page.
    pad = inputs.block_table[:, -1].long()
    assert torch.isnan(inputs.key_cache[pad]).all()


def test_the_block_table_maps_each_token_to_its_page_slot():
    """The layout make_inputs documents: key j of sequence s at key_cache[block_table[s, j // bs], j % bs]."""
    config = AttentionConfig(num_heads=2, num_kv_heads=1, head_size=8, q_dtype="fp16", kv_cache_dtype="fp16",
                             block_size=4)
    inputs = make_inputs(config, [1, 3], [6, 9])
    assert inputs.cu_seqlens_q.tolist() == [0, 1, 4] and inputs.seq_lens.tolist() == [6, 9]
    assert inputs.block_table.shape == (2, 4)  # the longest sequence needs 3 pages, plus one padding column
    pages = inputs.block_table[:, :3].tolist()
    used = [pages[0][:2], pages[1][:3]]
    assert len(set(used[0] + used[1])) == 5  # no page shared
    for s, kv_len in enumerate([6, 9]):
        for j in range(kv_len):
            assert torch.isfinite(inputs.key_cache[used[s][j // 4], j % 4]).all()
        if kv_len % 4:
            assert torch.isnan(inputs.key_cache[used[s][-1], kv_len % 4:]).all()


# ------------------------------------------------------------------------------------------------
# The case table
# ------------------------------------------------------------------------------------------------

TAGS = {"selftest", "parity", "bench", "bench-quick", "bench-smoke", "triton", "sdpa", "gpu", "flash_attn"}


def test_every_case_is_used_and_every_complete_case_builds_its_config():
    for c in CASES:
        assert c.tags and c.tags <= TAGS, (c.name, c.tags)
        if {"selftest", "flash_attn"} & c.tags:
            c.config()  # complete: validates as it stands
        assert len(c.q_lens) == len(c.kv_lens) and all(q <= k for q, k in zip(c.q_lens, c.kv_lens))
    assert cases("bench-quick") and set(cases("bench-quick")) <= set(cases("bench"))


def test_partial_cases_complete_with_every_factor_value():
    """Parity length sets take any dtype mode and feature; bench shapes any dtype mode."""
    for c in cases("parity"):
        for mode in PARITY_DTYPE_MODES:
            for feature in FEATURES.values():
                c.config(num_heads=8, num_kv_heads=2, head_size=64, **DTYPE_MODES[mode], **feature)
    for c in cases("bench") + cases("bench-smoke"):
        for mode in DTYPE_MODES.values():
            assert c.config(block_size=16, **mode).causal


def test_case_lookup_names_the_known_cases():
    assert case("decode").kind == "decode" and case("prefill").kind == "prefill" and case("mixed").kind == "mixed"
    with pytest.raises(KeyError, match="no case named 'decod'; known: .*'decode'"):
        case("decod")
