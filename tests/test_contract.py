"""The call contract (dispatch/contract.py) is the one place the argument list lives, and every backend keeps it.

- every registered backend's ``forward`` takes exactly the contract's arguments, as the contract orders them;
- every backend that can run here uses every argument the contract declares: changing a scale (or
  ALiBi slopes, or sinks) changes its output exactly as the float64 oracle says, so a backend that
  drops one fails here (GPU backends run the same test on the GPU machine);
- the generated fast check never accepts a call the full check refuses.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import dispatch
from dispatch import AttentionConfig, contract, registry
from dispatch.errors import InputError
from tests.cases import assert_close_to_oracle, make_inputs, output_as_real, tolerance
from tests.oracle import reference_attention

HAS_CUDA = torch.cuda.is_available()


def test_the_contract_rows_are_the_attention_signature():
    assert contract.POSITIONAL == ("q", "key_cache", "value_cache", "cu_seqlens_q", "seq_lens", "block_table")
    assert contract.KEYWORDS == ("q_scale", "k_scale", "v_scale", "k_scale_cache", "v_scale_cache", "alibi_slopes",
                                 "sinks", "output_scale", "out")


@pytest.mark.parametrize("name", registry.backend_names())
def test_every_backend_forward_takes_exactly_the_contract(name):
    entry = registry.get_backend(name)
    if isinstance(entry, str):
        pytest.skip(f"{name}: {entry}")
    params = inspect.signature(entry.forward).parameters
    positional = [n for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword_only = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert tuple(positional) == contract.POSITIONAL, f"{name}.forward positional arguments"
    assert keyword_only == ["config", *contract.KEYWORDS], f"{name}.forward keywords"
    assert all(params[n].default is None for n in contract.KEYWORDS), f"{name}.forward: keywords default to None"


def test_a_forward_missing_a_declared_argument_is_caught():
    """The check above is not vacuous: a forward without `sinks` breaks it."""
    def forward(q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, *, config, q_scale=None,
                k_scale=None, v_scale=None, k_scale_cache=None, v_scale_cache=None, alibi_slopes=None,
                output_scale=None, out=None):
        return out

    sdpa = dispatch.select(AttentionConfig(num_heads=1, num_kv_heads=1, head_size=8, q_dtype="fp16",
                                           kv_cache_dtype="fp16", backend="sdpa"), "cpu").capability
    dispatch.register_backend("no_sinks", capability=sdpa, forward=forward)
    try:
        with pytest.raises(AssertionError, match="keywords"):
            test_every_backend_forward_takes_exactly_the_contract("no_sinks")
    finally:
        dispatch.unregister_backend("no_sinks")


# ---- every declared argument is used ---------------------------------------------------------------------------

# For each argument the contract makes conditional: a config that needs it, and a change of its value that
# changes the true output.
_FP16 = dict(q_dtype="float16", kv_cache_dtype="float16")
USES = {
    "q_scale": (dict(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
                lambda t: t * 2),
    "k_scale": (dict(q_dtype="float16", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
                lambda t: t * 3),
    "v_scale": (dict(q_dtype="float16", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
                lambda t: t * 3),
    "k_scale_cache": (dict(q_dtype="float16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD"),
                      lambda t: t * torch.linspace(0.5, 4, t.numel()).reshape(t.shape)),
    "v_scale_cache": (dict(q_dtype="float16", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TOKEN_HEAD"),
                      lambda t: t * torch.linspace(0.5, 4, t.numel()).reshape(t.shape)),
    "alibi_slopes": (dict(_FP16, use_alibi=True), lambda t: t.flip(0) * 2),
    "sinks": (dict(_FP16, use_sinks=True), lambda t: t + torch.linspace(-1, 3, t.numel())),
    "output_scale": (dict(_FP16, out_dtype="float8_e4m3fn"), lambda t: t * 4),
}


def test_every_conditional_argument_has_a_use_case():
    conditional = [a.name for a in contract.ARGUMENTS if a.presence is contract.Presence.WHEN]
    assert sorted(conditional) == sorted(USES)


def _use_cases(device: str):
    for backend in registry.backend_names():
        for argument in USES:
            yield pytest.param(backend, argument, device, id=f"{backend}-{argument}")


def _check_argument_is_used(backend: str, argument: str, device: str) -> None:
    fields, change = USES[argument]
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, backend=backend, **fields)
    report = dispatch.explain(config, device).report(backend)
    if not report.supported:
        pytest.skip(f"{backend} cannot run this config on {device}: {'; '.join(report.reasons)}")
    inputs = make_inputs(config, [1, 5, 17], [9, 17, 40], device=device, seed=7)
    changed = dict(inputs.kwargs)
    changed[argument] = change(inputs.kwargs[argument].cpu()).to(inputs.kwargs[argument].device)
    # The arithmetic the backend declares: an fp8 query's P is rounded to fp8_query_p_dtype (fp16 in the
    # Triton kernel) before P V, else the work is in fp32; a 16-bit query computes in its own dtype.
    p_dtype = registry.get_backend(backend).capability.fp8_query_p_dtype if config.q_is_fp8 else None
    compute = (getattr(torch, p_dtype) if p_dtype else torch.float32) if config.q_is_fp8 else config.q_torch_dtype
    atol, rtol = tolerance(config, compute, roundings=16)
    outputs = []
    for kwargs in (inputs.kwargs, changed):
        out = dispatch.attention(*inputs.args, config=config, **kwargs)
        ref = reference_attention(*[t.cpu() for t in inputs.args],
                                  **{k: v.cpu() for k, v in kwargs.items() if k != "output_scale"},
                                  causal=config.causal, softmax_scale=config.softmax_scale)
        real = output_as_real(out, config, type(inputs)(*inputs.args, kwargs=kwargs)).cpu()
        assert_close_to_oracle(real, ref, atol=atol, rtol=rtol, label=f"{backend} with {argument} "
                               f"{'changed' if kwargs is changed else 'as given'}")
        outputs.append(out.float().cpu())
    # The stored output moved (for output_scale the real value stays and the stored one scales), and each
    # matched the oracle of its own arguments above.
    assert not torch.allclose(outputs[0], outputs[1], atol=10 * atol, rtol=0), f"{argument} made no difference"


@pytest.mark.parametrize("backend,argument,device", list(_use_cases("cpu")))
def test_every_backend_uses_every_declared_argument_cpu(backend, argument, device):
    _check_argument_is_used(backend, argument, device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,argument,device", list(_use_cases("cuda")))
def test_every_backend_uses_every_declared_argument_gpu(backend, argument, device):
    _check_argument_is_used(backend, argument, device)


def test_a_backend_that_drops_a_scale_fails_the_use_test():
    """A copy of sdpa that ignores v_scale (the failure this project exists to prevent) is caught."""
    sdpa = registry.get_backend("sdpa")

    def dropping(*args, v_scale=None, **kwargs):
        return sdpa.forward(*args, v_scale=torch.ones_like(v_scale) * 0.25, **kwargs)

    dispatch.register_backend("drops_v_scale", capability=sdpa.capability, forward=dropping)
    try:
        with pytest.raises(AssertionError):
            _check_argument_is_used("drops_v_scale", "v_scale", "cpu")
    finally:
        dispatch.unregister_backend("drops_v_scale")


# ---- the fast check agrees with the full check -----------------------------------------------------------------

CONFIGS = [
    AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, backend="sdpa", **_FP16),
    AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, backend="sdpa", **USES["q_scale"][0]),
    AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, backend="sdpa", use_alibi=True, use_sinks=True,
                    **USES["k_scale_cache"][0]),
    AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, backend="sdpa", out_dtype="float8_e4m3fn", **_FP16),
]


def _mutations(inputs):
    """Calls that break the contract one way each (and a few that keep it)."""
    values = dict(zip([a.name for a in contract.ARGUMENTS], [*inputs.args] + [None] * 9))
    values.update(inputs.kwargs)
    yield "valid", dict(values)
    for name in contract.POSITIONAL:
        t = values[name]
        yield f"{name} dtype", dict(values, **{name: t.to(torch.float64)})
        yield f"{name} extra dim", dict(values, **{name: t.unsqueeze(0)})
        yield f"{name} strided last dim", dict(values, **{name: torch.stack([t, t], -1)[..., 0]})
        yield f"{name} row view", dict(values, **{name: torch.cat([t, t], 0)[: t.shape[0]]})
        yield f"{name} on meta", dict(values, **{name: t.to("meta")})
        yield f"{name} a list", dict(values, **{name: t.tolist()})
        if t.dim() > 1:
            yield f"{name} last dim short", dict(values, **{name: t[..., :-1]})
    for name in contract.KEYWORDS:
        yield f"{name} given", dict(values, **{name: torch.ones(1)})
        if values[name] is not None:
            t = values[name]
            yield f"{name} missing", dict(values, **{name: None})
            yield f"{name} fp64", dict(values, **{name: t.to(torch.float64)})
            yield f"{name} strided", dict(values, **{name: torch.stack([t, t], -1)[..., 1]})
            yield f"{name} two elements", dict(values, **{name: torch.ones(2)})
    out = torch.empty(inputs.q.shape[0], 4, 32)
    yield "out wrong dtype", dict(values, out=out)
    q = values["q"]
    yield "out is q", dict(values, out=q)
    yield "out inside key_cache", dict(values, out=values["key_cache"].reshape(-1)[: q.numel()].view(q.shape))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.summary().replace(" ", "_"))
def test_fast_check_never_accepts_what_the_full_check_refuses(config):
    inputs = make_inputs(config, [1, 3], [5, 20])
    fast = contract.compile_fast_check(config)
    accepted = 0
    for label, values in _mutations(inputs):
        try:
            contract.check(config, values)
            valid = True
        except InputError:
            valid = False
        verdict = fast(*values.values())
        if verdict is not None:
            accepted += 1
            assert valid, f"{label}: the fast check accepted a call the contract refuses"
    assert accepted >= 2  # the valid call and the harmless views at least


def test_every_conditional_row_says_when_in_words():
    """The docs and the README table read the rule's words from the row itself."""
    for argument in contract.ARGUMENTS:
        if argument.presence is contract.Presence.WHEN:
            assert argument.when.startswith("required") and argument.when.endswith("else None"), argument.name


def test_fast_check_remembers_the_per_step_tensors_by_identity():
    """Every layer of an engine step passes the same batch-metadata objects: the fast check checks them once,
    remembers them, and checks any other object again (a new object with a wrong shape is still refused)."""
    config = CONFIGS[0]
    inputs = make_inputs(config, [1, 3], [5, 20])
    fast = contract.compile_fast_check(config)
    values = dict(zip([a.name for a in contract.ARGUMENTS], [*inputs.args] + [None] * 9))
    step = [a.name for a in contract.ARGUMENTS if a.per_step]
    assert set(step) == {"cu_seqlens_q", "seq_lens", "block_table"}
    assert fast(*values.values()) is not None
    remembered = fast.__globals__["_memo"][0]
    assert all(any(r is values[name] for r in remembered) for name in step)
    assert fast(*values.values()) is not None  # the same objects: the remembered verdict
    for name, bad in (("block_table", values["block_table"][:1]), ("seq_lens", values["seq_lens"][:1]),
                      ("cu_seqlens_q", values["cu_seqlens_q"].to(torch.int64)),
                      ("block_table", values["block_table"].to("meta"))):
        assert fast(*dict(values, **{name: bad}).values()) is None, name
    assert fast(*values.values()) is not None  # and the valid objects again
    # A device change of q is not hidden by the memory (its tensors are all on the CPU).
    assert fast(*dict(values, q=values["q"].to("meta")).values()) is None
