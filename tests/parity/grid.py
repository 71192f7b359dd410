"""The parity grid: factors, a deterministic all-pairs sample, and the inputs of each case.

Every factor a backend's capability can depend on is here. The full product is
thousands of cases, so by default the grid is an all-pairs covering array:
every pair of values of every two factors appears in at least one case
(greedy, deterministic, so the same cases run everywhere). `--parity-full`
runs the whole product.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from dispatch.config import AttentionConfig

# (label, config fields): each valid pairing of query dtype, cache dtype and quantization mode.
DTYPE_MODES: tuple[tuple[str, dict], ...] = (
    ("fp16", dict(q_dtype="float16", kv_cache_dtype="float16", kv_quant_mode="NONE")),
    ("bf16", dict(q_dtype="bfloat16", kv_cache_dtype="bfloat16", kv_quant_mode="NONE")),
    ("fp8q-e4m3-pt", dict(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR")),
    ("fp16q-e4m3-pt", dict(q_dtype="float16", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR")),
    ("bf16q-e5m2-pt", dict(q_dtype="bfloat16", kv_cache_dtype="float8_e5m2", kv_quant_mode="FP8_PER_TENSOR")),
    ("bf16q-e4m3-pth", dict(q_dtype="bfloat16", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TOKEN_HEAD")),
    ("fp16q-e5m2-pth", dict(q_dtype="float16", kv_cache_dtype="float8_e5m2", kv_quant_mode="FP8_PER_TOKEN_HEAD")),
    ("fp16q-int8-pth", dict(q_dtype="float16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD")),
    ("bf16q-int8-pth", dict(q_dtype="bfloat16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD")),
)
FEATURES: tuple[tuple[str, dict], ...] = (
    ("causal", dict(causal=True)),
    ("noncausal", dict(causal=False)),
    ("window", dict(sliding_window=19)),
    ("softcap", dict(logits_soft_cap=5.0)),
    ("alibi", dict(use_alibi=True)),
    ("sinks", dict(use_sinks=True)),
    ("fp8out", dict(out_dtype="float8_e4m3fn")),
)
# Batches: (label, q_lens, kv_lens) with lengths at page (16) and tile edges and a one-token sequence.
BATCHES: tuple[tuple[str, list[int], list[int]], ...] = (
    ("decode", [1, 1, 1, 1], [1, 16, 17, 129]),
    ("prefill", [1, 15, 33], [1, 15, 33]),
    ("mixed", [1, 5, 16, 1], [128, 17, 16, 31]),
)
NUM_HEADS = 8


def factors(device_type: str) -> dict[str, tuple]:
    return {
        "dtype_mode": DTYPE_MODES,
        "feature": FEATURES,
        "gqa": (1, 4, 8),
        "head_size": (64, 80, 128),
        "block_size": (16, 32) if device_type == "cpu" else (16, 64, 128),
        "batch": BATCHES,
    }


@dataclass(frozen=True)
class Case:
    dtype_mode: tuple[str, dict]
    feature: tuple[str, dict]
    gqa: int
    head_size: int
    block_size: int
    batch: tuple[str, list, list]

    @property
    def id(self) -> str:
        return (f"{self.dtype_mode[0]}-{self.feature[0]}-gqa{self.gqa}-h{self.head_size}-bs{self.block_size}"
                f"-{self.batch[0]}")

    def config(self, backend: str) -> AttentionConfig:
        return AttentionConfig(
            num_heads=NUM_HEADS, num_kv_heads=NUM_HEADS // self.gqa, head_size=self.head_size,
            block_size=self.block_size, backend=backend, **self.dtype_mode[1], **self.feature[1],
        )

    @property
    def q_lens(self) -> list[int]:
        return self.batch[1]

    @property
    def kv_lens(self) -> list[int]:
        return self.batch[2]


def all_pairs(values: dict[str, tuple]) -> list[dict[str, Any]]:
    """A deterministic greedy covering array: every value pair of every two factors appears."""
    names = list(values)
    sizes = [len(values[n]) for n in names]
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(names)), 2)
                 for a in range(sizes[i]) for b in range(sizes[j])}
    rows: list[list[int]] = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row: dict[int, int] = {i: a, j: b}
        for k in range(len(names)):
            if k in row:
                continue

            def gain(v: int) -> int:
                return sum(((min(k, m), v if k < m else row[m], max(k, m), row[m] if k < m else v) in uncovered)
                           for m in row)

            row[k] = max(range(sizes[k]), key=lambda v: (gain(v), -v))
        full = [row[k] for k in range(len(names))]
        rows.append(full)
        for p, q in itertools.combinations(range(len(names)), 2):
            uncovered.discard((p, full[p], q, full[q]))
    return [{n: values[n][v] for n, v in zip(names, r)} for r in rows]


def cases(device_type: str, full: bool = False) -> list[Case]:
    values = factors(device_type)
    if full:
        rows = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    else:
        rows = all_pairs(values)
    return [Case(**row) for row in rows]
