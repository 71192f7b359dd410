"""`python -m dispatch selftest`: every backend on this machine against a float64 reference.

For the cases tagged "selftest" in dispatch/cases.py, which cover each KV
quantization mode and each feature, every registered backend either runs and
is compared with the float64 oracle (`dispatch.reference.reference_attention`,
the same one the test suite trusts), or is refused with its reasons.
A result is `pass`, `refused` (with the first reason) or `fail`; the exit
code is 1 when anything fails or nothing passes (a machine where every backend
is refused has checked nothing), so the command can gate an install.

The comparison is the relative error ||out - ref|| / ||ref|| against a bound
of 4 units of roundoff of the least precise step the backend takes (its
compute dtype, the output dtype, and P when it rounds P to fp8 for an fp8
query). The test suite holds backends to a much stricter, per-element
standard; this is a quick check that the install computes attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from dispatch import registry
from dispatch.api import attention
from dispatch.cases import Case, cases
from dispatch.config import AttentionConfig
from dispatch.errors import UnsupportedConfigError
from dispatch.selector import explain
from dispatch.reference import reference_attention
from dispatch.testing import make_inputs, output_as_real, unit_roundoff

__all__ = ["SELFTEST_CASES", "SelftestResult", "run_selftest", "format_results", "exit_code"]

# Every mode, every feature, GQA, an fp8 output: the table's "selftest" cases.
SELFTEST_CASES: tuple[Case, ...] = cases("selftest")



@dataclass(frozen=True)
class SelftestResult:
    config: str
    backend: str
    status: str  # "pass" | "refused" | "fail"
    detail: str  # the error and its bound, the first refusal reason, or the failure


def error_bound(config: AttentionConfig, fp8_query_p_dtype: Optional[str]) -> float:
    steps = [config.out_dtype, "float32" if config.q_is_fp8 else config.q_dtype]
    if config.q_is_fp8 and fp8_query_p_dtype is not None:
        steps.append(fp8_query_p_dtype)
    return 4 * max(unit_roundoff(s) for s in steps)


def _check_one(case: Case, config: AttentionConfig, device: str) -> SelftestResult:
    label = case.name
    report = explain(config, device).report(config.backend)
    if not report.supported:
        more = f" (+{len(report.reasons) - 1} more)" if len(report.reasons) > 1 else ""
        return SelftestResult(label, config.backend, "refused", report.reasons[0] + more)
    inputs = make_inputs(config, list(case.q_lens), list(case.kv_lens), device=device, seed=1)
    try:
        out = attention(*inputs.args, config=config, **inputs.kwargs)
    except (UnsupportedConfigError, RuntimeError, ValueError) as exc:
        return SelftestResult(label, config.backend, "fail", f"{type(exc).__name__}: {exc}".splitlines()[0])
    got = output_as_real(out, config, inputs)
    ref = reference_attention(*inputs.args, **inputs.oracle_kwargs(config))
    if not torch.isfinite(got).all():
        return SelftestResult(label, config.backend, "fail", "non-finite output")
    err = float((got - ref).norm() / ref.norm())
    entry = registry.get_backend(config.backend)
    bound = error_bound(config, entry.capability.fp8_query_p_dtype)
    status = "pass" if err <= bound else "fail"
    return SelftestResult(label, config.backend, status, f"rel err {err:.2e} (bound {bound:.1e})")


def run_selftest(device: Optional[str] = None) -> list[SelftestResult]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for case in SELFTEST_CASES:
        for name in registry.backend_names():
            results.append(_check_one(case, case.config(backend=name), device))
    return results


def format_results(results: list[SelftestResult], device: str) -> str:
    width_c = max(len(r.config) for r in results)
    width_b = max(len(r.backend) for r in results)
    lines = [f"selftest on {device}", f"{'config':<{width_c}}  {'backend':<{width_b}}  {'result':<7}  detail"]
    lines += [f"{r.config:<{width_c}}  {r.backend:<{width_b}}  {r.status:<7}  {r.detail}" for r in results]
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "refused", "fail")}
    lines.append(f"{counts['pass']} passed, {counts['fail']} failed, {counts['refused']} refused")
    return "\n".join(lines)


def exit_code(results: list[SelftestResult]) -> int:
    """1 when any result failed or none passed (every backend refused: nothing was checked), else 0."""
    if any(r.status == "fail" for r in results) or not any(r.status == "pass" for r in results):
        return 1
    return 0


def results_as_dicts(results: list[SelftestResult]) -> list[dict]:
    return [asdict(r) for r in results]
