"""A multi-backend attention dispatcher: correct numbers or a clear refusal.

    import dispatch
    cfg = dispatch.AttentionConfig(num_heads=32, num_kv_heads=8, head_size=128)
    out = dispatch.attention(q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, config=cfg)

Importing this package loads no kernel: backends are imported when first selected.
"""

from dispatch.api import attention
from dispatch.capabilities import Capability, DeviceInfo
from dispatch.config import AttentionConfig, KVQuantMode
from dispatch.errors import InputError, UnsupportedConfigError
from dispatch.files import config_for_layer, load_config, load_file, load_profiles
from dispatch.overrides import use
from dispatch.registry import backend_names, default_order, register_backend, unregister_backend
from dispatch.selector import BackendReport, Explanation, Plan, clear_cache, explain, select

__all__ = [
    "attention",
    "select",
    "explain",
    "register_backend",
    "unregister_backend",
    "backend_names",
    "default_order",
    "clear_cache",
    "use",
    "load_config",
    "load_profiles",
    "load_file",
    "config_for_layer",
    "AttentionConfig",
    "KVQuantMode",
    "Capability",
    "DeviceInfo",
    "Plan",
    "Explanation",
    "BackendReport",
    "InputError",
    "UnsupportedConfigError",
    "__version__",
]


def _version() -> str:
    """The installed distribution's version; from a source tree with no install (PYTHONPATH), the one
    pyproject.toml declares."""
    import importlib.metadata

    try:
        return importlib.metadata.version("attention-dispatch")
    except importlib.metadata.PackageNotFoundError:
        import pathlib
        import tomllib

        try:
            pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


def __getattr__(name: str):
    # Computed on first use, not at import: reading package metadata costs milliseconds.
    if name == "__version__":
        globals()["__version__"] = version = _version()
        return version
    raise AttributeError(f"module 'dispatch' has no attribute {name!r}")
