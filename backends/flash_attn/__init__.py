"""The flash-attn backend: FlashAttention 4, 3 or 2, whichever is installed, behind one call.

When this module is first loaded it looks, without importing any of them, for
the three FlashAttention packages and takes the newest one found:

    FA4  flash_attn.cute       PyPI flash-attn-4   Hopper (9.x) and Blackwell (10.x, 11.x)   fa4.py
    FA3  flash_attn_interface  built from hopper/  Hopper (9.x)                             fa3.py
    FA2  flash_attn            PyPI flash-attn     Ampere (8.0) and newer                   fa2.py

`CAPABILITY` is that version's record, its description naming the version
found ("FlashAttention 4 (flash-attn-4 4.0.0b36, flash_attn.cute)"), and
`forward` its adapter. Each version's record is plain data
(`FA4_CAPABILITY`, `FA3_CAPABILITY`, `FA2_CAPABILITY`), and each adapter
module is a complete backend of its own, so where two versions are installed
the other one can be registered by name, e.g.
``register_backend("flash_attn2", module="backends.flash_attn.fa2")``.

With none installed, `CAPABILITY` is FA4's record with one more reason:
selection reports "module 'flash_attn.cute' not importable:
ModuleNotFoundError ..." and how to install it, a config that names
``backend="flash_attn"`` raises UnsupportedConfigError, and ``auto`` moves on.

Verified on hardware: FA4 (flash-attn-4 4.0.0b36) on an H100, by
tests/backends/test_flash_attn.py. FA3 and FA2 cannot be installed on the
machines this project is tested on (FA3 has no wheel on the public index, FA2
builds from source); their adapters follow the documented signatures, cited
in fa3.py and fa2.py, and their GPU tests run only where they import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

from backends.flash_attn import fa2, fa3, fa4
from dispatch.capabilities import Capability, DeviceInfo
from dispatch.config import AttentionConfig

__all__ = [
    "CAPABILITY",
    "forward",
    "FA4_CAPABILITY",
    "FA3_CAPABILITY",
    "FA2_CAPABILITY",
    "Installation",
    "INSTALLED",
    "find_installed",
    "choose",
]

FA4_CAPABILITY = fa4.CAPABILITY
FA3_CAPABILITY = fa3.CAPABILITY
FA2_CAPABILITY = fa2.CAPABILITY
# The README's support table shows every version's record, whatever is installed where it is generated.
DOCUMENTED_CAPABILITIES = {
    "flash_attn (FA4)": FA4_CAPABILITY,
    "flash_attn (FA3)": FA3_CAPABILITY,
    "flash_attn (FA2)": FA2_CAPABILITY,
}

INSTALL_HINT = "install FlashAttention 4 with pip install 'attention-dispatch[flash]' (needs a CUDA build of torch)"


@dataclass(frozen=True)
class Installation:
    """One FlashAttention version found on this machine."""

    major: int  # 4, 3 or 2
    module: str  # what it is imported as
    distribution: str  # its package name
    version: Optional[str]  # the installed distribution's version, None when no metadata says

    def describe(self) -> str:
        return f"FlashAttention {self.major} ({self.distribution} {self.version or 'version unknown'}, {self.module})"


def _package_dirs(name: str) -> list[str]:
    # find_spec of a top-level name locates it without running its __init__ (FA2's imports CUDA kernels).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec is not None else []


def _package_has(package: str, relative_path: str) -> bool:
    return any(os.path.isfile(os.path.join(d, relative_path)) for d in _package_dirs(package))


def _top_level_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _distribution_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def find_installed() -> tuple[Installation, ...]:
    """Every FlashAttention version present, newest first; imports none of them."""
    found = []
    if _package_has("flash_attn", os.path.join("cute", "interface.py")):
        found.append(Installation(4, fa4.MODULE, fa4.DISTRIBUTION, _distribution_version(fa4.DISTRIBUTION)))
    if _top_level_exists(fa3.MODULE):
        found.append(Installation(3, fa3.MODULE, fa3.DISTRIBUTIONS[0], _distribution_version(*fa3.DISTRIBUTIONS)))
    if _package_has("flash_attn", "flash_attn_interface.py"):
        found.append(Installation(2, "flash_attn", fa2.DISTRIBUTIONS[0], _distribution_version(*fa2.DISTRIBUTIONS)))
    return tuple(found)


def _release(version: Optional[str]) -> Optional[tuple[int, ...]]:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return tuple(int(part) for part in match.groups()) if match else None


def _not_installed(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    return [
        f"no FlashAttention installed (looked for flash_attn.cute, flash_attn_interface, flash_attn): {INSTALL_HINT}"
    ]


def _too_old(installation: Installation, minimum: tuple[int, ...]) -> Callable[[AttentionConfig, DeviceInfo], list]:
    def rule(config: AttentionConfig, device: DeviceInfo) -> list[str]:
        wanted = ".".join(map(str, minimum))
        return [f"{installation.distribution} {installation.version} is older than {wanted}, the first release "
                "whose flash_attn_varlen_func takes block_table and softcap"]

    return rule


_ADAPTERS = {4: fa4, 3: fa3, 2: fa2}


def choose(installed: tuple[Installation, ...]) -> tuple[Capability, Callable]:
    """(capability, forward) of the newest installed version, or FA4's record that explains its absence."""
    if not installed:
        return (
            FA4_CAPABILITY.replace(
                description=f"FlashAttention: not installed; {INSTALL_HINT}",
                extra_rules=(_not_installed, *FA4_CAPABILITY.extra_rules),
            ),
            fa4.forward,
        )
    newest = installed[0]
    adapter = _ADAPTERS[newest.major]
    capability = adapter.CAPABILITY.replace(description=newest.describe())
    release = _release(newest.version)
    if newest.major == 2 and release is not None and release < fa2.MINIMUM_VERSION:
        capability = capability.replace(extra_rules=(*capability.extra_rules, _too_old(newest, fa2.MINIMUM_VERSION)))
    return capability, adapter.forward


INSTALLED: tuple[Installation, ...] = find_installed()
CAPABILITY, forward = choose(INSTALLED)
