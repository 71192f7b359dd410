"""python -m benchmarks.sass_report [--case decode|prefill] [--q bf16|fp16|fp8] [--kv bf16|fp8|int8] [--mode ...]

Compiles the Triton attention kernel for sm_90 *on this machine* (no GPU needed: Triton ships
ptxas and cuobjdump) and prints its register count, spills, shared memory and the instruction
mix of the machine code: tensor-core ops (HGMMA/QGMMA = wgmma, HMMA = mma.sync), conversions
(F2F / I2F run on the quarter-rate conversion unit; F2FP packs two), async copies (LDGSTS) and
shared-memory loads. No device time, and it answers "what did the compiler make of this?"
before a timing does. The JIT specializes strides equal to 1 and pointer alignment, so this does
the same. Compile with the Triton version the GPU runs (e.g. `pip install --target DIR
triton==3.6.0` and PYTHONPATH=DIR) for its exact code.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8e4nv", "int8": "i8"}
MODES = {"none": 0, "fp8_per_tensor": 1, "fp8_per_token_head": 2, "int8_per_token_head": 3}
COUNTED = ("HGMMA", "QGMMA", "HMMA", "F2F", "F2FP", "I2F", "PRMT", "LDG", "LDGSTS", "LDS", "LDSM", "STS", "MUFU",
           "FFMA", "FMUL", "IMAD", "LOP3", "BAR")


def compile_kernel(args):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from backends.triton import kernel

    params = list(inspect.signature(kernel.unified_attention_kernel.fn).parameters)
    q, kv = DTYPES[args.q], DTYPES[args.kv]
    decode = args.case == "decode"
    block_m = args.block_m or (16 if decode else 128)
    constexprs = dict(
        NUM_QUERIES_PER_KV=4, HEAD_SIZE=args.head_size, HEAD_SIZE_PADDED=triton.next_power_of_2(args.head_size),
        BLOCK_SIZE=args.block_size, BLOCK_Q=block_m // 4, BLOCK_M=block_m, TILE_N=args.tile_n or (128 if decode else 64),
        KV_QUANT=MODES[args.mode], Q_FP8=args.q == "fp8", OUT_FP8=False, IS_CAUSAL=True, USE_SLIDING_WINDOW=False,
        USE_SOFTCAP=False, USE_ALIBI=False, USE_SINKS=False, SPLIT_KV=False, USE_PTX=True,
        UNMASKED_INTERIOR=not args.one_masked_loop, WIDE_OFFSETS=args.wide_offsets, SHORT_QUERIES_ONLY=0,
        # what the JIT specializes: unit strides become constants
        stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1, stride_ksch=1, stride_vsch=1, stride_alibi=1,
        stride_sink=1,
    )
    pointers = {"Q": q, "K_cache": kv, "V_cache": kv, "Out": "bf16", "Partials": "fp32", "Cu_seqlens_q": "i32",
                "Seq_lens": "i32", "Block_table": "i32"}
    signature = {}
    for name in params:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name[0].isupper():
            signature[name] = "*" + pointers.get(name, "fp32")
        elif name in ("softmax_scale", "logits_soft_cap"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    aligned = [n for n in params if signature[n].startswith("*") or (n.startswith("stride") and n not in constexprs)]
    attrs = {(params.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(kernel.unified_attention_kernel, signature,
                    {(params.index(k),): v for k, v in constexprs.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=args.warps, num_stages=args.stages))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sass_report", description=__doc__.splitlines()[2])
    parser.add_argument("--case", choices=["decode", "prefill"], default="decode")
    parser.add_argument("--q", choices=["bf16", "fp16", "fp8"], default="bf16")
    parser.add_argument("--kv", choices=["bf16", "fp16", "fp8", "int8"], default="bf16")
    parser.add_argument("--mode", choices=list(MODES), default="none")
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache page")
    parser.add_argument("--block-m", type=int, default=None)
    parser.add_argument("--tile-n", type=int, default=None)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--one-masked-loop", action="store_true")
    parser.add_argument("--wide-offsets", action="store_true", help="int64 page offsets (a cache of >= 2^31 elements)")
    parser.add_argument("--sass", help="also write the disassembly to this file")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    compiled = compile_kernel(args)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        ptxas = subprocess.run([os.path.join(tools, "ptxas"), "--gpu-name", "sm_90a", "-v", ptx, "-o",
                                os.path.join(tmp, "v.cubin")], capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True).stdout
    if args.sass:
        with open(args.sass, "w") as f:
            f.write(sass)
    ops = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if match:
            ops[match.group(1)] += 1
    resources = [line.split(":", 1)[-1].strip() for line in ptxas.splitlines() if "registers" in line or "spill" in line]
    print(f"triton {triton.__version__}, sm_90: {vars(args)}")
    print(f"shared memory {compiled.metadata.shared} B; " + "; ".join(resources))
    print(f"{sum(ops.values())} instructions: " + " ".join(f"{name}={ops[name]}" for name in COUNTED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
