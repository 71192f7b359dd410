"""Which backend runs when a config says "auto": `dispatch.use(...)` scopes and DISPATCH_BACKEND.

`with dispatch.use(backend=..., order=[...])` is a contextvar, so the scope is
per thread and per asyncio task, and the previous setting returns on exit
(like PyTorch's `sdpa_kernel`, without its process-wide flags). Outside every
scope the override is the environment's: DISPATCH_BACKEND, read once when
dispatch is imported (as vLLM reads VLLM_ATTENTION_BACKEND), so it steers
every config whose backend is "auto", configs built in code included, and
selection never reads the environment at call time. Selection keys its cache
on the active override.

Precedence, highest first: a config naming a backend (or `load_config`'s
``backend=`` argument) > a `use()` scope > DISPATCH_BACKEND > a config file's
``backend`` > "auto".
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from dispatch import registry
from dispatch.errors import UnsupportedConfigError

__all__ = ["Override", "use", "current_override", "ENVIRONMENT_VARIABLE", "unknown_backend_message",
           "check_backend_name"]

ENVIRONMENT_VARIABLE = "DISPATCH_BACKEND"
_SCOPE = "use(backend=...)"


@dataclass(frozen=True)
class Override:
    backend: Optional[str] = None
    order: Optional[tuple[str, ...]] = None
    # Where `backend` came from, so an unknown name is reported against what the user set.
    backend_source: str = _SCOPE


def unknown_backend_message(name: str, source: str = "backend") -> str:
    return f"{source}: unknown backend {name!r}; valid options are 'auto' or one of {list(registry.backend_names())}"


def check_backend_name(name: str, source: str) -> None:
    """Raise UnsupportedConfigError naming `source` when `name` is neither 'auto' nor registered."""
    if name != "auto" and name not in registry.backend_names():
        raise UnsupportedConfigError(unknown_backend_message(name, source))


def _from_environment() -> Override:
    # Checked against the registry at first selection, not here: a plugin may register the backend
    # after dispatch is imported, and importing dispatch must not fail over a variable.
    name = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    return Override(backend=name, backend_source=ENVIRONMENT_VARIABLE) if name and name != "auto" else Override()


_override: contextvars.ContextVar[Override] = contextvars.ContextVar("dispatch_override", default=_from_environment())


def current_override() -> Override:
    return _override.get()


@contextlib.contextmanager
def use(backend: Optional[str] = None, order: Optional[Sequence[str]] = None) -> Iterator[Override]:
    """Within the block, run `backend` for configs whose backend is "auto" (and for configs loaded
    inside the block), and/or let `auto` walk `order` instead of the registry's default order.

    Scoped to the current thread / asyncio task; the previous setting returns on exit. An unknown
    name raises UnsupportedConfigError (a ValueError) at once, listing the valid ones.
    """
    if backend is not None and (not isinstance(backend, str) or not backend.strip()):
        raise ValueError(f"backend: expected a backend name, got {backend!r}")
    if order is not None and (isinstance(order, str) or not all(isinstance(n, str) for n in order)):
        raise ValueError(f"order: expected a sequence of backend names, got {order!r}")
    names = tuple(n.strip().lower() for n in order) if order is not None else None
    if backend is not None:
        check_backend_name(backend.strip().lower(), "backend")
    for name in names or ():
        if name == "auto":
            raise ValueError("order: 'auto' is not a backend; list the backends auto should try")
        check_backend_name(name, "order")
    outer = _override.get()
    inner = Override(
        backend=backend.strip().lower() if backend is not None else outer.backend,
        order=names if names is not None else outer.order,
        backend_source=_SCOPE if backend is not None else outer.backend_source,
    )
    token = _override.set(inner)
    try:
        yield inner
    finally:
        _override.reset(token)
