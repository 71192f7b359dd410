"""Autotuning of the Triton kernel's tiles (backends/triton/autotune.py).

The search logic runs here with a fake timer; tests/backends/test_triton_gpu.py
runs the real search on a GPU (CUDA events, CUDA-graph capture)."""

from __future__ import annotations

import logging
import os

import pytest

from dispatch.config import AttentionConfig, KVQuantMode

autotune = pytest.importorskip("backends.triton.autotune")  # imports triton
from backends.triton import launcher  # noqa: E402

CONFIG = AttentionConfig(num_heads=8, num_kv_heads=2, head_size=128, q_dtype="bf16", kv_cache_dtype="bf16")


@pytest.fixture(autouse=True)
def empty_cache():
    autotune.clear()
    yield
    autotune.clear()


def key(name="GPU"):
    return (name, CONFIG, True, 64, 64, 8192)


@pytest.mark.parametrize("decode_shaped", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("mode", [KVQuantMode.NONE, KVQuantMode.FP8_PER_TENSOR])
def test_candidates_start_with_the_defaults_and_are_distinct(decode_shaped, mode):
    default = launcher.choose_tiles(128, 4, False, decode_shaped, mode)
    options = autotune.candidates(default, decode_shaped)
    assert options[0] == default
    assert len(set(options)) == len(options) >= 4
    assert all(t.block_m == default.block_m for t in options)  # BLOCK_Q and the grid depend on it
    if decode_shaped:
        assert {t.unmasked_interior for t in options} == {True, False}
    else:
        assert {t.num_warps for t in options} == {4, 8}


def test_tune_picks_the_fastest_caches_it_and_logs_once(caplog):
    default = launcher.choose_tiles(128, 4, False, True)
    options = autotune.candidates(default, True)
    fake_ms = {tiles: 1.0 + i for i, tiles in enumerate(options)}
    fake_ms[options[2]] = 0.5
    calls = []

    def time_ms(run, tiles):
        calls.append(tiles)
        return fake_ms[tiles]

    with caplog.at_level(logging.INFO, logger="dispatch"):
        assert autotune.tune(key(), options, run=None, time_ms=time_ms) == options[2]
        assert autotune.tune(key(), options, run=None, time_ms=time_ms) == options[2]
    assert calls == options  # searched once
    assert autotune.cached(key()) == options[2] and autotune.cached(key("other GPU")) is None
    assert len([r for r in caplog.records if "triton autotune" in r.getMessage()]) == 1


def test_a_failing_candidate_is_skipped_with_a_warning_and_all_failing_raises(caplog):
    options = autotune.candidates(launcher.choose_tiles(128, 4, False, False), False)

    def time_ms(run, tiles):
        if tiles == options[0]:
            raise RuntimeError("out of resource: shared memory")
        return 1.0

    with caplog.at_level(logging.WARNING, logger="dispatch"):
        assert autotune.tune(key(), options, run=None, time_ms=time_ms) == options[1]
    assert any("out of resource" in r.getMessage() for r in caplog.records)

    def always_fails(run, tiles):
        raise RuntimeError("no kernel image")

    with pytest.raises(RuntimeError, match="no kernel image"):
        autotune.tune(key("B"), options, run=None, time_ms=always_fails)
    assert autotune.cached(key("B")) is None


def test_off_by_default_and_never_on_cpu(monkeypatch):
    assert autotune.ENABLED == (os.environ.get(autotune.ENV_VAR, "0") not in ("", "0"))
    monkeypatch.setattr(autotune, "ENABLED", True)
    monkeypatch.setattr(autotune, "tiles_for", lambda *a, **k: pytest.fail("tuned on the CPU"))
    from tests.cases import make_inputs

    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=32, backend="triton")
    inputs = make_inputs(config, [1, 3], [5, 9])
    launcher.unified_attention(*inputs.args, config=config, **inputs.kwargs)  # interpreter: no search
