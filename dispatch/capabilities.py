"""What a backend declares it can compute: data, not code.

Each backend module defines one `Capability`. Selection, `explain()`,
``python -m dispatch list``, the README's support table and the parity tests
all read these records, so they cannot disagree. `reasons()` turns
(capability, config, device) into every reason the backend cannot run the
config, never stopping at the first, each naming the field, the value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from dispatch.config import AttentionConfig, KVQuantMode
from dispatch.errors import InputError

__all__ = ["Capability", "DeviceInfo", "resolve_device", "reasons", "missing_modules", "FEATURES"]

# Feature flags a Capability declares, with the config test that needs each.
FEATURES: dict[str, Callable[[AttentionConfig], bool]] = {
    "causal": lambda c: c.causal,
    "non_causal": lambda c: not c.causal,
    "sliding_window": lambda c: c.sliding_window is not None,
    "softcap": lambda c: c.logits_soft_cap is not None,
    "alibi": lambda c: c.use_alibi,
    "sinks": lambda c: c.use_sinks,
}
# The config field behind each feature, for reasons that name it.
_FEATURE_FIELDS = {
    "causal": "causal",
    "non_causal": "causal",
    "sliding_window": "sliding_window",
    "softcap": "logits_soft_cap",
    "alibi": "use_alibi",
    "sinks": "use_sinks",
}


@dataclass(frozen=True)
class DeviceInfo:
    """The facts about a device that decide what can run on it (the cache key's second half)."""

    type: str  # "cpu" | "cuda"
    index: Optional[int] = None
    name: str = ""
    compute_capability: Optional[tuple[int, int]] = None  # CUDA only
    # Triton decides at import whether kernels run compiled or in its CPU interpreter.
    triton_interpret: bool = False

    def __str__(self) -> str:
        if self.type == "cuda":
            cc = ".".join(map(str, self.compute_capability or ()))
            return f"cuda:{self.index} ({self.name}, sm {cc})"
        return self.type


@functools.lru_cache(maxsize=None)
def _resolve_device_cached(device: torch.device, triton_interpret: bool) -> DeviceInfo:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return DeviceInfo(type="cuda", index=device.index, name="unavailable", triton_interpret=triton_interpret)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceInfo(
            type="cuda",
            index=index,
            name=torch.cuda.get_device_name(index),
            compute_capability=tuple(torch.cuda.get_device_capability(index)),
            triton_interpret=triton_interpret,
        )
    return DeviceInfo(type=device.type, name=device.type, triton_interpret=triton_interpret)


def resolve_device(device: Union[str, torch.device, DeviceInfo, None] = None) -> DeviceInfo:
    """'cuda', torch.device('cuda:1') or None (cuda if available, else cpu) -> DeviceInfo."""
    if isinstance(device, DeviceInfo):
        return device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError):  # torch's own message lists every device type it knows, not ours
        raise InputError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    return _resolve_device_cached(torch_device, interpret)


@dataclass(frozen=True)
class Capability:
    """Everything one backend declares it supports.

    A field left at its default means "no restriction" only where that is
    stated; features default to unsupported, so a backend claims exactly
    what it has been tested to compute.
    """

    description: str
    q_dtypes: frozenset[str]
    kv_cache_dtypes: frozenset[str]
    out_dtypes: frozenset[str]
    kv_quant_modes: frozenset[KVQuantMode]
    devices: frozenset[str]
    # head sizes: an explicit set, or None with max_head_size / head_size_multiple as the rule
    head_sizes: Optional[frozenset[int]] = None
    max_head_size: Optional[int] = None
    head_size_multiple: int = 1
    # block sizes: an explicit set, or None with block_size_multiple as the rule
    block_sizes: Optional[frozenset[int]] = None
    block_size_multiple: int = 1
    features: frozenset[str] = frozenset({"causal", "non_causal"})
    # Minimum CUDA compute capability overall, and per dtype where a dtype needs more (fp8: 8.9).
    min_compute_capability: Optional[tuple[int, int]] = None
    min_compute_capability_by_dtype: tuple[tuple[str, tuple[int, int]], ...] = ()
    # Modules that must import for the backend to run (checked at selection, never at `import dispatch`).
    required_modules: tuple[str, ...] = ()
    # False when forward() reads a GPU value on the host (not capturable in a CUDA graph).
    cuda_graph_safe: bool = True
    # Arguments (dispatch.contract names) this backend needs fully contiguous, beyond the contract's own
    # stride rules (which let views into an engine's buffers through). attention() refuses a strided one
    # by name rather than copying it.
    contiguous_arguments: frozenset[str] = frozenset()
    # With an fp8 query, the format P (the softmax probabilities) is rounded to before the PV dot,
    # or None when P stays in higher precision. Tests and the selftest derive their tolerance from it.
    fp8_query_p_dtype: Optional[str] = None
    # Rules the fields above cannot express; each returns a list of reasons.
    extra_rules: tuple[Callable[[AttentionConfig, DeviceInfo], list[str]], ...] = field(default=(), compare=False)
    # What a supported (config, device) will actually run, where the record alone cannot say (the dequant
    # backend's inner backend); explain() appends it to the description.
    plan_note: Optional[Callable[[AttentionConfig, DeviceInfo], str]] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"features: unknown {sorted(unknown)}; known: {sorted(FEATURES)}")

    def replace(self, **changes) -> "Capability":
        return dataclasses.replace(self, **changes)

    def supports_head_size(self, head_size: int) -> bool:
        if self.head_sizes is not None:
            return head_size in self.head_sizes
        if self.max_head_size is not None and head_size > self.max_head_size:
            return False
        return head_size % self.head_size_multiple == 0

    def head_size_rule(self) -> str:
        if self.head_sizes is not None:
            return f"{{{', '.join(map(str, sorted(self.head_sizes)))}}}"
        rule = f"multiple of {self.head_size_multiple}" if self.head_size_multiple > 1 else "any"
        if self.max_head_size is not None:
            rule += f", at most {self.max_head_size}"
        return rule

    def supports_block_size(self, block_size: int) -> bool:
        if self.block_sizes is not None:
            return block_size in self.block_sizes
        return block_size % self.block_size_multiple == 0

    def block_size_rule(self) -> str:
        if self.block_sizes is not None:
            return f"{{{', '.join(map(str, sorted(self.block_sizes)))}}}"
        return f"multiple of {self.block_size_multiple}" if self.block_size_multiple > 1 else "any"

    def min_compute_capability_for(self, config: AttentionConfig) -> Optional[tuple[int, int]]:
        """The highest minimum among the overall one and those of the dtypes the config uses."""
        needed = self.min_compute_capability
        used = {config.q_dtype, config.kv_cache_dtype, config.out_dtype}
        for dtype, cc in self.min_compute_capability_by_dtype:
            if dtype in used and (needed is None or cc > needed):
                needed = cc
        return needed


def _set(values) -> str:
    return "{" + ", ".join(repr(str(v)) for v in sorted(values, key=str)) + "}"


@functools.lru_cache(maxsize=None)
def missing_modules(modules: tuple[str, ...]) -> tuple[str, ...]:
    """One reason per module that fails to import, carrying the ImportError's own text."""
    problems = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken install raises more than ImportError (OSError, RuntimeError)
            problems.append(f"module {name!r} not importable: {type(exc).__name__}: {exc}")
    return tuple(problems)


def reasons(capability: Capability, config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """Every reason `capability` cannot run `config` on `device`; empty when it can."""
    out: list[str] = list(missing_modules(capability.required_modules))
    if device.type not in capability.devices:
        out.append(f"device={device.type!r} not in {_set(capability.devices)}")
    if device.type == "cuda":
        needed = capability.min_compute_capability_for(config)
        if device.compute_capability is None:
            out.append("device='cuda' but CUDA is not available in this process")
        elif needed is not None and device.compute_capability < needed:
            have = ".".join(map(str, device.compute_capability))
            out.append(
                f"compute capability {have} < {'.'.join(map(str, needed))} required for "
                f"q_dtype={config.q_dtype}, kv_cache_dtype={config.kv_cache_dtype}, out_dtype={config.out_dtype}"
            )
    if config.q_dtype not in capability.q_dtypes:
        out.append(f"q_dtype={config.q_dtype!r} not in {_set(capability.q_dtypes)}")
    if config.kv_cache_dtype not in capability.kv_cache_dtypes:
        out.append(f"kv_cache_dtype={config.kv_cache_dtype!r} not in {_set(capability.kv_cache_dtypes)}")
    if config.out_dtype not in capability.out_dtypes:
        out.append(f"out_dtype={config.out_dtype!r} not in {_set(capability.out_dtypes)}")
    if config.kv_quant_mode not in capability.kv_quant_modes:
        out.append(f"kv_quant_mode={config.kv_quant_mode.value} not in {_set(m.value for m in capability.kv_quant_modes)}")
    if not capability.supports_head_size(config.head_size):
        out.append(f"head_size={config.head_size} not supported (allowed: {capability.head_size_rule()})")
    if not capability.supports_block_size(config.block_size):
        out.append(f"block_size={config.block_size} not supported (allowed: {capability.block_size_rule()})")
    for feature, used in FEATURES.items():
        if used(config) and feature not in capability.features:
            name = _FEATURE_FIELDS[feature]
            out.append(
                f"{name}={getattr(config, name)!r} not supported: feature {feature!r} not in {_set(capability.features)}"
            )
    for rule in capability.extra_rules:
        out.extend(rule(config, device))
    return out

