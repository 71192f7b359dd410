"""Serving-engine readiness: bad input gives clear errors, threads, torch.compile, CUDA graphs, no syncs."""

from __future__ import annotations

import concurrent.futures
import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dispatch
from dispatch import AttentionConfig, InputError
from dispatch.testing import make_inputs

CONFIGS = [
    AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, q_dtype="fp8", kv_cache_dtype="fp8",
                    kv_quant_mode="FP8_PER_TENSOR", backend="sdpa"),
    AttentionConfig(num_heads=4, num_kv_heads=1, head_size=16, q_dtype="fp16", kv_cache_dtype="int8",
                    kv_quant_mode="INT8_PER_TOKEN_HEAD", backend="sdpa", use_alibi=True, use_sinks=True),
    AttentionConfig(num_heads=2, num_kv_heads=2, head_size=16, q_dtype="bf16", kv_cache_dtype="bf16",
                    backend="sdpa", out_dtype="fp8", block_size=32),
]
ARGS = ["q", "key_cache", "value_cache", "cu_seqlens_q", "seq_lens", "block_table"]


def _valid(config, q_lens=(1, 3, 2), kv_lens=(5, 40, 2)):
    inputs = make_inputs(config, list(q_lens), list(kv_lens), poison=False)
    return dict(zip(ARGS, inputs.args)), dict(inputs.kwargs)


def _first_scale(kwargs):
    return next(iter(sorted(k for k in kwargs if k.endswith("scale"))), None)


# Each mutation: (argument it breaks, needs debug mode, function (args, kwargs, config) -> None editing in place).
def _drop_head(a, k, c):
    a["q"] = a["q"][:, :-1]


def _q_dtype(a, k, c):
    a["q"] = a["q"].to(torch.float32)


def _cache_device(a, k, c):
    a["value_cache"] = a["value_cache"].to("meta")


def _q_noncontiguous(a, k, c):
    a["q"] = torch.cat([a["q"], a["q"]], dim=-1)[..., ::2]


def _cache_dtype(a, k, c):
    a["value_cache"] = a["value_cache"].to(torch.float32)


def _cache_block_size(a, k, c):
    a["key_cache"] = torch.cat([a["key_cache"], a["key_cache"]], dim=1)


def _seq_lens_dtype(a, k, c):
    a["seq_lens"] = a["seq_lens"].to(torch.int64)


def _cu_length(a, k, c):
    a["cu_seqlens_q"] = a["cu_seqlens_q"][:-1]


def _table_rows(a, k, c):
    a["block_table"] = a["block_table"][:-1]


def _table_device(a, k, c):
    a["block_table"] = a["block_table"].to("meta")


def _missing_scale(a, k, c):
    name = _first_scale(k) or "k_scale_cache"
    k.pop(name, None)
    return name


def _unneeded_scale(a, k, c):
    name = "k_scale_cache" if "k_scale" in k else "k_scale"
    k[name] = torch.ones(a["key_cache"].shape[:3]) if name == "k_scale_cache" else torch.ones(1)
    return name


def _scale_size(a, k, c):
    name = _first_scale(k)
    if name is None:
        name = "k_scale_cache" if "k_scale_cache" in k else "alibi_slopes"
    k[name] = torch.ones(3) if name != "k_scale_cache" else torch.ones(2, 2, 2)
    return name


def _out_shape(a, k, c):
    k["out"] = torch.empty(a["q"].shape[0] + 1, c.num_heads, c.head_size, dtype=c.out_torch_dtype)


def _out_dtype(a, k, c):
    k["out"] = torch.empty(a["q"].shape[0], c.num_heads, c.head_size, dtype=torch.float64)


def _out_alias(a, k, c):
    """out and q carved from one byte buffer, so they overlap whatever their dtypes."""
    q = a["q"]
    count = q.numel()
    buffer = torch.empty(count * 4, dtype=torch.uint8)
    a["q"] = buffer[: count * q.element_size()].view(q.dtype).view(q.shape)
    a["q"].copy_(q)
    out_size = torch.empty(0, dtype=c.out_torch_dtype).element_size()
    k["out"] = buffer[: count * out_size].view(c.out_torch_dtype).view(q.shape)
    return "out"


def _cu_not_increasing(a, k, c):
    cu = a["cu_seqlens_q"].clone()
    cu[1] = cu[2] + 1  # sequence 1 would have a negative length
    a["cu_seqlens_q"] = cu


def _negative_len(a, k, c):
    lens = a["seq_lens"].clone()
    lens[0] = -3
    a["seq_lens"] = lens


def _q_longer_than_kv(a, k, c):
    lens = a["seq_lens"].clone()
    lens[1] = 1
    a["seq_lens"] = lens


def _table_too_narrow(a, k, c):
    a["block_table"] = a["block_table"][:, :1].contiguous()


def _page_out_of_range(a, k, c):
    table = a["block_table"].clone()
    table[1, 0] = a["key_cache"].shape[0] + 7
    a["block_table"] = table


MUTATIONS = {
    "drop_head": ("q", False, _drop_head),
    "q_dtype": ("q", False, _q_dtype),
    "cache_device": ("value_cache", False, _cache_device),
    "q_noncontiguous": ("q", False, _q_noncontiguous),
    "cache_dtype": ("value_cache", False, _cache_dtype),
    "cache_block_size": ("key_cache", False, _cache_block_size),
    "seq_lens_dtype": ("seq_lens", False, _seq_lens_dtype),
    "cu_length": ("cu_seqlens_q", False, _cu_length),
    "table_rows": ("block_table", False, _table_rows),
    "table_device": ("block_table", False, _table_device),
    "missing_scale": (None, False, _missing_scale),
    "unneeded_scale": (None, False, _unneeded_scale),
    "scale_size": (None, False, _scale_size),
    "out_shape": ("out", False, _out_shape),
    "out_dtype": ("out", False, _out_dtype),
    "out_alias": ("out", False, _out_alias),
    "cu_not_increasing": ("cu_seqlens_q", True, _cu_not_increasing),
    "negative_len": ("seq_lens", True, _negative_len),
    "q_longer_than_kv": ("seq_lens", True, _q_longer_than_kv),
    "table_too_narrow": ("block_table", True, _table_too_narrow),
    "page_out_of_range": ("block_table", True, _page_out_of_range),
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_index=st.integers(0, len(CONFIGS) - 1), mutation=st.sampled_from(sorted(MUTATIONS)))
def test_one_thing_wrong_gives_a_value_error_naming_it(config_index, mutation):
    config = CONFIGS[config_index]
    args, kwargs = _valid(config)
    name, needs_debug, mutate = MUTATIONS[mutation]
    returned = mutate(args, kwargs, config)
    name = name or returned
    with pytest.raises(ValueError) as info:
        dispatch.attention(*args.values(), config=config, validate=needs_debug, **kwargs)
    assert isinstance(info.value, InputError)
    assert str(info.value).startswith(f"{name}:"), f"{mutation}: message does not start with {name!r}: {info.value}"


def test_value_checks_run_only_in_debug_mode():
    config = CONFIGS[2]
    args, kwargs = _valid(config)
    _page_out_of_range(args, kwargs, config)
    # Without debug mode no host read happens (and the sdpa backend then indexes out of range itself).
    with pytest.raises(InputError, match=r"block_table: sequence 1, column 0: page id \d+ not in \[0, \d+\)"):
        dispatch.attention(*args.values(), config=config, validate=True, **kwargs)


def test_debug_mode_from_the_environment(monkeypatch):
    import dispatch.api

    monkeypatch.setattr(dispatch.api, "DEBUG", True)
    config = CONFIGS[2]
    args, kwargs = _valid(config)
    _negative_len(args, kwargs, config)
    with pytest.raises(InputError, match="seq_lens: sequence 0 has kv_len=-3"):
        dispatch.attention(*args.values(), config=config, **kwargs)


def _concurrent_matches_serial(configs, device):
    cases = []
    for c in configs:
        inputs = make_inputs(c, [2, 1], [9, 30], poison=False, device=device)
        cases.append((c, (dict(zip(ARGS, inputs.args)), dict(inputs.kwargs))))
    dispatch.clear_cache()
    serial = [(dispatch.select(c, device).name, dispatch.attention(*a.values(), config=c, **k))
              for c, (a, k) in cases]

    def work(i):
        c, (a, k) = cases[i % len(cases)]
        return i % len(cases), dispatch.select(c, device).name, dispatch.attention(*a.values(), config=c, **k)

    dispatch.clear_cache()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(4 * len(cases))))
    for index, name, out in results:
        assert name == serial[index][0]
        assert torch.equal(out.view(torch.uint8), serial[index][1].view(torch.uint8))


def test_concurrent_calls_match_serial_calls():
    # sdpa only on the CPU: Triton's interpreter patches triton.language globally while a kernel
    # runs, so it cannot run two kernels at once (compiled kernels on a GPU can; see the gpu test).
    _concurrent_matches_serial([c.model_copy(update={"backend": "sdpa", "num_heads": h})
                                for c in CONFIGS for h in (c.num_heads, 2 * c.num_heads)], "cpu")


@pytest.mark.gpu
def test_concurrent_calls_match_serial_calls_on_gpu():
    configs = [AttentionConfig(num_heads=8, num_kv_heads=2, head_size=128, q_dtype=q, kv_cache_dtype=kv,
                               kv_quant_mode=mode, backend=backend)
               for q, kv, mode in (("bf16", "bf16", "NONE"), ("fp8", "fp8", "FP8_PER_TENSOR"))
               for backend in ("auto", "triton", "sdpa")]
    _concurrent_matches_serial(configs, "cuda")


def test_choice_is_logged_once_per_config_not_per_call(caplog):
    config = CONFIGS[1].model_copy(update={"backend": "auto", "head_size": 24})
    args, kwargs = _valid(config)
    with caplog.at_level(logging.INFO, logger="dispatch"):
        for _ in range(5):
            dispatch.attention(*args.values(), config=config, **kwargs)
    assert len([r for r in caplog.records if r.name == "dispatch"]) == 1


def test_torch_compile_fullgraph_matches_eager():
    config = CONFIGS[1]
    args, kwargs = _valid(config)
    proj = torch.nn.Linear(config.head_size, config.head_size).half()

    def layer(x):
        q = proj(x)
        out = dispatch.attention(q, *list(args.values())[1:], config=config, **kwargs)
        return out.float().sum(-1)

    x = args["q"].clone()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))


def test_torch_compile_guards_on_the_config():
    """The config is a compile-time constant guarded by equality: a different config passed to the
    same compiled function retraces and gives its own result, never the first config's."""
    base = CONFIGS[1]
    args, kwargs = _valid(base)
    other = base.model_copy(update={"softmax_scale": 0.5})

    def layer(q, config):
        return dispatch.attention(q, *list(args.values())[1:], config=config, **kwargs)

    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for config in (base, other, base):
            assert torch.equal(compiled(args["q"], config), layer(args["q"], config))
        assert not torch.equal(compiled(args["q"], base), compiled(args["q"], other))


def _gpu_inputs(config, q_lens, kv_lens):
    inputs = make_inputs(config, q_lens, kv_lens, device="cuda", poison=False)
    return dict(zip(ARGS, inputs.args)), dict(inputs.kwargs)


def _gpu_backends():
    config = AttentionConfig(num_heads=8, num_kv_heads=2, head_size=128, q_dtype="bf16", kv_cache_dtype="bf16")
    return [r.name for r in dispatch.explain(config, "cuda").backends if r.supported]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash_attn", "sdpa"])
def test_no_host_sync_in_the_call(backend):
    config = AttentionConfig(num_heads=8, num_kv_heads=2, head_size=128, q_dtype="bf16", kv_cache_dtype="bf16",
                             backend=backend)
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} not available here")
    plan = dispatch.select(config, "cuda")
    args, kwargs = _gpu_inputs(config, [1, 7, 1], [100, 40, 17])
    dispatch.attention(*args.values(), config=config, **kwargs)  # warm: compile, select, cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if plan.capability.cuda_graph_safe:
            dispatch.attention(*args.values(), config=config, **kwargs)
        else:
            # Declared not graph safe (it reads lengths on the host): the sync must really be there,
            # i.e. the declaration is true.
            with pytest.raises(RuntimeError, match="synchroniz"):
                dispatch.attention(*args.values(), config=config, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash_attn"])
@pytest.mark.parametrize("step", ["decode", "mixed"])
def test_cuda_graph_capture_and_replay(backend, step):
    config = AttentionConfig(num_heads=8, num_kv_heads=2, head_size=128, q_dtype="bf16", kv_cache_dtype="bf16",
                             backend=backend)
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} not available here")
    q_lens, kv_lens = ([1, 1, 1], [300, 17, 64]) if step == "decode" else ([1, 33, 1], [300, 40, 64])
    args, kwargs = _gpu_inputs(config, q_lens, kv_lens)
    static = {name: t.clone() for name, t in args.items()}
    out = dispatch.attention(*static.values(), config=config, **kwargs)  # warm up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dispatch.attention(*static.values(), config=config, **kwargs)
    # New values written into the captured buffers: other q, k, v, and shorter sequences.
    fresh = make_inputs(config, q_lens, kv_lens, device="cuda", poison=False, seed=1)
    for name, tensor in zip(("q", "key_cache", "value_cache"), fresh.args):
        static[name].copy_(tensor)
    static["seq_lens"].copy_(torch.tensor([k - 5 for k in kv_lens], dtype=torch.int32))
    graph.replay()
    eager = dispatch.attention(*static.values(), config=config, **kwargs)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash_attn", "sdpa"])
def test_torch_compile_fullgraph_on_gpu(backend):
    config = AttentionConfig(num_heads=8, num_kv_heads=2, head_size=128, q_dtype="bf16", kv_cache_dtype="bf16",
                             backend=backend)
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} not available here")
    args, kwargs = _gpu_inputs(config, [1, 7, 1], [100, 40, 17])
    proj = torch.nn.Linear(config.head_size, config.head_size, device="cuda", dtype=torch.bfloat16)

    def layer(x):
        out = dispatch.attention(proj(x), *list(args.values())[1:], config=config, **kwargs)
        return out.float().sum(-1)

    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(args["q"]), layer(args["q"]))


@pytest.mark.parametrize("backend", ["triton", "dequant"])
def test_concurrent_cpu_calls_through_the_interpreter_are_safe(backend):
    """Triton's interpreter is not thread-safe (4 threads raised InterpreterError): interpreted launches are
    serialized (backends/interpreter_lock.py), so 4 threads give the serial results bit for bit."""
    fields = dict(q_dtype="fp16", kv_cache_dtype="fp16") if backend == "triton" else dict(
        q_dtype="fp16", kv_cache_dtype="fp8", kv_quant_mode="FP8_PER_TENSOR")
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, backend=backend, **fields)
    if not dispatch.explain(config, "cpu").report(backend).supported:
        pytest.skip(f"{backend} cannot run on this CPU")
    inputs = [make_inputs(config, [3, 1], [20, 9], seed=seed) for seed in range(4)]
    serial = [dispatch.attention(*i.args, config=config, **i.kwargs) for i in inputs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: dispatch.attention(*i.args, config=config, **i.kwargs), inputs * 2))
    for index, out in enumerate(results):
        assert torch.equal(out, serial[index % 4])
