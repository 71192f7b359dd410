"""dispatch.attention's argument checks: each names the argument, the expected and the received."""

import inspect
import re

import pytest
import torch

import dispatch
from dispatch import AttentionConfig, InputError, UnsupportedConfigError, contract
from tests.cases import make_inputs

FP8 = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, q_dtype="fp8", kv_cache_dtype="fp8",
                      kv_quant_mode="FP8_PER_TENSOR", backend="sdpa")
PER_TOKEN = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, q_dtype="fp16", kv_cache_dtype="int8",
                            kv_quant_mode="INT8_PER_TOKEN_HEAD", backend="sdpa", use_alibi=True)
PLAIN = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, q_dtype="fp16", kv_cache_dtype="fp16",
                        backend="sdpa")


def call(config, inputs, **changes):
    args = dict(zip(["q", "key_cache", "value_cache", "cu_seqlens_q", "seq_lens", "block_table"], inputs.args))
    kwargs = dict(inputs.kwargs)
    for name, value in changes.items():
        if name in args:
            args[name] = value
        else:
            kwargs[name] = value
    return dispatch.attention(*args.values(), config=config, **kwargs)


@pytest.fixture(scope="module")
def fp8_inputs():
    return make_inputs(FP8, [1, 3], [5, 20])


@pytest.fixture(scope="module")
def per_token_inputs():
    return make_inputs(PER_TOKEN, [1, 3], [5, 20])


@pytest.fixture(scope="module")
def plain_inputs():
    return make_inputs(PLAIN, [1, 3], [5, 20])


def test_valid_calls_run(fp8_inputs, per_token_inputs, plain_inputs):
    for config, inputs in ((FP8, fp8_inputs), (PER_TOKEN, per_token_inputs), (PLAIN, plain_inputs)):
        assert call(config, inputs).shape == (4, 4, 32)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda i: dict(q_scale=None), "q_scale: required for q_dtype=float8_e4m3fn, got None"),
        (lambda i: dict(k_scale=None), "k_scale: required for kv_quant_mode=FP8_PER_TENSOR, got None"),
        (lambda i: dict(v_scale=None), "v_scale: required for kv_quant_mode=FP8_PER_TENSOR, got None"),
        (lambda i: dict(k_scale=torch.ones(2)), "k_scale: expected one element (a per-tensor scale) for "
                                                "kv_quant_mode=FP8_PER_TENSOR, got shape (2,)"),
        (lambda i: dict(v_scale=torch.ones(1, dtype=torch.float16)), "v_scale: expected dtype torch.float32"),
        (lambda i: dict(k_scale_cache=torch.ones(i.key_cache.shape[:3])),
         "k_scale_cache: must be None for kv_quant_mode=FP8_PER_TENSOR, got torch.float32 tensor"),
        (lambda i: dict(q=i.q.to(torch.bfloat16)), "q: expected dtype torch.float8_e4m3fn"),
        (lambda i: dict(q=i.q[:, :2]), "q: expected shape [*, 4, 32]"),
        (lambda i: dict(key_cache=i.key_cache[:, :8]), "key_cache: expected shape [*, 16, 2, 32]"),
        (lambda i: dict(value_cache=i.value_cache[:-1]), "value_cache: expected shape"),
        (lambda i: dict(value_cache=i.value_cache.to(torch.float16)), "value_cache: expected dtype"),
        (lambda i: dict(seq_lens=i.seq_lens.long()), "seq_lens: expected dtype torch.int32"),
        (lambda i: dict(cu_seqlens_q=i.cu_seqlens_q[:2]), "cu_seqlens_q: expected shape [3]"),
        (lambda i: dict(block_table=i.block_table[:1]), "block_table: expected shape [2, *]"),
        (lambda i: dict(block_table=i.block_table[:, :0]), "block_table: expected at least one page"),
        (lambda i: dict(block_table=i.block_table.t().contiguous().t()), "block_table: expected a contiguous last"),
        (lambda i: dict(alibi_slopes=torch.ones(4)), "alibi_slopes: must be None for use_alibi=False"),
        (lambda i: dict(sinks=torch.ones(4)), "sinks: must be None for use_sinks=False"),
        (lambda i: dict(output_scale=torch.ones(1)), "output_scale: must be None for out_dtype=bfloat16"),
        (lambda i: dict(out=torch.empty(4, 4, 32, dtype=torch.float16)), "out: expected dtype torch.bfloat16"),
        (lambda i: dict(out=torch.empty(3, 4, 32, dtype=torch.bfloat16)), "out: expected shape [4, 4, 32]"),
        (lambda i: dict(key_cache=[1, 2]), "key_cache: expected a torch.float8_e4m3fn tensor"),
    ],
)
def test_fp8_call_errors(fp8_inputs, change, message):
    with pytest.raises(InputError) as info:
        call(FP8, fp8_inputs, **change(fp8_inputs))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda i: dict(k_scale_cache=None), "k_scale_cache: required for kv_quant_mode=INT8_PER_TOKEN_HEAD, got None"),
        (lambda i: dict(v_scale_cache=i.kwargs["v_scale_cache"][:, :4]),
         "v_scale_cache: expected shape [{}, 16, 2]"),
        (lambda i: dict(k_scale=torch.ones(1)), "k_scale: must be None for kv_quant_mode=INT8_PER_TOKEN_HEAD"),
        (lambda i: dict(q_scale=torch.ones(1)), "q_scale: must be None for q_dtype=float16 (only an fp8 query"),
        (lambda i: dict(alibi_slopes=None), "alibi_slopes: required for use_alibi=True, got None"),
        (lambda i: dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), "alibi_slopes: expected dtype torch.float32"),
        (lambda i: dict(key_cache=i.key_cache[:0], value_cache=i.value_cache[:0]),
         "key_cache: expected at least one page (num_blocks >= 1)"),
        (lambda i: dict(alibi_slopes=torch.ones(3)), "alibi_slopes: expected shape [4]"),
    ],
)
def test_per_token_head_call_errors(per_token_inputs, change, message):
    num_blocks = per_token_inputs.key_cache.shape[0]
    with pytest.raises(InputError) as info:
        call(PER_TOKEN, per_token_inputs, **change(per_token_inputs))
    assert message.format(num_blocks) in str(info.value)


def test_out_must_not_alias_an_input(plain_inputs):
    with pytest.raises(InputError, match="out: must not share memory with q"):
        call(PLAIN, plain_inputs, out=plain_inputs.q)


def test_valid_calls_take_the_fast_path(monkeypatch, fp8_inputs, per_token_inputs, plain_inputs):
    """The per-call cost depends on valid calls never reaching the slow, message-producing checks."""
    def slow_checks(*args, **kwargs):
        raise AssertionError("check_inputs ran for a valid call")

    monkeypatch.setattr(dispatch.api, "check_inputs", slow_checks)
    for config, inputs in ((FP8, fp8_inputs), (PER_TOKEN, per_token_inputs), (PLAIN, plain_inputs)):
        out = torch.empty(inputs.q.shape, dtype=config.out_torch_dtype)
        assert call(config, inputs, out=out) is out


@pytest.mark.parametrize("out_first", [False, True])
def test_out_overlap_is_exact_at_the_byte_boundaries(plain_inputs, out_first):
    """out right next to key_cache (after or before it) is fine; one element closer, it overlaps."""
    key_cache, count = plain_inputs.key_cache, plain_inputs.q.numel()
    size = key_cache.numel()
    buffer = torch.empty(size + count + 1, dtype=key_cache.dtype)
    cache_at, out_at, closer = (count + 1, 1, 2) if out_first else (0, size, size - 1)
    cache = buffer[cache_at:cache_at + size].view(key_cache.shape)
    cache.copy_(key_cache)
    out = buffer[out_at:out_at + count].view(plain_inputs.q.shape)
    assert call(PLAIN, plain_inputs, key_cache=cache, out=out) is out
    overlapping = buffer[closer:closer + count].view(plain_inputs.q.shape)
    with pytest.raises(InputError, match="out: must not share memory with key_cache"):
        call(PLAIN, plain_inputs, key_cache=cache, out=overlapping)


def test_the_plan_follows_use_scopes_on_one_config(plain_inputs):
    """attention() remembers the last plan per config; a use() scope (or leaving one) must still switch it."""
    sdpa = dispatch.select(PLAIN, "cpu").capability
    for name in ("scope_a", "scope_b"):
        dispatch.register_backend(name, capability=sdpa, forward=lambda *a, _name=name, **k: _name)
    auto = PLAIN.model_copy(update={"backend": "auto"})
    try:
        outside = call(auto, plain_inputs)
        for name in ("scope_a", "scope_b", "scope_a"):  # each scope is a new Override object
            with dispatch.use(backend=name):
                assert call(auto, plain_inputs) == name
                assert call(auto, plain_inputs) == name
        assert torch.equal(call(auto, plain_inputs), outside)
    finally:
        dispatch.unregister_backend("scope_a")
        dispatch.unregister_backend("scope_b")


def test_device_mismatch_is_named(plain_inputs):
    meta = plain_inputs.seq_lens.to("meta")
    with pytest.raises(InputError, match=r"seq_lens: expected a tensor on cpu \(the device of q\), got one on meta"):
        call(PLAIN, plain_inputs, seq_lens=meta)


def test_config_must_be_an_attention_config(plain_inputs):
    with pytest.raises(InputError, match="config: expected an AttentionConfig, got dict"):
        dispatch.attention(*plain_inputs.args, config={"num_heads": 4})


def test_refusal_from_a_named_backend_reaches_the_caller(plain_inputs):
    dispatch.register_backend("narrow_fake", capability=dispatch.Capability(
        description="refuses fp16", q_dtypes=frozenset({"bfloat16"}), kv_cache_dtypes=frozenset({"bfloat16"}),
        out_dtypes=frozenset({"bfloat16"}), kv_quant_modes=frozenset({dispatch.KVQuantMode.NONE}),
        devices=frozenset({"cpu"})), forward=lambda *a, **k: None)
    try:
        with pytest.raises(UnsupportedConfigError, match="q_dtype='float16' not in"):
            call(PLAIN.model_copy(update={"backend": "narrow_fake"}), plain_inputs)
    finally:
        dispatch.unregister_backend("narrow_fake")


def test_signature_matches_the_design_contract():
    params = inspect.signature(dispatch.attention).parameters
    assert list(params)[:6] == ["q", "key_cache", "value_cache", "cu_seqlens_q", "seq_lens", "block_table"]
    assert tuple(list(params)[:6]) == contract.POSITIONAL
    keyword_only = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == ["config", *contract.KEYWORDS, "max_query_len", "validate"]
    assert keyword_only[1:11] == ["q_scale", "k_scale", "v_scale", "k_scale_cache", "v_scale_cache",
                                  "alibi_slopes", "sinks", "output_scale", "out", "max_query_len"]
    assert all(params[n].default is None for n in keyword_only[1:])
    doc = dispatch.attention.__doc__
    for name in params:
        assert f"        {name}: " in doc, f"{name} undocumented"
    for argument in contract.ARGUMENTS:  # the Args entries come from the contract table
        assert f"{argument.name}: " in doc and argument.doc[1:] in doc


def test_scale_caches_may_be_strided_views(per_token_inputs):
    """vLLM's per-token-head scale caches are as_strided views: they run on the fast path, unchanged."""
    expected = call(PER_TOKEN, per_token_inputs)
    views = {}
    for name in ("k_scale_cache", "v_scale_cache"):
        scales = per_token_inputs.kwargs[name]
        wide = torch.full((*scales.shape, 3), float("nan"))
        wide[..., 1] = scales
        views[name] = wide[..., 1]  # strides (.., 3): not contiguous
        assert not views[name].is_contiguous()
    spec = dispatch.api._spec_for(PER_TOKEN)
    values = dict(zip(dispatch.api._NAMES, [*per_token_inputs.args] + [None] * 9))
    values.update(per_token_inputs.kwargs, **views)
    assert spec.fast_check(*values.values()) is not None
    assert torch.equal(call(PER_TOKEN, per_token_inputs, **views), expected)


@pytest.mark.parametrize("scale_name,value,message", [
    ("k_scale", float("inf"), "k_scale: expected a finite, positive scale, got inf"),
    ("v_scale", float("nan"), "v_scale: expected a finite, positive scale, got nan"),
    ("q_scale", 0.0, "q_scale: expected a finite, positive scale, got 0.0"),
    ("k_scale", -0.5, "k_scale: expected a finite, positive scale, got -0.5"),
])
def test_debug_mode_refuses_bad_scale_values(fp8_inputs, scale_name, value, message):
    """Without validate, k_scale=inf gives all-NaN output and output_scale=0 saturates: debug mode names them."""
    with pytest.raises(InputError, match=re.escape(message)):
        call(FP8, fp8_inputs, validate=True, **{scale_name: torch.tensor([value])})


def test_debug_mode_refuses_an_fp8_output_scale_of_zero():
    config = PLAIN.model_copy(update={"out_dtype": "float8_e4m3fn"})
    inputs = make_inputs(config, [1, 3], [5, 20])
    with pytest.raises(InputError, match="output_scale: expected a finite, positive scale, got 0.0"):
        call(config, inputs, validate=True, output_scale=torch.zeros(1))


def test_debug_mode_refuses_non_finite_scales_in_the_slots_a_call_reads(per_token_inputs):
    scales = per_token_inputs.kwargs["v_scale_cache"].clone()
    table, lens = per_token_inputs.block_table, per_token_inputs.seq_lens
    page = int(table[1, 0])  # the first page of sequence 1 is read
    scales[page, 3, 1] = float("inf")
    with pytest.raises(InputError, match=r"v_scale_cache: sequence 1, token 3, KV head 1: expected a finite scale"):
        call(PER_TOKEN, per_token_inputs, validate=True, v_scale_cache=scales)
    # The same value in a slot no sequence reads (the unused tail of a last page) is no error.
    clean = per_token_inputs.kwargs["v_scale_cache"].clone()
    last_page, used = int(table[0, 0]), int(lens[0])  # sequence 0 reads 5 slots of its only page
    clean[last_page, used + 1, 0] = float("inf")
    call(PER_TOKEN, per_token_inputs, validate=True, v_scale_cache=clean)


def test_max_query_len_hint_is_checked_in_debug_mode(plain_inputs):
    with pytest.raises(InputError, match=r"max_query_len: 2 is below the longest query of the call \(3 tokens\)"):
        call(PLAIN, plain_inputs, validate=True, max_query_len=2)
    call(PLAIN, plain_inputs, validate=True, max_query_len=3)
