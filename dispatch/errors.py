"""The two errors a caller of the dispatcher can see.

Both derive from ValueError: an unsupported configuration and a bad argument
are problems with what the caller asked for, not unfinished code
(which is why neither is a NotImplementedError).
"""

from __future__ import annotations

__all__ = ["UnsupportedConfigError", "InputError"]


class UnsupportedConfigError(ValueError):
    """No backend (or not the backend that was named) can compute this config exactly.

    ``reasons`` maps each backend that was considered to the list of reasons
    it refused, in the order the backends were tried.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.reasons: dict[str, list[str]] = dict(reasons or {})


class InputError(ValueError):
    """A tensor or scale passed to ``attention()`` does not match the config.

    The message names the argument, what was expected and what came.
    """
