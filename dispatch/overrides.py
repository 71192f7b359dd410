"""`with dispatch.use(backend=..., order=[...])`: a scoped override of backend choice.

A contextvar, so the scope is per thread and per asyncio task, and the
previous setting returns on exit (like PyTorch's `sdpa_kernel`, without its
process-wide flags). Selection keys its cache on the active override.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

__all__ = ["Override", "use", "current_override"]


@dataclass(frozen=True)
class Override:
    backend: Optional[str] = None
    order: Optional[tuple[str, ...]] = None


_override: contextvars.ContextVar[Override] = contextvars.ContextVar("dispatch_override", default=Override())


def current_override() -> Override:
    return _override.get()


@contextlib.contextmanager
def use(backend: Optional[str] = None, order: Optional[Sequence[str]] = None) -> Iterator[Override]:
    """Within the block, run `backend` for configs whose backend is "auto" (and for configs loaded
    inside the block), and/or let `auto` walk `order` instead of the registry's default order.

    Scoped to the current thread / asyncio task; the previous setting returns on exit.
    """
    if backend is not None and (not isinstance(backend, str) or not backend.strip()):
        raise ValueError(f"backend: expected a backend name, got {backend!r}")
    if order is not None and (isinstance(order, str) or not all(isinstance(n, str) for n in order)):
        raise ValueError(f"order: expected a sequence of backend names, got {order!r}")
    outer = _override.get()
    inner = Override(
        backend=backend.strip().lower() if backend is not None else outer.backend,
        order=tuple(n.strip().lower() for n in order) if order is not None else outer.order,
    )
    token = _override.set(inner)
    try:
        yield inner
    finally:
        _override.reset(token)
