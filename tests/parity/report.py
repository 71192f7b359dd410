"""Collects parity results during a pytest session and writes them as a markdown report."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from dispatch import registry


@dataclass(frozen=True)
class ParityResult:
    device: str
    backend: str
    case: str
    status: str  # "pass" | "refused" | "fail"
    ratio: Optional[float]  # backend error / same-precision error
    detail: str


RESULTS: list[ParityResult] = []


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    for distribution in ("triton", "flash-attn-4", "flash-attn"):
        try:
            parts.append(f"{distribution} {version(distribution)}")
        except PackageNotFoundError:
            parts.append(f"{distribution} not installed")
    return ", ".join(parts)


def _commit() -> str:
    # A copy of the tree without .git (a GPU machine) passes the commit in DISPATCH_COMMIT.
    if os.environ.get("DISPATCH_COMMIT"):
        return os.environ["DISPATCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return device


def write_report(path: str, results: list[ParityResult] = RESULTS) -> None:
    lines = [
        "# Parity report",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- commit: {_commit()}",
        f"- versions: {_versions()}",
        "- cell: `pass r` / `FAIL r` where r = max |backend - oracle| / max |same-precision - oracle|"
        " (pass needs r <= k, k = 2, or 3 for softcap and decode, plus an output-rounding floor);"
        " `refused` = the backend declares no support and an explicit request raised UnsupportedConfigError",
        "",
    ]
    by_device = defaultdict(list)
    for r in results:
        by_device[r.device].append(r)
    for device, rows in by_device.items():
        backends = [b for b in registry.backend_names() if any(r.backend == b for r in rows)]
        cases = list(dict.fromkeys(r.case for r in rows))
        cell = {(r.case, r.backend): r for r in rows}
        lines += [f"## {_device_name(device)}", ""]
        counts = {b: Counter(r.status for r in rows if r.backend == b) for b in backends}
        lines.append("| backend | pass | refused | fail | worst ratio |")
        lines.append("|---|---|---|---|---|")
        for b in backends:
            ratios = [r.ratio for r in rows if r.backend == b and r.ratio is not None]
            worst = f"{max(ratios):.2f}" if ratios else "-"
            lines.append(f"| `{b}` | {counts[b]['pass']} | {counts[b]['refused']} | {counts[b]['fail']} | {worst} |")
        lines += ["", "| case | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
        for case in cases:
            cells = []
            for b in backends:
                r = cell.get((case, b))
                if r is None:
                    cells.append("-")
                elif r.status == "refused":
                    cells.append("refused")
                else:
                    cells.append(f"{'pass' if r.status == 'pass' else 'FAIL'} {r.ratio:.2f}"
                                 if r.ratio is not None else r.status)
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        reasons = sorted({(r.backend, r.detail) for r in rows if r.status == "refused"})
        if reasons:
            lines += ["", "Refusal reasons (first reason of each refused case):", ""]
            lines += [f"- `{b}`: {d}" for b, d in reasons]
        failures = [r for r in rows if r.status == "fail"]
        if failures:
            lines += ["", "Failures:", ""]
            lines += [f"- `{r.backend}` {r.case}: {r.detail}" for r in failures]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
