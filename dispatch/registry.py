"""The backends by name, and the order `auto` tries them in.

A backend is a module exposing ``CAPABILITY`` (a `Capability`) and
``forward(...)``. Built-in backends are registered by dotted module path and
imported only when first needed (selection or `list`), so ``import dispatch``
loads no kernel and no optional dependency. `register_backend()` adds or
replaces one; it never changes what `auto` picks unless ``position`` puts it
into the order (registering is not activating).
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from dispatch.capabilities import Capability

__all__ = ["BackendEntry", "register_backend", "unregister_backend", "get_backend", "backend_names", "default_order"]


@dataclass(frozen=True)
class BackendEntry:
    """A loaded backend: its name, what it declares and the function that runs it."""

    name: str
    capability: Capability
    forward: Callable


# name -> dotted module path (lazy) or an already-built entry (registered in code).
_BUILTIN = {
    "triton": "backends.triton",
    "flash_attn": "backends.flash_attn",
    "sdpa": "backends.sdpa",
    "dequant": "backends.dequant",
}
_DEFAULT_ORDER = ("triton", "flash_attn", "sdpa")
_targets: dict[str, "str | BackendEntry"] = dict(_BUILTIN)
_order: list[str] = list(_DEFAULT_ORDER)
_loaded: dict[str, BackendEntry] = {}
_load_errors: dict[str, str] = {}
_lock = threading.RLock()
_listeners: list[Callable[[], None]] = []  # called when the registry changes (the selector clears its cache)


def on_change(callback: Callable[[], None]) -> None:
    _listeners.append(callback)


def _changed() -> None:
    for callback in _listeners:
        callback()


def register_backend(
    name: str,
    *,
    module: Optional[str] = None,
    capability: Optional[Capability] = None,
    forward: Optional[Callable] = None,
    position: Optional[int] = None,
) -> None:
    """Register backend `name`: either ``module="pkg.mod"`` (imported lazily; it must define
    CAPABILITY and forward) or ``capability=`` and ``forward=`` directly.

    ``position`` inserts the name into the order `auto` walks (0 = tried first);
    without it the backend runs only when a config names it.
    """
    name = name.strip().lower()
    if not name or name == "auto":
        raise ValueError(f"name: a backend name other than 'auto' is required, got {name!r}")
    if (module is None) == (capability is None and forward is None):
        raise ValueError("register_backend: pass either module=... or capability=... and forward=..., not both")
    if module is None and (capability is None or forward is None):
        raise ValueError(f"register_backend({name!r}): capability and forward are both required")
    with _lock:
        _targets[name] = module if module is not None else BackendEntry(name, capability, forward)
        _loaded.pop(name, None)
        _load_errors.pop(name, None)
        if position is not None:
            if name in _order:
                _order.remove(name)
            _order.insert(position, name)
    _changed()


def unregister_backend(name: str) -> None:
    """Remove a registered backend (built-ins return to their defaults: they are never lost)."""
    with _lock:
        _loaded.pop(name, None)
        _load_errors.pop(name, None)
        if name in _BUILTIN:
            _targets[name] = _BUILTIN[name]
            # Back to its default place too (a registration with position= may have moved it).
            if name in _order:
                _order.remove(name)
            if name in _DEFAULT_ORDER:  # a built-in outside the default order (dequant) stays outside it
                before = [n for n in _DEFAULT_ORDER[: _DEFAULT_ORDER.index(name)] if n in _order]
                _order.insert(_order.index(before[-1]) + 1 if before else 0, name)
        else:
            _targets.pop(name, None)
            if name in _order:
                _order.remove(name)
    _changed()


def backend_names() -> tuple[str, ...]:
    """Every registered name: the auto order first, then the rest alphabetically."""
    with _lock:
        return tuple(_order) + tuple(sorted(set(_targets) - set(_order)))


def builtin_modules() -> dict[str, str]:
    """name -> module path of the backends that ship with the project (the README documents these)."""
    return dict(_BUILTIN)


def default_order() -> tuple[str, ...]:
    with _lock:
        return tuple(_order)


def unknown_backend_message(name: str) -> str:
    return f"backend: unknown backend {name!r}; valid options are 'auto' or one of {list(backend_names())}"


def get_backend(name: str) -> "BackendEntry | str":
    """The loaded entry for `name`, or the text of the error that kept its module from loading.

    Raises ValueError for a name that was never registered.
    """
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _load_errors:
            return _load_errors[name]
        if name not in _targets:
            raise ValueError(unknown_backend_message(name))
        target = _targets[name]
        if isinstance(target, BackendEntry):
            _loaded[name] = target
            return target
        try:
            mod = importlib.import_module(target)
            entry = BackendEntry(name, mod.CAPABILITY, mod.forward)
        except Exception as exc:  # the backend module itself is broken or missing: a reason, not a crash
            _load_errors[name] = f"backend module {target!r} failed to load: {type(exc).__name__}: {exc}"
            return _load_errors[name]
        _loaded[name] = entry
        return entry
