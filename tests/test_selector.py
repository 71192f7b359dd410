"""Selection: a named backend runs or is refused; auto walks the order; decisions are cached."""

import logging

import pytest
import torch

import dispatch
from dispatch import AttentionConfig, UnsupportedConfigError
from dispatch import registry
from dispatch.capabilities import Capability, DeviceInfo
from dispatch.config import KVQuantMode

CPU = DeviceInfo(type="cpu", name="cpu")


def _capability(**changes) -> Capability:
    base = dict(
        description="test backend",
        q_dtypes=frozenset({"float16", "bfloat16"}),
        kv_cache_dtypes=frozenset({"float16", "bfloat16"}),
        out_dtypes=frozenset({"float16", "bfloat16"}),
        kv_quant_modes=frozenset({KVQuantMode.NONE}),
        devices=frozenset({"cpu", "cuda"}),
        features=frozenset({"causal", "non_causal"}),
    )
    base.update(changes)
    return Capability(**base)


def _fake_forward(tag):
    def forward(q, *args, config, **kwargs):
        return torch.full((q.shape[0], config.num_heads, config.head_size), float(tag), dtype=config.out_torch_dtype)

    return forward


@pytest.fixture
def fake_backends():
    """Two test backends: 'fast_narrow' first in the auto order (no softcap), 'wide' by name only."""
    registry.register_backend("fast_narrow", capability=_capability(), forward=_fake_forward(1), position=0)
    registry.register_backend("wide", capability=_capability(features=frozenset(
        {"causal", "non_causal", "softcap"})), forward=_fake_forward(2))
    yield
    registry.unregister_backend("fast_narrow")
    registry.unregister_backend("wide")


def cfg(**changes):
    return AttentionConfig(**dict(dict(num_heads=4, num_kv_heads=2, head_size=32), **changes))


def test_default_order_and_names():
    assert dispatch.default_order() == ("triton", "flash_attn", "sdpa")
    assert set(dispatch.backend_names()) >= {"triton", "flash_attn", "sdpa"}


def test_auto_takes_the_first_backend_that_fits(fake_backends):
    plan = dispatch.select(cfg(), CPU)
    assert plan.name == "fast_narrow"
    # softcap: fast_narrow refuses, the registered-by-name 'wide' is not in the order, so auto reaches sdpa.
    plan = dispatch.select(cfg(logits_soft_cap=20.0), CPU)
    assert plan.name == "sdpa"
    skipped = dict(plan.skipped)
    assert "logits_soft_cap=20.0 not supported: feature 'softcap' not in {'causal', 'non_causal'}" in skipped[
        "fast_narrow"]
    assert "wide" not in skipped  # registering is not activating


def test_named_backend_runs_or_is_refused_never_swapped(fake_backends):
    assert dispatch.select(cfg(backend="wide", logits_soft_cap=20.0), CPU).name == "wide"
    with pytest.raises(UnsupportedConfigError) as info:
        dispatch.select(cfg(backend="fast_narrow", logits_soft_cap=20.0, causal=False, use_sinks=True), CPU)
    message = str(info.value)
    assert "Backend 'fast_narrow' cannot run this config (no fallback for a named backend):" in message
    assert "`fast_narrow` is not supported because:" in message
    assert "    - logits_soft_cap=20.0 not supported" in message
    assert "    - use_sinks=True not supported" in message
    assert list(info.value.reasons) == ["fast_narrow"] and len(info.value.reasons["fast_narrow"]) == 2


def test_none_fits_lists_every_backend(fake_backends):
    registry.register_backend("sdpa", capability=_capability(), forward=_fake_forward(3))  # make sdpa narrow too
    try:
        with pytest.raises(UnsupportedConfigError) as info:
            dispatch.select(cfg(use_alibi=True), CPU)
    finally:
        registry.unregister_backend("sdpa")
    message = str(info.value)
    assert message.startswith("No attention backend can run this config:")
    for name in ("fast_narrow", "triton", "flash_attn", "sdpa"):
        assert f"`{name}` is not supported because:" in message
    assert set(info.value.reasons) == {"fast_narrow", "triton", "flash_attn", "sdpa"}


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(UnsupportedConfigError, match=r"unknown backend 'nope'; valid options are 'auto' or one of"):
        dispatch.select(cfg(backend="nope"), CPU)
    with pytest.raises(UnsupportedConfigError, match="unknown backend 'nope'"):
        dispatch.explain(cfg(backend="nope"), CPU)


def test_decisions_are_cached_and_registration_clears_the_cache(fake_backends):
    config = cfg()
    first = dispatch.select(config, CPU)
    assert dispatch.select(cfg(), CPU) is first  # an equal config hits the same entry
    registry.register_backend("fast_narrow", capability=_capability(), forward=_fake_forward(4), position=0)
    again = dispatch.select(config, CPU)
    assert again is not first and again.name == "fast_narrow"


def test_auto_logs_the_choice_once_per_config(fake_backends, caplog):
    config = cfg(logits_soft_cap=7.0, head_size=48)
    with caplog.at_level(logging.INFO, logger="dispatch"):
        for _ in range(3):
            dispatch.select(config, CPU)
    records = [r for r in caplog.records if r.name == "dispatch"]
    assert len(records) == 1
    text = records[0].getMessage()
    assert "attention backend 'sdpa' chosen" in text and "skipped fast_narrow:" in text


def test_a_backend_whose_module_fails_to_load_is_a_reason_not_a_crash():
    registry.register_backend("broken", module="tests.no_such_backend_module", position=0)
    try:
        report = dispatch.explain(cfg(), CPU)
        entry = report.report("broken")
        assert not entry.available and not entry.supported
        assert entry.reasons[0].startswith("backend module 'tests.no_such_backend_module' failed to load: "
                                           "ModuleNotFoundError")
        assert dispatch.select(cfg(), CPU).name != "broken"
    finally:
        registry.unregister_backend("broken")


def test_a_missing_required_module_is_a_reason(fake_backends):
    registry.register_backend("needs_pkg", capability=_capability(required_modules=("not_installed_pkg_42",)),
                              forward=_fake_forward(5), position=0)
    try:
        report = dispatch.explain(cfg(), CPU)
        entry = report.report("needs_pkg")
        assert not entry.available
        assert "module 'not_installed_pkg_42' not importable: ModuleNotFoundError" in entry.reasons[0]
        assert report.chosen == "fast_narrow"
    finally:
        registry.unregister_backend("needs_pkg")


def test_explain_as_data_and_as_a_table(fake_backends):
    report = dispatch.explain(cfg(logits_soft_cap=3.0), CPU)
    assert report.chosen == "sdpa"
    names = [b.name for b in report.backends]
    assert names[: len(dispatch.default_order())] == list(dispatch.default_order())
    assert "wide" in names
    assert report.report("wide").supported and not report.report("fast_narrow").supported
    text = str(report)
    assert "=> sdpa" in text
    assert "logits_soft_cap=3.0 not supported" in text
    assert "chosen: sdpa" in text
    data = report.to_dict()
    assert data["chosen"] == "sdpa" and data["config"]["logits_soft_cap"] == 3.0


def test_plan_forward_runs_the_backend_with_the_bound_config(fake_backends):
    plan = dispatch.select(cfg(backend="wide"), CPU)
    q = torch.zeros(3, 4, 32, dtype=torch.bfloat16)
    out = plan.forward(q, None, None, None, None, None)
    assert out.shape == (3, 4, 32) and float(out[0, 0, 0]) == 2.0


def test_register_backend_argument_errors():
    with pytest.raises(ValueError, match="other than 'auto'"):
        registry.register_backend("auto", module="x")
    with pytest.raises(ValueError, match="either module"):
        registry.register_backend("x", module="x", capability=_capability(), forward=_fake_forward(0))
    with pytest.raises(ValueError, match="capability and forward are both required"):
        registry.register_backend("x", capability=_capability())


def test_import_dispatch_loads_no_kernel():
    import subprocess
    import sys

    code = (
        "import sys, dispatch; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'flash_attn', 'backends')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unregistering_a_moved_builtin_restores_its_place():
    registry.register_backend("sdpa", capability=_capability(), forward=_fake_forward(6), position=0)
    assert dispatch.default_order()[0] == "sdpa"
    registry.unregister_backend("sdpa")
    assert dispatch.default_order() == ("triton", "flash_attn", "sdpa")


def _run_python(code, **env_extra):
    import os
    import subprocess
    import sys
    import textwrap

    env = {k: v for k, v in os.environ.items() if k not in ("DISPATCH_BACKEND", "DISPATCH_CONFIG")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_dispatch_backend_steers_configs_built_in_code():
    code = """
        import dispatch
        from dispatch.capabilities import DeviceInfo
        cpu = DeviceInfo(type="cpu", name="cpu")
        auto = dispatch.AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, q_dtype="fp16", kv_cache_dtype="fp16")
        print(dispatch.explain(auto, cpu).requested, dispatch.select(auto, cpu).name)
        named = auto.model_copy(update={"backend": "triton"})
        print(dispatch.explain(named, cpu).requested)       # a config naming a backend keeps it
        with dispatch.use(backend="triton"):
            print(dispatch.explain(auto, cpu).requested)    # a scope beats the variable
        with dispatch.use(backend="auto"):
            print(dispatch.explain(auto, cpu).requested)    # and can hand the choice back to auto
    """
    result = _run_python(code, DISPATCH_BACKEND="SDPA")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["sdpa sdpa", "triton", "triton", "auto"]


def test_an_unknown_dispatch_backend_is_named_at_first_selection():
    code = """
        import dispatch                                     # importing does not fail
        cfg = dispatch.AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, q_dtype="fp16", kv_cache_dtype="fp16")
        try:
            dispatch.select(cfg, "cpu")
        except dispatch.UnsupportedConfigError as exc:
            print(exc)
    """
    result = _run_python(code, DISPATCH_BACKEND="flashinfr")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("DISPATCH_BACKEND: unknown backend 'flashinfr'; valid options are 'auto' or one "
                                    "of ['triton', 'flash_attn', ")


def test_use_with_an_unknown_name_raises_at_once():
    with pytest.raises(UnsupportedConfigError, match=r"^backend: unknown backend 'flashinfr'; valid options are "):
        with dispatch.use(backend="flashinfr"):
            pass
    with pytest.raises(UnsupportedConfigError, match=r"^order: unknown backend 'nope'"):
        with dispatch.use(order=["sdpa", "nope"]):
            pass
    with pytest.raises(ValueError, match="order: 'auto' is not a backend"):
        with dispatch.use(order=["auto"]):
            pass


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "graphics"])
def test_an_unknown_device_names_the_argument(device):
    with pytest.raises(ValueError) as info:
        dispatch.select(cfg(), device)
    assert str(info.value).startswith(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    with pytest.raises(ValueError, match="^device: expected"):
        dispatch.explain(cfg(), device)


def test_unregistering_a_builtin_outside_the_default_order_keeps_it_outside():
    """dequant ships with the project but auto reaches it only through speed rules."""
    assert "dequant" in dispatch.backend_names() and "dequant" not in dispatch.default_order()
    order = dispatch.default_order()
    dispatch.register_backend("dequant", module="backends.dequant", position=0)
    assert dispatch.default_order()[0] == "dequant"
    dispatch.unregister_backend("dequant")
    assert dispatch.default_order() == order and "dequant" in dispatch.backend_names()
