"""python -m benchmarks.ab_kernel --other OLD_KERNEL.py [--case decode-64x8k] [--dtypes ...] [--stages 2 3]

Times this tree's Triton attention kernel against another version of
`backends/triton/kernel.py` (a file: an older revision from `git show`, or a
variant under test) in one process, on the same inputs, interleaved: every
round runs each (dtypes, kernel, stages) variant a few times, in an order that
rotates from round to round, so a drift of the card (clocks, temperature, a
neighbour) lands on all of them alike. On the shared GPU machines medians of
separate runs drift by up to 10%, more than most kernel changes are worth;
this is how a change is judged. It prints per variant the median over the
rounds and the median of its per-round ratios to the first variant of the same
dtypes and to the first row (a ratio within one round cancels slow drift).

Both kernels must agree with each other on every case before anything is timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys

import torch

from benchmarks.attention import DTYPES, SHAPES, Timer
from benchmarks.tune_tiles import parse_sweep_arguments, triton_case


def load_kernel_module(path: str):
    """Imports a kernel.py from a file under its own module name (Triton reads the source of each
    @triton.jit function from the file, so it compiles that version, not the installed one)."""
    spec = importlib.util.spec_from_file_location("ab_other_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_interleaved(launches: list, rounds: int, runs: int) -> list[list[float]]:
    """Per launch, its median time (ms) in each round; every round times every launch once, starting
    at a rotating index, so a card that drifts during the sweep drifts for all of them alike."""
    timer = Timer("cuda", warmup=2, runs=runs)
    samples = [[] for _ in launches]
    for round_index in range(rounds):
        shift = round_index % len(launches)
        for index in list(range(shift, len(launches))) + list(range(shift)):
            samples[index].append(statistics.median(timer(launches[index])))
    return samples


def format_table(labels: list[tuple[str, str, int]], samples: list[list[float]]) -> str:
    """One row per variant: the median over rounds, and the median of its per-round ratios to the
    first variant of the same dtypes and to the first row (a drift of the card cancels in a ratio
    taken within one round)."""
    def ratio(times, base):
        return statistics.median(t / b for t, b in zip(times, base))

    lines = ["| dtypes | kernel | stages | median ms | / first of its dtypes | / first row |",
             "|---|---|---|---|---|---|"]
    first = {}
    for (dtype_name, name, stages), times in zip(labels, samples):
        base = first.setdefault(dtype_name, times)
        lines.append(f"| {dtype_name} | {name} | {stages} | {statistics.median(times):.3f} | "
                     f"{ratio(times, base):.3f} | {ratio(times, samples[0]):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab_kernel", description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="path of the other kernel.py")
    parser.add_argument("--case", default="decode-64x8k", choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["bf16q-fp8kv", "bf16q-fp8kv-pth", "bf16q-int8kv-pth"],
                        choices=list(DTYPES))
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--stages", nargs="+", type=int, default=None,
                        help="pipeline stages to try with each kernel (default: choose_tiles' choice)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant and round")
    args = parse_sweep_arguments(parser, argv, "benchmarks.ab_kernel")
    if args is None:
        return 2

    import dataclasses

    from backends.triton import launcher

    kernels = {"this tree": launcher.kernel, args.other: load_kernel_module(args.other)}

    def launch_with(module, config, inputs, tiles):
        saved = launcher.kernel
        launcher.kernel = module
        try:
            return launcher.unified_attention(*inputs.args, config=config, tiles=tiles, **inputs.kwargs)
        finally:
            launcher.kernel = saved

    variants = []  # (dtypes, kernel name, tiles, launch)
    for dtype_name in args.dtypes:
        config, inputs, default = triton_case(args.case, dtype_name, args.block_size)
        reference = None
        for stages in args.stages or [default.num_stages]:
            tiles = dataclasses.replace(default, num_stages=stages)
            for name, module in kernels.items():
                def launch(module=module, config=config, inputs=inputs, tiles=tiles):
                    return launch_with(module, config, inputs, tiles)
                if args.shard is not None:  # a compile worker: its share of the variants, once
                    if len(variants) % args.shard[1] == args.shard[0]:
                        launch()
                    variants.append((dtype_name, name, tiles, None))  # keeps no inputs alive
                    continue
                variants.append((dtype_name, name, tiles, launch))
                out = launch().float()
                if reference is None:
                    reference = out
                diff = float((out - reference).abs().max())
                if not diff <= 1e-2 * float(reference.abs().max()):  # also catches NaN
                    print(f"{dtype_name}, {name}, {stages} stages: output differs from the first variant by {diff}")
                    return 1
        del inputs  # (a compile worker then holds one case's inputs at a time)
    if args.shard is not None:
        torch.cuda.synchronize()
        return 0

    samples = time_interleaved([launch for *_, launch in variants], args.rounds, args.runs)

    print(f"case {args.case}, block size {args.block_size}, {torch.cuda.get_device_name()}, "
          f"{args.rounds} rounds x {args.runs} runs (median per round)")
    print(format_table([(dtype_name, name, tiles.num_stages) for dtype_name, name, tiles, _ in variants], samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
