"""Every backend, every combination it claims, against the float64 oracle; everything else refused.

The grid comes from tests/parity/grid.py (all pairs of factor values by
default, the full product with --parity-full), its dtype modes, features and
length sets from the shared case table (dispatch/cases.py). For each registered backend
and each case:
  - the backend declares support (explain says so): dispatch.attention with the
    backend named must run *that* backend and match the oracle within
    k x the error of a plain same-precision computation (same_precision.py)
    plus the error of rounding the exact result to the output dtype;
  - it does not: the explicit request must raise UnsupportedConfigError.
Quantized inputs use distinct non-unit scales (per token and head where the
mode allows); unused pages and padding are NaN (dispatch.testing.make_inputs).
The judge is the float64 oracle (dispatch/reference.py via tests/oracle.py).
"""

from __future__ import annotations

import functools
import zlib
from typing import Optional

import pytest
import torch

import dispatch
from dispatch import UnsupportedConfigError, registry
from dispatch.testing import make_inputs, output_as_real
from tests.oracle import reference_attention
from tests.parity.grid import Case, cases
from tests.parity.report import RESULTS, ParityResult
from tests.parity.same_precision import output_rounding_error, same_precision_attention

_OUTPUTS: dict[tuple[str, str, str], torch.Tensor] = {}  # (device, case, backend) -> real output that passed
_RAN_HERE: set[tuple[str, str, str]] = set()  # (device, case, backend) whose parity test ran in this process


def _seed(case: Case) -> int:
    return zlib.crc32(case.id.encode())


def _cached_by_case_id(fn):
    """Case holds dicts, so it cannot be hashed; its id names it uniquely."""
    cache: dict[str, object] = {}

    @functools.wraps(fn)
    def wrapper(case: Case):
        if case.id not in cache:
            cache[case.id] = fn(case)
        return cache[case.id]

    return wrapper


@_cached_by_case_id
def _oracle(case: Case) -> torch.Tensor:
    config = case.config("auto")
    inputs = make_inputs(config, case.q_lens, case.kv_lens, seed=_seed(case))
    return reference_attention(*inputs.args, **inputs.oracle_kwargs(config))


@_cached_by_case_id
def _same_precision_error(case: Case) -> tuple[float, float]:
    """(max error of the same-precision computation, error of rounding the exact result to out_dtype)."""
    config = case.config("auto")
    inputs = make_inputs(config, case.q_lens, case.kv_lens, seed=_seed(case))
    ref = _oracle(case)
    same = same_precision_attention(inputs, config)
    return float((same - ref).abs().max()), output_rounding_error(ref, inputs, config)


def _multiple(case: Case, backend: str) -> float:
    """k: 3 for softcap (tanh adds its own rounding) and for decode batches (split-KV merges partial
    softmaxes), 2 otherwise."""
    return 3.0 if case.feature[0] == "softcap" or case.batch.kind == "decode" else 2.0


def _record(device, backend, case, status, ratio=None, detail=""):
    RESULTS.append(ParityResult(device, backend, case.id, status, ratio, detail))


def check_case(case: Case, backend: str, device: str) -> None:
    _RAN_HERE.add((device, case.id, backend))
    config = case.config(backend)
    report = dispatch.explain(config, device).report(backend)
    inputs = make_inputs(config, case.q_lens, case.kv_lens, seed=_seed(case), device=device)
    if not report.supported:
        with pytest.raises(UnsupportedConfigError):
            dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
        _record(device, backend, case, "refused", detail=report.reasons[0])
        return

    plan = dispatch.select(config, device)
    assert plan.name == backend, f"asked for {backend}, the dispatcher chose {plan.name}"
    out = dispatch.attention(*inputs.args, config=config, **inputs.kwargs)
    got = output_as_real(out, config, inputs)
    ref = _oracle(case)
    same_error, rounding_error = _same_precision_error(case)
    k = _multiple(case, backend)
    error = float((got - ref).abs().max()) if torch.isfinite(got).all() else float("inf")
    ratio = error / max(same_error, 1e-12)
    bound = k * same_error + 2 * rounding_error + 1e-6
    print(f"{backend} {case.id}: error {error:.3g}, same-precision {same_error:.3g}, ratio {ratio:.2f}")
    if error > bound:
        detail = f"max error {error:.3g} > {k:g} x same-precision {same_error:.3g} + 2 x rounding {rounding_error:.3g}"
        _record(device, backend, case, "fail", ratio, detail)
        pytest.fail(f"{backend} {case.id}: {detail}")
    _record(device, backend, case, "pass", ratio)
    _OUTPUTS[(device, case.id, backend)] = got

    # Poisoned pages must not matter at all: the same call on clean memory gives identical bits.
    if case.feature[0] == "causal":
        clean = make_inputs(config, case.q_lens, case.kv_lens, seed=_seed(case), device=device, poison=False)
        again = dispatch.attention(*clean.args, config=config, **clean.kwargs)
        assert torch.equal(again.view(torch.uint8), out.view(torch.uint8)), "NaN-poisoned pages changed the output"


def _output_here(case: Case, backend: str, device: str) -> Optional[torch.Tensor]:
    """The backend's real output for the case: from this process's parity test, or computed now where that
    test ran in another process (pytest-xdist); None where the backend refuses the case or failed its parity
    test here (that test reports it)."""
    key = (device, case.id, backend)
    if key not in _OUTPUTS and key not in _RAN_HERE:
        config = case.config(backend)
        if not dispatch.explain(config, device).report(backend).supported:
            return None
        inputs = make_inputs(config, case.q_lens, case.kv_lens, seed=_seed(case), device=device)
        _OUTPUTS[key] = output_as_real(dispatch.attention(*inputs.args, config=config, **inputs.kwargs), config,
                                       inputs)
    return _OUTPUTS.get(key)


def pairwise_check(case: Case, device: str) -> None:
    """Backends that each matched the oracle must also agree with each other (within both bounds)."""
    passed = [b for b in registry.backend_names() if _output_here(case, b, device) is not None]
    if len(passed) < 2:
        pytest.skip("fewer than two backends ran this case here (the others refused it)")
    same_error, rounding_error = _same_precision_error(case)
    bound = 2 * (_multiple(case, "") * same_error + 2 * rounding_error + 1e-6)
    for i, a in enumerate(passed):
        for b in passed[i + 1:]:
            diff = float((_OUTPUTS[(device, case.id, a)] - _OUTPUTS[(device, case.id, b)]).abs().max())
            assert diff <= bound, f"{a} and {b} differ by {diff:.3g} > {bound:.3g} on {case.id}"


def _grid(device: str, request_full: bool):
    return cases(device, full=request_full)


def pytest_generate_tests(metafunc):
    full = metafunc.config.getoption("--parity-full")
    if "cpu_case" in metafunc.fixturenames:
        metafunc.parametrize("cpu_case", _grid("cpu", full), ids=lambda c: c.id)
    if "gpu_case" in metafunc.fixturenames:
        metafunc.parametrize("gpu_case", _grid("cuda", full), ids=lambda c: c.id)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", list(registry.backend_names()))


def test_parity_cpu(cpu_case, backend):
    check_case(cpu_case, backend, "cpu")


def test_pairwise_cpu(cpu_case):
    pairwise_check(cpu_case, "cpu")


@pytest.mark.gpu
def test_parity_gpu(gpu_case, backend):
    check_case(gpu_case, backend, "cuda")


@pytest.mark.gpu
def test_pairwise_gpu(gpu_case):
    pairwise_check(gpu_case, "cuda")
