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
from typing import Callable, Optional

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
    # Backends that must be installed for the measurement to hold (dequant was timed with FlashAttention 4
    # inside; with the Triton kernel inside it only adds work). Without them the rule does not apply.
    needs: tuple[str, ...] = ()

    def matches(self, config: AttentionConfig, family: Optional[str], workload: Optional[str]) -> bool:
        return (self.gpu_family == family and self.workload == workload and self.query == _query_kind(config)
                and self.cache == _cache_kind(config))

    def __str__(self) -> str:
        return (f"{self.gpu_family} {self.workload}, {self.query} query, {self.cache} cache: "
                f"{' > '.join(self.order)} ({self.evidence})")


SPEED_RULES: tuple[SpeedRule, ...] = (
    SpeedRule("sm90", "prefill", "16-bit", "16-bit", ("flash_attn", "triton"),
              "H200, causal bf16 prefill, 32/8 heads, head size 128, block size 16: FA4 554 / 573 / 450 TFLOP/s "
              "vs triton 361 / 426 / 325 (4 x 4k / 1 x 16k / 2 prefills of 2k + 62 decodes); RESULTS.md, "
              "2026-12-01"),
    SpeedRule("sm90", "decode", "16-bit", "16-bit", ("triton", "flash_attn"),
              "H200, bf16 decode, block size 16: triton 0.506 ms vs FA4 0.588 ms (64 x 8k), 0.336 vs 0.541 ms "
              "(8 x 32k); RESULTS.md, 2026-12-01"),
    # Decode keeps the default order: dequantizing whole contexts costs more than reading them quantized
    # (64 x 8k fp8: dequant 1.70 ms vs triton 0.41 ms).
    SpeedRule("sm90", "prefill", "16-bit", "quantized", ("dequant", "triton"),
              "H200, causal prefill with a bf16 query, block size 16, TFLOP/s dequant (+FA4; decodes on triton "
              "from the cache) vs triton: 4 x 4k fp8 568 vs 297, fp8 per-token-head 555 vs 170, int8 per-token-head "
              "548 vs 162; 1 x 16k 669 / 653 / 630 vs 326 / 181 / 173; 2 prefills of 2k + 62 decodes 483 / 442 / "
              "453 vs 234 / 131 / 125 (FA4 on a bf16 cache: 560 / 568 / 449); RESULTS.md, 2026-12-01 (sixth "
              "session)", needs=("flash_attn",)),
)


def rule_for(config: AttentionConfig, device: DeviceInfo, workload: Optional[str],
             installed: Callable[[str], bool] = lambda name: True) -> Optional[SpeedRule]:
    """The first rule that matches (config, device, workload) and whose `needs` are `installed`, or None."""
    if workload is None:
        return None
    family = gpu_family(device)
    for rule in SPEED_RULES:
        if rule.matches(config, family, workload) and all(installed(name) for name in rule.needs):
            return rule
    return None
