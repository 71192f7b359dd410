"""The config rules as a table: every accepted and every refused combination."""

import itertools
import json

import pytest
import torch
from pydantic import ValidationError

from dispatch.config import (
    FP8_DTYPES,
    KV_CACHE_DTYPES,
    Q_DTYPES,
    SIXTEEN_BIT_DTYPES,
    AttentionConfig,
    KVQuantMode,
    canonical_dtype_name,
)

BASE = dict(num_heads=8, num_kv_heads=2, head_size=64)


def expected_valid(q: str, cache: str, mode: KVQuantMode) -> bool:
    """docs/DESIGN.md's dtype rules, restated independently of dispatch.config."""
    if q in FP8_DTYPES:
        return mode is KVQuantMode.FP8_PER_TENSOR and cache == q
    if mode is KVQuantMode.NONE:
        return cache == q
    if mode in (KVQuantMode.FP8_PER_TENSOR, KVQuantMode.FP8_PER_TOKEN_HEAD):
        return cache in FP8_DTYPES
    return cache == "int8"


DTYPE_GRID = list(itertools.product(sorted(Q_DTYPES), sorted(KV_CACHE_DTYPES), list(KVQuantMode)))


@pytest.mark.parametrize("q,cache,mode", DTYPE_GRID, ids=[f"{q}-{c}-{m.value}" for q, c, m in DTYPE_GRID])
def test_dtype_and_mode_table(q, cache, mode):
    kwargs = dict(BASE, q_dtype=q, kv_cache_dtype=cache, kv_quant_mode=mode)
    if expected_valid(q, cache, mode):
        cfg = AttentionConfig(**kwargs)
        assert (cfg.q_dtype, cfg.kv_cache_dtype, cfg.kv_quant_mode) == (q, cache, mode)
        return
    with pytest.raises(ValidationError) as info:
        AttentionConfig(**kwargs)
    message = str(info.value)
    # The message names the fields involved and the values that broke the rule.
    assert "kv_quant_mode" in message or "kv_cache_dtype" in message
    assert mode.value in message or cache in message


def test_fp8_query_message_explains_the_rule():
    with pytest.raises(ValidationError) as info:
        AttentionConfig(**BASE, q_dtype="fp8", kv_cache_dtype="bf16")
    message = str(info.value)
    assert (
        "q_dtype=float8_e4m3fn requires kv_quant_mode=FP8_PER_TENSOR (got NONE): an FP8 query is only defined "
        "against a per-tensor FP8 KV cache, whose scales fold into the softmax scale"
    ) in message
    # Every broken rule is reported, not just the first.
    assert "requires kv_cache_dtype=float8_e4m3fn (got bfloat16)" in message


@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(num_heads=8, num_kv_heads=3), "num_heads=8 must be a multiple of num_kv_heads=3"),
        (dict(head_size=0), "head_size must be positive, got 0"),
        (dict(block_size=-16), "block_size must be positive, got -16"),
        (dict(num_kv_heads=0), "num_kv_heads must be positive, got 0"),
        (dict(sliding_window=0), "sliding_window must be positive or None (off), got 0"),
        (dict(logits_soft_cap=-1.0), "logits_soft_cap must be positive and finite or None (off), got -1.0"),
        (dict(logits_soft_cap=float("inf")), "logits_soft_cap must be positive and finite"),
        (dict(softmax_scale=0.0), "softmax_scale must be positive and finite"),
        (dict(q_dtype="float32"), "q_dtype=float32 not in"),
        (dict(kv_cache_dtype="float32"), "kv_cache_dtype=float32 not in"),
        (dict(out_dtype="int8"), "out_dtype=int8 not in"),
        (dict(q_dtype="float64"), "unknown dtype 'float64'"),
        (dict(kv_quant_mode="fp4"), "kv_quant_mode"),
        (dict(backend=""), "backend must be a non-empty backend name"),
        (dict(extra_field=1), "extra_field"),
    ],
)
def test_refused_values_name_the_field(changes, needle):
    with pytest.raises(ValidationError) as info:
        AttentionConfig(**dict(BASE, **changes))
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "alias,canonical",
    [
        ("bf16", "bfloat16"), ("BF16", "bfloat16"), ("fp16", "float16"), ("half", "float16"),
        ("fp8", "float8_e4m3fn"), ("e4m3", "float8_e4m3fn"), ("e5m2", "float8_e5m2"),
        ("torch.float16", "float16"), (torch.bfloat16, "bfloat16"), (torch.float8_e4m3fn, "float8_e4m3fn"),
        (torch.int8, "int8"), ("float32", "float32"),
    ],
)
def test_dtype_aliases(alias, canonical):
    assert canonical_dtype_name(alias) == canonical


def test_quant_mode_accepts_names_in_any_case():
    for text in ("fp8_per_tensor", "FP8_PER_TENSOR", "Fp8_Per_Tensor"):
        assert KVQuantMode(text) is KVQuantMode.FP8_PER_TENSOR
    cfg = AttentionConfig(**BASE, kv_cache_dtype="int8", kv_quant_mode="int8_per_token_head")
    assert cfg.kv_quant_mode is KVQuantMode.INT8_PER_TOKEN_HEAD


def test_defaults_and_derived_values():
    cfg = AttentionConfig(**BASE)
    assert cfg.q_dtype == "bfloat16" and cfg.out_dtype == "bfloat16"
    assert cfg.scale == pytest.approx(64 ** -0.5)
    assert cfg.num_queries_per_kv == 4
    fp8 = AttentionConfig(**BASE, q_dtype="fp8", kv_cache_dtype="fp8", kv_quant_mode="FP8_PER_TENSOR")
    assert fp8.out_dtype == "bfloat16"  # fp8 query: bfloat16 output unless asked otherwise
    fp16 = AttentionConfig(**BASE, q_dtype=torch.float16, kv_cache_dtype=torch.float16)
    assert fp16.out_dtype == "float16"
    assert AttentionConfig(**BASE, softmax_scale=0.5).scale == 0.5
    assert AttentionConfig(**BASE, backend=" Triton ").backend == "triton"


def test_frozen_hashable_and_round_trips():
    cfg = AttentionConfig(**BASE, q_dtype=torch.float16, kv_cache_dtype="e5m2", kv_quant_mode="FP8_PER_TENSOR",
                          sliding_window=128, logits_soft_cap=30.0)
    same = AttentionConfig(**BASE, q_dtype="fp16", kv_cache_dtype=torch.float8_e5m2,
                           kv_quant_mode=KVQuantMode.FP8_PER_TENSOR, sliding_window=128, logits_soft_cap=30.0,
                           out_dtype="float16")
    assert cfg == same and hash(cfg) == hash(same)
    assert len({cfg, same}) == 1
    with pytest.raises(ValidationError):
        cfg.head_size = 128
    data = json.loads(cfg.model_dump_json())
    assert data["q_dtype"] == "float16" and data["kv_cache_dtype"] == "float8_e5m2"
    assert data["kv_quant_mode"] == "FP8_PER_TENSOR"
    assert AttentionConfig.model_validate(data) == cfg


@pytest.mark.parametrize("q", sorted(SIXTEEN_BIT_DTYPES))
def test_none_mode_needs_the_query_dtype(q):
    other = ({"float16", "bfloat16"} - {q}).pop()
    with pytest.raises(ValidationError) as info:
        AttentionConfig(**BASE, q_dtype=q, kv_cache_dtype=other)
    assert f"kv_quant_mode=NONE requires kv_cache_dtype equal to q_dtype={q} (got kv_cache_dtype={other})" in str(
        info.value
    )


@pytest.mark.parametrize(
    "changes,field,needle",
    [
        # bool is an int in Python: pydantic's lax mode took True as 1 (a window of one token, one head).
        (dict(num_heads=True, num_kv_heads=1), "num_heads", "expected an integer, got True (bool)"),
        (dict(sliding_window=True), "sliding_window", "expected an integer number of tokens or None (off), got True"),
        (dict(sliding_window=False), "sliding_window", "got False (bool)"),
        (dict(block_size=16.0), "block_size", "expected an integer, got 16.0 (float)"),
        (dict(head_size="64"), "head_size", "expected an integer, got '64' (str)"),
        (dict(causal="yes"), "causal", "expected true or false, got 'yes' (str)"),
        (dict(causal=1), "causal", "expected true or false, got 1 (int)"),
        (dict(use_alibi="false"), "use_alibi", "expected true or false, got 'false' (str)"),
        (dict(use_sinks=0), "use_sinks", "expected true or false, got 0 (int)"),
        (dict(logits_soft_cap=True), "logits_soft_cap", "expected a number or None (off), got True (bool)"),
        (dict(softmax_scale="0.125"), "softmax_scale", "expected a number or None"),
        (dict(kv_quant_mode=1), "kv_quant_mode", "kv_quant_mode"),
    ],
)
def test_no_surprising_coercions(changes, field, needle):
    with pytest.raises(ValidationError) as info:
        AttentionConfig(**dict(BASE, **changes))
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(field,)], errors
    assert needle in str(info.value)


def test_plain_numbers_still_load():
    """What JSON, TOML and YAML give for these fields (and numpy scalars) is accepted unchanged."""
    import numpy as np

    cfg = AttentionConfig(num_heads=np.int64(8), num_kv_heads=2, head_size=64, sliding_window=128,
                          logits_soft_cap=30, softmax_scale=np.float32(0.125), causal=False, use_alibi=True)
    assert (cfg.num_heads, type(cfg.num_heads)) == (8, int)
    assert cfg.logits_soft_cap == 30.0 and cfg.softmax_scale == 0.125 and cfg.sliding_window == 128
    data = json.loads(cfg.model_dump_json())
    assert AttentionConfig.model_validate_json(json.dumps(data)) == cfg
