"""Choosing a backend: `select()` decides, `explain()` shows why.

Both read only the capability records (through `dispatch.capabilities.reasons`)
and the registry's order, so what `explain()` prints is exactly what
`select()` does. A named backend either fits or is refused with its reasons;
it is never swapped for another. `auto` takes the first backend in the order
with no reasons, and the decision is logged once per (config, device).
Decisions are cached per (config, device); `register_backend()` clears the cache.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from dispatch import registry
from dispatch.capabilities import Capability, DeviceInfo, missing_modules, reasons, resolve_device
from dispatch.config import AttentionConfig
from dispatch.errors import UnsupportedConfigError
from dispatch.overrides import Override, check_backend_name, current_override
from dispatch.speed import WORKLOADS, SpeedRule, rule_for

__all__ = ["Plan", "BackendReport", "Explanation", "select", "explain", "clear_cache"]

logger = logging.getLogger("dispatch")

DeviceLike = Union[str, torch.device, DeviceInfo, None]


@dataclass(frozen=True)
class BackendReport:
    """One backend's verdict on one (config, device)."""

    name: str
    available: bool  # its module and required modules import here
    supported: bool  # available, and no reason against this config on this device
    reasons: tuple[str, ...]
    description: str = ""  # the capability's own description (names the version found, for flash_attn)


@dataclass(frozen=True)
class Explanation:
    """Every registered backend's verdict, in selection order, and the one that would run."""

    config: AttentionConfig
    device: DeviceInfo
    requested: str  # config.backend: "auto" or a name
    order: tuple[str, ...]  # what auto walks
    backends: tuple[BackendReport, ...]
    chosen: Optional[str]
    workload: Optional[str] = None  # "decode" | "prefill" when the caller gave max_query_len
    speed_rule: Optional[SpeedRule] = None  # the measured rule that ordered auto's walk, if any

    def __str__(self) -> str:
        lines = [
            f"config:  {self.config.summary()}",
            f"device:  {self.device}",
            f"backend: {self.requested}" + (f" (order: {', '.join(self.order)})" if self.requested == "auto" else ""),
        ]
        if self.workload is not None:
            lines.append(f"workload: {self.workload}; speed rule: {self.speed_rule}" if self.speed_rule
                         else f"workload: {self.workload}; no measured speed rule for this device and config "
                              "(auto walks the default order)")
        lines.append("")
        width = max([len(b.name) for b in self.backends] + [7])
        lines.append(f"   {'backend':<{width}}  {'available':<9}  {'supported':<9}  reasons")
        for b in self.backends:
            mark = "=>" if b.name == self.chosen else "  "
            first, *rest = b.reasons or ("-",)
            lines.append(f"{mark} {b.name:<{width}}  {'yes' if b.available else 'no':<9}  "
                         f"{'yes' if b.supported else 'no':<9}  {first}")
            lines.extend(f"   {'':<{width}}  {'':<9}  {'':<9}  {r}" for r in rest)
        lines.append("")
        lines.extend(f"{b.name}: {b.description}" for b in self.backends if b.description)
        lines.append(f"chosen: {self.chosen}" if self.chosen else "chosen: none (see the reasons above)")
        return "\n".join(lines)

    def report(self, name: str) -> BackendReport:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "config": self.config.model_dump(mode="json"),
            "device": str(self.device),
            "requested": self.requested,
            "order": list(self.order),
            "chosen": self.chosen,
            "workload": self.workload,
            "speed_rule": str(self.speed_rule) if self.speed_rule else None,
            "backends": [
                {"name": b.name, "available": b.available, "supported": b.supported, "reasons": list(b.reasons),
                 "description": b.description}
                for b in self.backends
            ],
        }


@dataclass(frozen=True)
class Plan:
    """The backend chosen for one (config, device): call `forward` to run it directly."""

    name: str
    config: AttentionConfig
    device: DeviceInfo
    capability: Capability
    backend_forward: Callable
    skipped: tuple[tuple[str, tuple[str, ...]], ...] = ()  # backends auto passed over, with reasons
    workload: Optional[str] = None
    speed_rule: Optional[SpeedRule] = None  # the rule that ordered auto's walk, if any

    def forward(self, q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, **kwargs):
        """Run the backend with `attention()`'s keywords (minus config); no argument checks."""
        return self.backend_forward(
            q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, config=self.config, **kwargs
        )


def _report(name: str, config: AttentionConfig, device: DeviceInfo) -> BackendReport:
    entry = registry.get_backend(name)
    if isinstance(entry, str):  # the backend's own module failed to load
        return BackendReport(name, available=False, supported=False, reasons=(entry,))
    why = reasons(entry.capability, config, device)
    available = not missing_modules(entry.capability.required_modules)
    description = entry.capability.description
    if not why and entry.capability.plan_note is not None:
        description += f" [{entry.capability.plan_note(config, device)}]"
    return BackendReport(name, available=available, supported=not why, reasons=tuple(why), description=description)


def _installed(name: str) -> bool:
    """Whether backend `name` is registered and its modules import here (a speed rule's `needs`)."""
    if name not in registry.backend_names():
        return False
    entry = registry.get_backend(name)
    return not isinstance(entry, str) and not missing_modules(entry.capability.required_modules)


def _effective(config: AttentionConfig, override: Override, device: DeviceInfo,
               workload: Optional[str]) -> tuple[str, tuple[str, ...], Optional[SpeedRule]]:
    """(backend requested, order auto walks, the speed rule behind that order) once a `dispatch.use()`
    scope and the workload are applied.

    A config that names a backend keeps it; `use(backend=...)` steers only "auto". A `use(order=...)`
    scope wins over the speed rules (the caller said which order); otherwise a measured rule for
    (device, config, workload) puts its backends first (`dispatch.speed`).
    Unknown names raise UnsupportedConfigError listing the valid ones.
    """
    if workload is not None and workload not in WORKLOADS:
        raise ValueError(f"workload: expected one of {list(WORKLOADS)} or None, got {workload!r}")
    requested = config.backend if config.backend != "auto" else (override.backend or "auto")
    rule = None
    if override.order is not None:
        order = tuple(override.order)
    else:
        order = registry.default_order()
        rule = rule_for(config, device, workload, _installed) if requested == "auto" else None
        if rule is not None:
            names = registry.backend_names()
            first = tuple(name for name in rule.order if name in names)
            order = first + tuple(name for name in order if name not in first)
    if config.backend == "auto" and override.backend is not None:  # names DISPATCH_BACKEND or use()
        check_backend_name(override.backend, override.backend_source)
    names = registry.backend_names()
    for name in (requested, *order):
        if name != "auto" and name not in names:
            raise UnsupportedConfigError(registry.unknown_backend_message(name))
    return requested, tuple(order), rule


def _walk(requested: str, order: Sequence[str],
          report_of: Callable[[str], BackendReport]) -> tuple[Optional[BackendReport], list[BackendReport]]:
    """The selection rule, shared by select() and explain(): (the chosen backend's report or None,
    the reports of the backends refused on the way). A named backend is the only one tried."""
    if requested != "auto":
        report = report_of(requested)
        return (report, []) if report.supported else (None, [report])
    skipped = []
    for name in order:
        report = report_of(name)
        if report.supported:
            return report, skipped
        skipped.append(report)
    return None, skipped


def explain(config: AttentionConfig, device: DeviceLike = None, workload: Optional[str] = None) -> Explanation:
    """Every registered backend, supported or not, with all its reasons; with a `workload` ("decode" or
    "prefill", what attention()'s max_query_len hint gives), also the speed rule that orders auto."""
    info = resolve_device(device)
    requested, order, rule = _effective(config, current_override(), info, workload)
    reports = tuple(_report(name, config, info) for name in registry.backend_names())
    by_name = {r.name: r for r in reports}
    chosen, _ = _walk(requested, order, by_name.__getitem__)
    return Explanation(config, info, requested, order, reports, chosen.name if chosen else None, workload, rule)


def format_refusal(headline: str, config: AttentionConfig, device: DeviceInfo, refused: Sequence[BackendReport]) -> str:
    """The one formatter for every refusal: the config, then each backend tried and its reasons."""
    lines = [headline, f"  config: {config.summary()}", f"  device: {device}"]
    for report in refused:
        lines.append(f"  `{report.name}` is not supported because:")
        lines.extend(f"    - {reason}" for reason in report.reasons)
    return "\n".join(lines)


_cache: dict[tuple[AttentionConfig, DeviceInfo, Override, Optional[str]], Plan] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


registry.on_change(clear_cache)


def _decide(config: AttentionConfig, device: DeviceInfo, override: Override, workload: Optional[str]) -> Plan:
    """The decision itself: pure, no logging, no caching."""
    requested, order, rule = _effective(config, override, device, workload)
    chosen, refused = _walk(requested, order, lambda name: _report(name, config, device))
    if chosen is None:
        headline = (f"Backend {requested!r} cannot run this config (no fallback for a named backend):"
                    if requested != "auto" else "No attention backend can run this config:")
        raise UnsupportedConfigError(format_refusal(headline, config, device, refused),
                                     {r.name: list(r.reasons) for r in refused})
    entry = registry.get_backend(chosen.name)
    return Plan(entry.name, config, device, entry.capability, entry.forward,
                tuple((r.name, r.reasons) for r in refused), workload, rule)


def select(config: AttentionConfig, device: DeviceLike = None, workload: Optional[str] = None) -> Plan:
    """The backend `config.backend` names (or `auto` picks) for `device`, as a runnable Plan.

    Inside `with dispatch.use(backend=..., order=[...])`, an "auto" config runs the scoped
    backend, and auto walks the scoped order. With a `workload` ("decode" or "prefill"), auto
    first tries the backends a measured speed rule ranks fastest (`dispatch.speed`). Raises
    UnsupportedConfigError with every reason when no backend fits.
    """
    info = resolve_device(device)
    override = current_override()
    key = (config, info, override, workload)
    plan = _cache.get(key)
    if plan is not None:
        return plan
    plan = _decide(config, info, override, workload)
    with _cache_lock:
        first = key not in _cache
        plan = _cache.setdefault(key, plan)
    if first:
        _log_choice(plan)
    return plan


def _log_choice(plan: Plan) -> None:
    workload = f" ({plan.workload}; speed rule: {plan.speed_rule})" if plan.speed_rule else ""
    if plan.skipped:
        why = "; ".join(f"{name}: {', '.join(rs)}" for name, rs in plan.skipped)
        logger.info("attention backend %r chosen for [%s] on %s%s; skipped %s", plan.name,
                    plan.config.summary(), plan.device, workload, why)
    else:
        logger.info("attention backend %r chosen for [%s] on %s%s", plan.name, plan.config.summary(), plan.device,
                    workload)
