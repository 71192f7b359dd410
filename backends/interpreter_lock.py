"""One lock for every Triton kernel launch that runs under Triton's CPU interpreter.

The interpreter (TRITON_INTERPRET=1) patches `triton.language` module-wide while a kernel
runs, so two threads interpreting kernels at once break each other (an InterpreterError,
or wrong numbers). The Triton and dequant backends take this lock around each CPU launch,
so concurrent CPU callers are safe; compiled launches on a GPU never take it.
"""

from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["interpreter_launch"]

_LOCK = threading.RLock()
_NO_LOCK = contextlib.nullcontext()  # reusable: a GPU launch allocates nothing here


def interpreter_launch(device: torch.device):
    """The lock for a launch on `device` when it runs in the interpreter (the CPU), else a no-op context."""
    return _LOCK if device.type == "cpu" else _NO_LOCK
