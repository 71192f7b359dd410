"""Which correct backend is fastest, per GPU family and workload: measured data, not a heuristic.

`auto` normally walks the registry's order and takes the first backend that can
compute the config. When the caller passes ``max_query_len`` (a host-side bound
that engines already hold), the call has a *workload*: "decode" (at most
`DECODE_MAX_QUERY_LEN` query tokens per sequence) or "prefill". If a rule below
matches the device's GPU family, the workload and the kinds of query and cache,
`auto` walks that rule's order first (fastest measured first) and then the
rest of the default order; every backend still has to pass its capability
check, so a rule can only choose among correct backends, never add one.
Without the hint, or without a matching rule, selection is as before.

A named backend is never changed by these rules. `explain()` prints the rule
that applied and the measurements behind it, which come from
`python -m benchmarks.attention` on the GPU machine (benchmarks/RESULTS.md,
section named in each rule's `evidence`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dispatch.capabilities import DeviceInfo
from dispatch.config import AttentionConfig, KVQuantMode

__all__ = ["DECODE_MAX_QUERY_LEN", "WORKLOADS", "SpeedRule", "SPEED_RULES", "workload_of", "gpu_family",
           "rule_for"]

# At most this many query tokens per sequence is "decode" (or speculative decode of a few tokens): the same
# bound under which the Triton launcher picks decode tiles (backends/triton/launcher.py).
DECODE_MAX_QUERY_LEN = 4
WORKLOADS = ("decode", "prefill")


def workload_of(max_query_len: int) -> str:
    """'decode' or 'prefill' from a host-side bound on the longest query of a call."""
    return "decode" if max_query_len <= DECODE_MAX_QUERY_LEN else "prefill"


def gpu_family(device: DeviceInfo) -> Optional[str]:
    """'sm90' for a compute capability 9.0 device, the device type off CUDA ('cpu'), None when CUDA is
    asked for but absent."""
    if device.type != "cuda":
        return device.type
    if device.compute_capability is None:
        return None
    major, minor = device.compute_capability
    return f"sm{major}{minor}"


def _cache_kind(config: AttentionConfig) -> str:
    return "16-bit" if config.kv_quant_mode is KVQuantMode.NONE else "quantized"


def _query_kind(config: AttentionConfig) -> str:
    return "fp8" if config.q_is_fp8 else "16-bit"


@dataclass(frozen=True)
class SpeedRule:
    """On `gpu_family`, for `workload` with a `query`-kind query and a `cache`-kind KV cache, the
    backends in `order` ran fastest first; `evidence` gives the numbers and where they are recorded."""

    gpu_family: str
    workload: str
    query: str  # "16-bit" | "fp8"
    cache: str  # "16-bit" | "quantized"
    order: tuple[str, ...]
    evidence: str

    def matches(self, config: AttentionConfig, family: Optional[str], workload: Optional[str]) -> bool:
        return (self.gpu_family == family and self.workload == workload and self.query == _query_kind(config)
                and self.cache == _cache_kind(config))

    def __str__(self) -> str:
        return (f"{self.gpu_family} {self.workload}, {self.query} query, {self.cache} cache: "
                f"{' > '.join(self.order)} ({self.evidence})")


SPEED_RULES: tuple[SpeedRule, ...] = (
    SpeedRule("sm90", "prefill", "16-bit", "16-bit", ("flash_attn", "triton"),
              "H200, causal bf16 prefill, 32/8 heads, head size 128, block size 16: FA4 488-576 TFLOP/s vs "
              "triton 379-429 (0.745-0.78 x); RESULTS.md, 2026-11-27 third session"),
    SpeedRule("sm90", "decode", "16-bit", "16-bit", ("triton", "flash_attn"),
              "H200, bf16 decode 64 x 8192, block size 16: triton 0.570 ms vs FA4 0.592 ms (1.04 x); "
              "8 x 32768 0.390 vs 0.565 ms; RESULTS.md, 2026-11-27 third session"),
)


def rule_for(config: AttentionConfig, device: DeviceInfo, workload: Optional[str]) -> Optional[SpeedRule]:
    """The first rule that matches (config, device, workload), or None."""
    if workload is None:
        return None
    family = gpu_family(device)
    for rule in SPEED_RULES:
        if rule.matches(config, family, workload):
            return rule
    return None
