"""python -m benchmarks.overhead [--device cpu|cuda] [--calls N]

What `dispatch.attention` adds on top of calling the chosen backend's forward
directly, on a cached config: the argument checks, the plan lookup and the
call itself. Measured with a backend whose forward does nothing (so the
difference is all dispatcher), as the median over many repeats of a loop of
`--calls` calls, in microseconds per call, for contiguous inputs and for the
strided views a vLLM engine passes (`dispatch.testing.engine_views`). Goal: <= 5 us. Reports the minimum and the median of the loops.

The per-step batch metadata (cu_seqlens_q, seq_lens, block_table) is checked once per step: every
layer of an engine step passes the same objects, and the dispatcher remembers the last ones it
accepted (`dispatch.contract.compile_fast_check`). The "views, new step" rows pass new metadata
objects on every call, the cost of a step's first layer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import dispatch
from dispatch.testing import engine_views, make_inputs


def _per_call_us(fn, calls: int, repeats: int) -> tuple[float, float]:
    """(minimum, median) over `repeats` loops of `calls` calls, in us per call. On a shared machine the
    minimum is the steadier estimate of the intrinsic cost: interference only ever adds time."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return min(samples), statistics.median(samples)


def measure(device: str, calls: int = 2000, repeats: int = 15) -> dict:
    null = dispatch.select(dispatch.AttentionConfig(num_heads=1, num_kv_heads=1, head_size=8, q_dtype="fp16",
                                                    kv_cache_dtype="fp16", backend="sdpa"), "cpu").capability
    dispatch.register_backend("null", capability=null.replace(devices=frozenset({"cpu", "cuda"})),
                              forward=lambda q, *args, config, out=None, **kwargs: out)
    try:
        results = {}
        for label, fields in (
            ("bf16", dict(q_dtype="bfloat16", kv_cache_dtype="bfloat16")),
            ("fp8q-fp8kv", dict(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn",
                                kv_quant_mode="FP8_PER_TENSOR")),
            ("bf16q-int8kv-pth", dict(q_dtype="bfloat16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD")),
        ):
            config = dispatch.AttentionConfig(num_heads=32, num_kv_heads=8, head_size=128, backend="null", **fields)
            inputs = make_inputs(config, [1] * 8, [64] * 8, device=device, poison=False)
            out = torch.empty(inputs.q.shape, dtype=config.out_torch_dtype, device=device)
            plan = dispatch.select(config, device)
            # Contiguous tensors, and the views a vLLM engine holds (its packed per-layer cache split into
            # K and V, as_strided scale caches, q from a fused QKV, out and the block table slices).
            views = engine_views(inputs, config, "NHD")
            # New metadata objects (views of the same tensors) on every call: each is a new step.
            steps = [views.args[:3] + tuple(t[:] for t in views.args[3:]) for _ in range(16)]
            cases = (("contiguous", lambda i: inputs.args, dict(inputs.kwargs, out=out)),
                     ("vLLM views", lambda i: views.args, views.kwargs),
                     ("vLLM views, new step", lambda i: steps[i % 16], views.kwargs))
            for layout, args_of, kwargs in cases:
                dispatch.attention(*args_of(0), config=config, **kwargs)  # fill the caches
                counter = iter(range(1 << 62))
                direct = _per_call_us(lambda: plan.forward(*args_of(next(counter)), **kwargs), calls, repeats)
                full = _per_call_us(lambda: dispatch.attention(*args_of(next(counter)), config=config, **kwargs),
                                    calls, repeats)
                results[f"{label}, {layout}"] = {"attention_us": full, "backend_forward_us": direct,
                                                 "overhead_us": (full[0] - direct[0], full[1] - direct[1])}
        return results
    finally:
        dispatch.unregister_backend("null")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    results = measure(args.device, args.calls)
    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}")
    print("us per call, min / median of the loops:")
    print("| config | attention() | backend forward | overhead |")
    print("|---|---|---|---|")
    for label, r in results.items():
        cells = [f"{r[k][0]:.2f} / {r[k][1]:.2f}" for k in ("attention_us", "backend_forward_us", "overhead_us")]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
