"""python -m benchmarks.profile_case CASE DTYPES [--block-size 16] [--tiles M,N,WARPS,STAGES,INTERIOR]

Runs the Triton backend on one benchmark case a few times, for a profiler to
attach to: `scripts/gpu-checks.sh profile` wraps it in Nsight Compute
(`ncu --launch-skip 2 --launch-count 1 -k regex:unified_attention_kernel`), so
the profiled launch is the third, after compilation and a warm-up. It times
nothing itself; the benchmark (`benchmarks.attention`) does.

--tiles overrides `choose_tiles` (e.g. 16,128,4,2,0 for a decode tile of 16
rows, 128 keys, 4 warps, 2 stages, one masked loop), to profile a variant.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.attention import DTYPES, SHAPES

LAUNCHES = 3  # 2 skipped by the profiler (compile, warm-up), 1 profiled


def parse_tiles(text: str):
    from backends.triton.launcher import Tiles

    block_m, tile_n, warps, stages, interior = (int(x) for x in text.split(","))
    return Tiles(block_m=block_m, tile_n=tile_n, num_warps=warps, num_stages=stages, unmasked_interior=bool(interior))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_case", description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=list(SHAPES))
    parser.add_argument("dtypes", choices=list(DTYPES))
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tiles", type=parse_tiles, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.profile_case needs a CUDA device")
        return 2

    from backends.triton import launcher
    from benchmarks.tune_tiles import triton_case

    config, inputs, default = triton_case(args.case, args.dtypes, args.block_size)
    torch.cuda.empty_cache()  # drop the generator's scratch: the profiler saves and restores device memory
    tiles = args.tiles or default
    print(f"{args.case} {args.dtypes} block size {args.block_size}: {tiles}", flush=True)
    for _ in range(LAUNCHES):
        launcher.unified_attention(*inputs.args, config=config, tiles=tiles, **inputs.kwargs)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
