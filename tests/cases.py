"""Test-side helpers: tolerances derived from the arithmetic, and one comparison that reports the worst element.

Tests take their named cases from dispatch/cases.py (the one case table, in
the package because the installed selftest reads it too) and their inputs from
dispatch.testing.make_inputs, re-exported here with its constants; the judge is
tests/oracle.py (the float64 oracle, dispatch/reference.py).
"""

from __future__ import annotations

import torch

from dispatch.config import AttentionConfig
from dispatch.testing import (  # re-exported: see __all__
    K_SCALE,
    OUTPUT_SCALE,
    Q_SCALE,
    V_SCALE,
    AttentionInputs,
    alibi_slopes_for,
    make_inputs,
    output_as_real,
    unit_roundoff,
)

__all__ = ["K_SCALE", "OUTPUT_SCALE", "Q_SCALE", "V_SCALE", "AttentionInputs", "alibi_slopes_for", "make_inputs",
           "output_as_real", "unit_roundoff", "tolerance", "assert_close_to_oracle"]


def assert_close_to_oracle(out, ref, *, atol: float, rtol: float, label: str = "") -> float:
    """Assert |out - ref| <= atol + rtol*|ref| everywhere; report the worst element. Returns max abs error."""
    out = out.to(torch.float64)
    ref = ref.to(torch.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"{label}: shape {tuple(out.shape)} != oracle {tuple(ref.shape)}")
    nan = ~torch.isfinite(out)
    if nan.any():
        idx = tuple(int(i) for i in nan.nonzero()[0])
        raise AssertionError(f"{label}: non-finite output at {idx} ({int(nan.sum())} elements): {out[idx]}")
    err = (out - ref).abs()
    excess = err - (atol + rtol * ref.abs())
    worst = int(excess.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), out.shape))
    if excess.reshape(-1)[worst] > 0:
        raise AssertionError(
            f"{label}: worst element {idx}: out={float(out[idx]):.6g} oracle={float(ref[idx]):.6g} "
            f"|diff|={float(err[idx]):.3g} > atol {atol} + rtol {rtol} * |oracle|; max |diff| {float(err.max()):.3g}"
        )
    return float(err.max())


def tolerance(config: AttentionConfig, compute_dtype: torch.dtype, roundings: int = 8) -> tuple[float, float]:
    """(atol, rtol) for a backend computing in `compute_dtype` against the float64 oracle.

    The oracle sees the same stored (already quantized) inputs, so the error is
    the arithmetic's alone: a few roundings in the compute dtype (scores, P,
    the PV accumulation; `roundings` of them, relative to outputs of size ~1),
    plus one rounding of the result into the output dtype.
    """
    u_compute = unit_roundoff(compute_dtype)
    u_out = unit_roundoff(config.out_torch_dtype)
    atol = roundings * u_compute
    if config.out_is_fp8:
        # fp8 stores o / output_scale; its smallest subnormal step (2^-9), times the scale, is an absolute floor.
        atol += 2.0**-9 * OUTPUT_SCALE
    return atol, u_out + roundings * u_compute
