"""python -m benchmarks.dequant_split [--cases mixed-2x2k+62 prefill-4x4k] [--dtypes ...] [--block-size 16]

A/B of the dequant backend's two plans on one card, interleaved (every variant once per round, in
rotating order, so a drifting card cancels in the per-round ratios):

- "split": what `dispatch.attention` runs with backend="dequant": only sequences with more than
  SHORT_QUERIES queries are dequantized (into pages of FA4's KV tile where FA4 runs inside); the
  decodes run on the Triton kernel from the cache;
- "whole, P-token pages": every sequence dequantized into P-token pages, then the inner 16-bit
  backend (P = 32 was the plan before; P = the product's page size isolates the decode split);
- "triton": the Triton kernel on the quantized cache alone;
- "fa4 bf16": FlashAttention 4 on the same case with a bf16 cache (the yardstick of issue 18),
  where it is installed.

Prints median ms and the per-round ratio to "fa4 bf16" (or to "triton" without FA4). Before
anything is timed, "split" and "whole" are checked against "triton" (relative norm difference at
most 1e-2, as benchmarks.attention checks against sdpa: the test suite bounds each against float64).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks.ab_kernel import time_interleaved
from benchmarks.attention import DTYPES, HEADS, HEAD_SIZE, KV_HEADS, SHAPES, visible_pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dequant_split", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["mixed-2x2k+62", "prefill-4x4k"], choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["bf16q-fp8kv", "bf16q-fp8kv-pth", "bf16q-int8kv-pth"],
                        choices=[name for name, fields in DTYPES.items()
                                 if fields.get("kv_quant_mode", "NONE") != "NONE"
                                 and fields["q_dtype"] in ("bfloat16", "float16")])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.dequant_split needs a CUDA device")
        return 2

    import backends.dequant as dequant
    import dispatch
    from backends.dequant import kernel
    from dispatch.testing import make_inputs

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, block size {args.block_size}, "
          f"{args.rounds} rounds x {args.runs} runs (median per round)")
    print("| case | dtypes | variant | median ms | TFLOP/s | / fa4 bf16 (or / whole) |")
    print("|---|---|---|---|---|---|")
    for case in args.cases:
        kind, q_lens, kv_lens = SHAPES[case]
        flops = 4 * visible_pairs(q_lens, kv_lens) * HEADS * HEAD_SIZE
        for dtype_name in args.dtypes:
            config = dispatch.AttentionConfig(num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                                              block_size=args.block_size, backend="dequant", **DTYPES[dtype_name])
            inputs = make_inputs(config, q_lens, kv_lens, device="cuda", poison=False, extra_blocks=0,
                                 generate_on_device=True)
            call = dequant._call_for(config, inputs.q.device)

            def split(config=config, inputs=inputs):
                return dispatch.attention(*inputs.args, config=config, **inputs.kwargs)

            def whole(pages, config=config, inputs=inputs, call=call):
                ws = kernel.dequantize_pages(inputs.key_cache, inputs.value_cache, inputs.seq_lens,
                                             inputs.block_table, dtype=call.dtype, workspace_block_size=pages,
                                             **{k: v for k, v in inputs.kwargs.items() if k in (
                                                 "k_scale", "v_scale", "k_scale_cache", "v_scale_cache")})
                return call.inner.forward(inputs.q, ws.key_cache, ws.value_cache, inputs.cu_seqlens_q, ws.seq_lens,
                                          ws.block_table)

            on_triton = config.model_copy(update=dict(backend="triton"))

            def triton(config=on_triton, inputs=inputs):
                return dispatch.attention(*inputs.args, config=config, **inputs.kwargs)

            variants = [(f"split, {call.workspace_block_size}-token pages", split),
                        (f"whole, {dequant.WORKSPACE_BLOCK_SIZE}-token pages",
                         lambda: whole(dequant.WORKSPACE_BLOCK_SIZE))]
            if call.workspace_block_size != dequant.WORKSPACE_BLOCK_SIZE:
                variants.append((f"whole, {call.workspace_block_size}-token pages",
                                 lambda: whole(call.workspace_block_size)))
            variants.append(("triton", triton))
            bf16 = dispatch.AttentionConfig(num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                                            block_size=args.block_size, backend="flash_attn", q_dtype="bfloat16",
                                            kv_cache_dtype="bfloat16")
            try:
                dispatch.select(bf16, "cuda")
                bf16_inputs = make_inputs(bf16, q_lens, kv_lens, device="cuda", poison=False, extra_blocks=0,
                                          generate_on_device=True)
                variants.append(("fa4 bf16", lambda c=bf16, i=bf16_inputs: dispatch.attention(*i.args, config=c,
                                                                                                **i.kwargs)))
            except dispatch.UnsupportedConfigError:
                pass
            trusted = triton().float()
            for label, launch in variants[:-1]:
                diff = float((launch().float() - trusted).norm() / trusted.norm())
                if not diff <= 1e-2:  # also catches NaN
                    print(f"{case} {dtype_name} {label}: relative difference {diff:.3g} from triton > 1e-2")
                    return 1
            samples = time_interleaved([launch for _, launch in variants], args.rounds, args.runs)
            base = samples[-1]
            for (label, _), times in zip(variants, samples):
                ms = statistics.median(times)
                ratio = statistics.median(b / t for b, t in zip(base, times))
                print(f"| {case} | {dtype_name} | {label} | {ms:.3f} | {flops / ms / 1e9:.0f} | {ratio:.2f} |",
                      flush=True)
            del inputs, trusted
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
