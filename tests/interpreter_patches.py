"""Test-only patches of Triton's CPU interpreter where its numerics are Triton's bug, not ours.

shared notes (triton-on-cpu): the interpreter's fp32/fp16 -> e4m3 cast drops the carry when rounding
up to the next power of two (1.97 becomes 1.0); the GPU's cvt.rn.satfinite rounds to nearest even and
saturates at +-448. Kernels that round P to e4m3 (ours for an fp8 output, vLLM's for an fp8 query)
are then wrong on the CPU where they are right on the GPU. Only that one conversion is replaced; the
kernels run unchanged.
"""

from __future__ import annotations

import numpy as np
import torch


def round_fp8_like_the_gpu(monkeypatch) -> None:
    """Send the interpreter's fp32/fp16 -> e4m3 conversion through torch's round-to-nearest-even,
    saturated at +-448, for the duration of `monkeypatch`."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    numpy_float = {tl.float32: np.float32, tl.float16: np.float16}

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype in numpy_float:
            values = torch.from_numpy(np.ascontiguousarray(input).view(numpy_float[input_dtype]).astype(np.float32))
            fp8 = values.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            return fp8.view(torch.uint8).numpy().reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)
