"""python -m benchmarks.split_sweep [--case decode-8x32k] [--dtypes ...] [--splits 1 4 8 16 32] [--block-size 16]

Sweeps the Triton kernel's split-KV segment count on one decode case, for
each dtype mode, interleaved (every variant once per round, in rotating
order, so a drifting card cancels in the per-round ratios), and prints the
median time, the KV read bandwidth and the speed-up over bf16 at the same
split count. Evidence for `launcher.choose_num_kv_splits`: a quantized cache
reads fewer bytes per key, so the split count that fills the GPU for bf16 can
leave an fp8 decode latency-bound. Every variant's output is checked against
the first variant of its dtype mode before anything is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks.ab_kernel import time_interleaved
from benchmarks.attention import DTYPES, SHAPES, kv_bytes_read
from benchmarks.tune_tiles import triton_case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.split_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="decode-8x32k", choices=[n for n, s in SHAPES.items() if s[0] == "decode"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "bf16q-fp8kv", "fp8q-fp8kv", "bf16q-fp8kv-pth"],
                        choices=list(DTYPES))
    parser.add_argument("--splits", nargs="+", type=int, default=[0, 4, 8, 16, 32],
                        help="KV segments per sequence; 0 = the launcher's own choice")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.split_sweep needs a CUDA device")
        return 2

    from backends.triton import launcher

    _, q_lens, kv_lens = SHAPES[args.case]
    variants = []  # (dtype name, splits, bytes, launch)
    for dtype_name in args.dtypes:
        config, inputs, _ = triton_case(args.case, dtype_name, args.block_size)
        chosen = launcher.choose_num_kv_splits(sum(q_lens), len(q_lens), config.num_kv_heads,
                                               inputs.block_table.shape[1] * args.block_size, inputs.q.device)
        reference = None
        for splits in args.splits:
            count = splits or chosen

            def launch(config=config, inputs=inputs, count=count):
                return launcher.unified_attention(*inputs.args, config=config, num_kv_splits=count, **inputs.kwargs)

            out = launch().float()
            reference = out if reference is None else reference
            diff = float((out - reference).abs().max())
            if not diff <= 1e-2 * float(reference.abs().max()):  # also catches NaN
                print(f"{dtype_name}, {count} splits: output differs from the first variant by {diff}")
                return 1
            label = f"{count} (launcher)" if splits == 0 else str(count)
            variants.append((dtype_name, label, kv_bytes_read(config, kv_lens), launch))

    samples = time_interleaved([launch for *_, launch in variants], args.rounds, args.runs)

    print(f"case {args.case}, block size {args.block_size}, {torch.cuda.get_device_name()}, "
          f"{args.rounds} rounds x {args.runs} runs (median per round)")
    print("| dtypes | splits | median ms | KV TB/s | speed-up over bf16, same splits |")
    print("|---|---|---|---|---|")
    bf16 = {label: times for (name, label, _, _), times in zip(variants, samples) if name == "bf16"}
    for (name, label, nbytes, _), times in zip(variants, samples):
        ms = statistics.median(times)
        base = bf16.get(label)
        ratio = (f"{statistics.median(b / t for b, t in zip(base, times)):.2f}" if base is not None else "-")
        print(f"| {name} | {label} | {ms:.3f} | {nbytes / ms / 1e9:.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
