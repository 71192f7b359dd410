"""python -m benchmarks.tune_tiles [--case decode-64x8k] [--dtypes ...] [--block-size 16]

Sweeps the Triton kernel's tile parameters (tile_n, num_warps, num_stages) on
one benchmark case and prints each variant's median time, KV bandwidth and
its output's difference from the default tiles' output (a miscompiled
variant shows up there, not as a speed). Evidence for `choose_tiles`; the
defaults change only with a run like this behind them.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys

import torch

from benchmarks.attention import DTYPES, HEAD_SIZE, HEADS, KV_HEADS, SHAPES, Timer, kv_bytes_read, visible_pairs


def triton_case(case: str, dtype_name: str, block_size: int):
    """The config, device inputs and `choose_tiles` default of one benchmark case on the Triton backend
    (needs CUDA; also used by benchmarks.profile_case)."""
    import dispatch
    from backends.triton import launcher
    from dispatch.testing import make_inputs

    _, q_lens, kv_lens = SHAPES[case]
    config = dispatch.AttentionConfig(num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                                      block_size=block_size, backend="triton", **DTYPES[dtype_name])
    inputs = make_inputs(config, q_lens, kv_lens, device="cuda", poison=False, extra_blocks=0,
                         generate_on_device=True)
    decode = launcher.is_decode_shaped(sum(q_lens), len(q_lens))
    default = launcher.choose_tiles(HEAD_SIZE, HEADS // KV_HEADS, config.q_is_fp8, decode, config.kv_quant_mode)
    return config, inputs, default


def parse_sweep_arguments(parser: argparse.ArgumentParser, argv, module: str):
    """Parses a GPU sweep's command line plus --jobs (and the hidden --shard I N of a compile worker);
    without CUDA says so and returns None; with --jobs > 1 first compiles in worker processes."""
    parser.add_argument("--jobs", type=int, default=1,
                        help="compile the variants in this many processes first (Triton's disk cache keeps them)")
    parser.add_argument("--shard", type=int, nargs=2, default=None, metavar=("I", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{module} needs a CUDA device")
        return None
    compile_in_workers(module, args, argv)
    return args


def compile_in_workers(module: str, args, argv) -> None:
    """Runs `python -m module` with the same arguments in args.jobs processes, worker i compiling
    the variants whose index is i mod jobs, and waits for them. Compiling dominates a sweep
    (seconds per variant, one CPU core each); timing must stay serial, in this process."""
    if args.jobs <= 1 or args.shard is not None:
        return
    own = list(argv if argv is not None else sys.argv[1:])
    workers = [subprocess.Popen([sys.executable, "-m", module, *own, "--shard", str(i), str(args.jobs)],
                                stdout=subprocess.DEVNULL) for i in range(args.jobs)]
    for worker in workers:
        worker.wait()


def _describe(tiles, wide) -> str:
    loop = "unmasked interior" if tiles.unmasked_interior else "one masked loop"
    return (f"{tiles.block_m} | {tiles.tile_n} | {tiles.num_warps} | {tiles.num_stages} | {loop} | "
            f"{'int64' if wide else 'default'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_tiles", description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="decode-64x8k", choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--block-m", nargs="+", type=int, default=None,
                        help="query-tile rows (default: choose_tiles' choice for the case)")
    parser.add_argument("--tile-n", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--warps", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument("--interior", choices=["default", "unmasked", "masked", "both"], default="default",
                        help="loop structure: the default's, interior tiles unmasked, one masked loop, or both")
    parser.add_argument("--offsets", choices=["default", "wide", "both"], default="default",
                        help="page offsets: the launcher's choice (int32 for these caches), int64, or both")
    args = parse_sweep_arguments(parser, argv, "benchmarks.tune_tiles")
    if args is None:
        return 2

    from backends.triton import launcher

    timer = Timer("cuda", warmup=3, runs=20)
    kind, q_lens, kv_lens = SHAPES[args.case]
    print(f"case {args.case}, block size {args.block_size}, {torch.cuda.get_device_name()}")
    print("| dtypes | block_m | tile_n | warps | stages | loop | page offsets | median ms | rate "
          "| max |diff| vs default |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        config, inputs, base = triton_case(args.case, dtype_name, args.block_size)
        kwargs = dict(inputs.kwargs)
        default = launcher.unified_attention(*inputs.args, config=config, **kwargs).float()
        torch.cuda.synchronize()
        interiors = {"default": [base.unmasked_interior], "unmasked": [True], "masked": [False],
                     "both": [True, False]}[args.interior]
        offsets = {"default": [None], "wide": [True], "both": [None, True]}[args.offsets]
        variants = [
            (launcher.Tiles(block_m=block_m, tile_n=tile_n, num_warps=warps, num_stages=stages,
                            unmasked_interior=interior), wide)
            for block_m, tile_n, warps, stages, interior, wide in itertools.product(
                args.block_m or [base.block_m], args.tile_n, args.warps, args.stages, interiors, offsets)
        ]
        rows = []
        for index, (tiles, wide) in enumerate(variants):
            def launch():
                return launcher.unified_attention(*inputs.args, config=config, tiles=tiles, wide_offsets=wide,
                                                  **kwargs)
            if args.shard is not None:
                if index % args.shard[1] == args.shard[0]:
                    try:  # compile only; errors are reported by the timing pass
                        launch()
                    except Exception:
                        pass
                continue
            try:
                diff = float((launch().float() - default).abs().max())
                rows.append((statistics.median(timer(launch)), tiles, wide, diff))
            except Exception as exc:  # a variant that does not compile is reported, not hidden
                print(f"| {dtype_name} | {_describe(tiles, wide)} | error: {type(exc).__name__} | | |")
        for ms, tiles, wide, diff in sorted(rows, key=lambda row: row[0]):
            mark = " (default)" if tiles == base and wide is None else ""
            if kind == "decode":
                rate = f"{kv_bytes_read(config, kv_lens) / (ms / 1e3) / 1e12:.2f} TB/s"
            else:
                rate = f"{4 * visible_pairs(q_lens, kv_lens) * HEADS * HEAD_SIZE / (ms / 1e3) / 1e12:.1f} TFLOP/s"
            print(f"| {dtype_name} | {_describe(tiles, wide)}{mark} | {ms:.3f} | {rate} | {diff:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
