"""python -m benchmarks.attention [--quick] [--smoke] [--backends ...] [--cases ...] [--out DIR]

Times every available backend on serving-shaped cases with CUDA events and
writes raw results (JSON, CSV), a markdown summary and plots. Each output is
checked against the sdpa backend (itself proven against the float64 oracle by
the test suite) before it is timed: a fast wrong answer is reported as a
failure, not a speed.

Metrics, each beside its formula:
  decode / mixed  TB/s   = KV-cache bytes the call must read (each visible key and
                           value once, scales included) / time
                  tok/s  = query tokens / time
  prefill         TFLOP/s = 4 * sum over sequences and heads of visible (q, k) pairs * head_size / time
                           (QK^T and PV, 2 FLOPs per multiply-add; causal counts only the visible half)
  memory          peak extra bytes allocated during one call (max_memory_allocated, before vs during)
The device's own limits (device-to-device copy bandwidth, bf16 and fp8 matmul
throughput) are measured in the same run, and each result is given as a
percentage of them, and as a ratio to flash_attn and sdpa in the same run.

--smoke runs two tiny cases under the Triton interpreter on the CPU (CI): it
checks that the script, the case definitions and the metrics work, and times
nothing meaningful. Without CUDA and without --smoke, it says so and exits 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from dispatch import cases as table
from dispatch.speed import workload_of

# The serving shapes are the case table's "bench" cases (dispatch/cases.py), which fix the head geometry
# (32 query heads, 8 KV heads, head size 128); each is timed with every dtype mode and block size below.
# The names stay importable for the lab tools (tune_tiles, profile_case, ab_kernel).
_BENCH = table.cases("bench")
HEADS, KV_HEADS, HEAD_SIZE = (_BENCH[0].fields[k] for k in ("num_heads", "num_kv_heads", "head_size"))
# name -> (kind, q_lens, kv_lens)
SHAPES: dict[str, tuple[str, list[int], list[int]]] = {c.name: (c.kind, list(c.q_lens), list(c.kv_lens))
                                                        for c in _BENCH}
QUICK_SHAPES = tuple(c.name for c in table.cases("bench-quick"))
SMOKE_SHAPES: dict[str, tuple[str, list[int], list[int]]] = {
    c.name: (c.kind, list(c.q_lens), list(c.kv_lens)) for c in table.cases("bench-smoke")}
# name -> config fields
DTYPES: dict[str, dict] = {name: table.DTYPE_MODES[name] for name in table.BENCH_DTYPE_MODES}
SMOKE_DTYPES: dict[str, dict] = {name: table.DTYPE_MODES[name] for name in table.SMOKE_DTYPE_MODES}
BLOCK_SIZES = table.BENCH_BLOCK_SIZES


@dataclass
class Result:
    case: str
    kind: str
    dtypes: str
    block_size: int
    backend: str
    status: str  # "ok" | "refused" | "wrong" | "error"
    detail: str = ""
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    runs: int = 0
    tb_per_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    tflops: Optional[float] = None
    peak_extra_mib: Optional[float] = None
    max_abs_diff_vs_sdpa: Optional[float] = None
    extra: dict = field(default_factory=dict)


def visible_pairs(q_lens, kv_lens, causal=True) -> int:
    total = 0
    for q, k in zip(q_lens, kv_lens):
        if causal:
            # query i sees k - q + i + 1 keys
            total += q * (k - q) + q * (q + 1) // 2
        else:
            total += q * k
    return total


def kv_bytes_read(config, kv_lens) -> int:
    """Each key and value of every sequence read once, plus the scales the mode needs."""
    elem = torch.empty((), dtype=config.kv_cache_torch_dtype).element_size()
    tokens = sum(kv_lens)
    per_token = 2 * config.num_kv_heads * config.head_size * elem
    if config.kv_quant_mode.is_per_token_head:
        per_token += 2 * config.num_kv_heads * 4
    return tokens * per_token


class Timer:
    """CUDA-event timing with an L2 flush before every run (so no run reads a warm cache)."""

    def __init__(self, device, warmup: int, runs: int):
        self.device, self.warmup, self.runs = device, warmup, runs
        self.flush_buffer = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.runs):
            self.flush_buffer.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return times


def device_limits(timer: Timer, device) -> dict:
    """What this card does on the same run: copy bandwidth and matmul throughput."""
    limits = {}
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = statistics.median(timer(lambda: dst.copy_(src)))
    limits["copy_tb_per_s"] = 2 * n / ms / 1e9  # read + write
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = statistics.median(timer(lambda: a @ b))
    limits["bf16_matmul_tflops"] = 2 * m**3 / ms / 1e9
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        ms = statistics.median(timer(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one,
                                                              out_dtype=torch.bfloat16)))
        limits["fp8_matmul_tflops"] = 2 * m**3 / ms / 1e9
    except Exception as exc:  # recorded, not swallowed silently
        limits["fp8_matmul_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return limits


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "date":
           datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("triton", "flash-attn-4", "flash-attn"):
        try:
            env[distribution] = version(distribution)
        except PackageNotFoundError:
            env[distribution] = "not installed"
    try:  # a copy of the tree without .git (a GPU machine) passes the commit in DISPATCH_COMMIT
        env["commit"] = os.environ.get("DISPATCH_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        env["commit"] = "unknown"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except Exception:
            env["driver"] = "unknown"
    else:
        env["device"] = "cpu (Triton interpreter)"
    env["command"] = " ".join([os.path.basename(sys.executable), "-m", "benchmarks.attention", *sys.argv[1:]])
    return env


def run_case(name, kind, q_lens, kv_lens, dtype_name, fields, block_size, backends, device, timer) -> list[Result]:
    import dispatch
    from dispatch.testing import make_inputs, output_as_real

    base = table.case(name).config(block_size=block_size, **fields)
    heads, head_size = base.num_heads, base.head_size
    inputs = make_inputs(base, q_lens, kv_lens, device=device, seed=0, poison=False, extra_blocks=0,
                         generate_on_device=device != "cpu")
    trusted = None
    results = []
    for backend in ["sdpa"] + [b for b in backends if b != "sdpa"]:
        config = base.model_copy(update={"backend": backend})
        result = Result(name, kind, dtype_name, block_size, backend, "ok")
        # The host-side hint an engine passes (its max_query_len): it steers only "auto", which then runs
        # the backend a measured speed rule ranks fastest for this workload (dispatch/speed.py).
        hint = max(q_lens)
        explanation = dispatch.explain(config, device, workload=workload_of(hint))
        if backend == "auto":
            chosen = explanation.chosen
            report = explanation.report(chosen) if chosen else dispatch.selector.BackendReport(
                "auto", False, False, ("no backend fits",))
            result.extra["auto_chose"] = chosen
        else:
            report = explanation.report(backend)
        if not report.supported:
            result.status, result.detail = "refused", "; ".join(report.reasons)
            if backend in backends:
                results.append(result)
            continue
        try:
            out = dispatch.attention(*inputs.args, config=config, max_query_len=hint, **inputs.kwargs)
            real = output_as_real(out, config, inputs) if device == "cpu" else _real_on_device(out, config, inputs)
            if backend == "sdpa":
                trusted = real
            elif trusted is not None:
                # Relative (norm) difference from sdpa: both are within a few roundings of the exact
                # result (tests/ prove it), i.e. ~1e-3 for 16-bit math; an fp8 query's P rounded to
                # e4m3 adds ~4% rms. A larger gap is a wrong answer, whose speed is not reported.
                diff = float((real - trusted).norm() / trusted.norm())
                result.max_abs_diff_vs_sdpa = float((real - trusted).abs().max())
                result.extra["rel_diff_vs_sdpa"] = diff
                limit = 0.08 if config.q_is_fp8 else 0.01
                if not math.isfinite(diff) or diff > limit:
                    result.status, result.detail = "wrong", f"||out - sdpa|| / ||sdpa|| = {diff:.3g} > {limit}"
                    results.append(result)
                    continue
            if backend not in backends:
                continue
            if device == "cpu":
                start = time.perf_counter()
                dispatch.attention(*inputs.args, config=config, max_query_len=hint, **inputs.kwargs)
                times = [(time.perf_counter() - start) * 1e3]
            else:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                dispatch.attention(*inputs.args, config=config, max_query_len=hint, **inputs.kwargs)
                torch.cuda.synchronize()
                result.peak_extra_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
                times = timer(lambda: dispatch.attention(*inputs.args, config=config, max_query_len=hint,
                                                         **inputs.kwargs))
        except Exception as exc:  # reported in the results, never swallowed
            result.status, result.detail = "error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            results.append(result)
            continue
        ms = statistics.median(times)
        result.median_ms, result.min_ms, result.max_ms, result.runs = ms, min(times), max(times), len(times)
        result.tokens_per_s = sum(q_lens) / (ms / 1e3)
        result.tb_per_s = kv_bytes_read(config, kv_lens) / (ms / 1e3) / 1e12
        result.tflops = 4 * visible_pairs(q_lens, kv_lens) * heads * head_size / (ms / 1e3) / 1e12
        results.append(result)
    return results


def _real_on_device(out, config, inputs):
    real = out.float()
    if config.out_is_fp8:
        real = real * inputs.kwargs["output_scale"]
    return real


def write_outputs(results: list[Result], limits: dict, env: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    rows = [asdict(r) for r in results]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"environment": env, "limits": limits, "results": rows}, f, indent=2)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "extra"] if rows else [])
        writer.writeheader()
        for row in rows:
            row.pop("extra", None)
            writer.writerow(row)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(results, limits, env))
    try:
        plot(results, out_dir)
    except ImportError as exc:
        print(f"plots skipped: {exc}")


def summary_markdown(results: list[Result], limits: dict, env: dict) -> str:
    lines = ["| case | dtypes | bs | backend | median ms | TB/s | % copy | tok/s | TFLOP/s | % matmul | x flash_attn "
             "| x sdpa | extra MiB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    copy = limits.get("copy_tb_per_s")
    index = {(r.case, r.dtypes, r.block_size, r.backend): r for r in results}
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.case} | {r.dtypes} | {r.block_size} | {r.backend} | | | | | | | | | | "
                         f"{r.status}: {r.detail[:120]} |")
            continue
        peak = limits.get("fp8_matmul_tflops" if r.dtypes.startswith("fp8q") else "bf16_matmul_tflops")

        def ratio(other):
            o = index.get((r.case, r.dtypes, r.block_size, other))
            return f"{o.median_ms / r.median_ms:.2f}" if o and o.status == "ok" and o.median_ms else "-"

        lines.append(
            f"| {r.case} | {r.dtypes} | {r.block_size} | {r.backend} | {r.median_ms:.3f} | {r.tb_per_s:.2f} "
            f"| {100 * r.tb_per_s / copy:.0f} | {r.tokens_per_s:.3g} | {r.tflops:.1f} "
            f"| {100 * r.tflops / peak:.0f} | {ratio('flash_attn')} | {ratio('sdpa')} | {r.peak_extra_mib or 0:.1f} "
            f"| ok |" if copy and peak else
            f"| {r.case} | {r.dtypes} | {r.block_size} | {r.backend} | {r.median_ms:.3f} | {r.tb_per_s:.2f} | - "
            f"| {r.tokens_per_s:.3g} | {r.tflops:.1f} | - | {ratio('flash_attn')} | {ratio('sdpa')} | - | ok |"
        )
    head = [f"- {k}: {v}" for k, v in env.items()] + [f"- limit {k}: {v:.3g}" if isinstance(v, float)
                                                      else f"- limit {k}: {v}" for k, v in limits.items()]
    notes = ["", "`x flash_attn` / `x sdpa`: that backend's time / this backend's time (> 1: this one is faster).",
             "TB/s counts the KV bytes a call must read; TFLOP/s counts the visible (causal) pairs only.", ""]
    return "\n".join(head + notes + lines) + "\n"


def plot(results: list[Result], out_dir: str, suffix: str = "") -> None:
    """Horizontal bars, one group per (case, dtypes, block size), one bar per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    for metric, kinds, label, filename in (
        ("tb_per_s", ("decode", "mixed"), "KV-cache read bandwidth (TB/s)", "bandwidth"),
        ("tflops", ("prefill",), "TFLOP/s (causal: visible pairs only)", "tflops"),
    ):
        rows = [r for r in ok if r.kind in kinds]
        if not rows:
            continue
        groups = list(dict.fromkeys((r.case, r.dtypes, r.block_size) for r in rows))
        backends = sorted({r.backend for r in rows})
        height = 0.8 / len(backends)
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(groups) * len(backends) + 1.2))
        for i, backend in enumerate(backends):
            values = [next((getattr(r, metric) for r in rows if (r.case, r.dtypes, r.block_size) == g
                            and r.backend == backend), 0) for g in groups]
            ax.barh([y + i * height for y in range(len(groups))], values, height, label=backend)
        ax.set_yticks([y + 0.4 - height / 2 for y in range(len(groups))])
        ax.set_yticklabels([f"{c} {d} bs{b}" for c, d, b in groups], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{filename}{suffix}.png"), dpi=100)
        plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_SHAPES)}, block size 16")
    parser.add_argument("--smoke", action="store_true", help="tiny cases on the CPU under the Triton interpreter")
    # dequant: the quantized caches through a 16-bit workspace and the best 16-bit backend (backends/dequant).
    parser.add_argument("--backends", nargs="+", default=["triton", "dequant", "flash_attn", "sdpa"])
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))  # ignored by --smoke
    parser.add_argument("--block-sizes", nargs="+", type=int, default=list(BLOCK_SIZES))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, shapes, runs = "cpu", SMOKE_SHAPES, 1
        dtype_table = SMOKE_DTYPES
    elif not torch.cuda.is_available():
        print("benchmarks.attention needs a CUDA device (use --smoke for a CPU check of the script itself)")
        return 2
    else:
        device, runs = "cuda", max(args.runs, 20)
        shapes = {k: v for k, v in SHAPES.items() if not args.quick or k in QUICK_SHAPES}
        dtype_table = {k: DTYPES[k] for k in args.dtypes}
    if args.cases:
        unknown = set(args.cases) - set(shapes)
        if unknown:
            parser.error(f"--cases: unknown {sorted(unknown)}; known: {sorted(shapes)}")
        shapes = {k: shapes[k] for k in args.cases}
    block_sizes = [16] if args.quick or args.smoke else args.block_sizes

    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a convenience, not a requirement
        def tqdm(iterable, **_):
            return iterable

    timer = Timer(device, warmup=3, runs=runs) if device == "cuda" else None
    limits = device_limits(timer, device) if device == "cuda" else {}
    env = environment()
    work = [(n, d, b) for n in shapes for d in dtype_table for b in block_sizes]
    results: list[Result] = []
    for name, dtype_name, block_size in tqdm(work, desc="benchmarks", unit="case"):
        kind, q_lens, kv_lens = shapes[name]
        results += run_case(name, kind, q_lens, kv_lens, dtype_name, dtype_table[dtype_name], block_size,
                            args.backends, device, timer)
        if device == "cuda":
            torch.cuda.empty_cache()
    write_outputs(results, limits, env, args.out)
    print(summary_markdown(results, limits, env))
    return 1 if any(r.status in ("wrong", "error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
