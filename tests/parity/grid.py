"""The parity grid: factors, a deterministic all-pairs sample, and the inputs of each case.

Every factor a backend's capability can depend on is here; the values of the
dtype, feature and length factors are named entries of the shared case table
(dispatch/cases.py), so a case id reads like the rest of the project's
(`fp8q-fp8kv-window-gqa4-h128-bs16-decode`). The full product is
thousands of cases, so by default the grid is an all-pairs covering array:
every pair of values of every two factors appears in at least one case
(greedy, deterministic, so the same cases run everywhere). `--parity-full`
runs the whole product.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from dispatch import cases as table
from dispatch.config import AttentionConfig

# (label, config fields): the case table's valid pairings of query dtype, cache dtype and mode, and its
# named feature settings (dispatch/cases.py).
DTYPE_MODES: tuple[tuple[str, dict], ...] = tuple((name, table.DTYPE_MODES[name]) for name in table.PARITY_DTYPE_MODES)
FEATURES: tuple[tuple[str, dict], ...] = tuple(table.FEATURES.items())
# Length sets: the table's "parity" cases (decode, prefill, mixed; lengths at page and tile edges).
BATCHES: tuple[table.Case, ...] = table.cases("parity")
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
    batch: table.Case  # lengths only

    @property
    def id(self) -> str:
        return (f"{self.dtype_mode[0]}-{self.feature[0]}-gqa{self.gqa}-h{self.head_size}-bs{self.block_size}"
                f"-{self.batch.name}")

    def config(self, backend: str) -> AttentionConfig:
        return AttentionConfig(
            num_heads=NUM_HEADS, num_kv_heads=NUM_HEADS // self.gqa, head_size=self.head_size,
            block_size=self.block_size, backend=backend, **self.dtype_mode[1], **self.feature[1],
            **self.batch.fields,
        )

    @property
    def q_lens(self) -> list[int]:
        return list(self.batch.q_lens)

    @property
    def kv_lens(self) -> list[int]:
        return list(self.batch.kv_lens)


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
