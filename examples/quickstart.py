"""The README's API, end to end: a config, paged inputs, one attention call, checked against the float64 oracle.

    python examples/quickstart.py                 # CUDA when available, else the CPU
    python examples/quickstart.py --device cpu

An FP8 query against an FP8 KV cache with per-tensor scales (the case of vLLM
PR #42080, where the query's scale was once ignored), grouped-query attention,
and a batch of three sequences: two decode steps and a 5-token prompt. On a CPU
the `auto` backend is PyTorch SDPA (Triton needs a GPU or its interpreter); on
a GPU it is usually the Triton kernel. Exits 1 if the output is not within a
few roundings of the oracle.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

try:
    import dispatch
except ImportError:  # run from a clone that was not pip-installed: the package sits one folder up
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import dispatch

from dispatch import AttentionConfig, KVQuantMode
from dispatch.reference import reference_attention
from dispatch.selftest import error_bound
from dispatch.testing import make_inputs, output_as_real


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    # 1. What the call is: dtypes, how the KV cache is quantized, features.
    cfg = AttentionConfig(
        num_heads=32, num_kv_heads=8, head_size=128,
        q_dtype="float8_e4m3fn",
        kv_cache_dtype="float8_e4m3fn",
        kv_quant_mode=KVQuantMode.FP8_PER_TENSOR,
        block_size=16,
        causal=True,
    )

    # 2. Paged inputs as an engine holds them: a pool of 16-token pages, a block table listing each
    #    sequence's pages, the query tokens of all sequences packed along dim 0, and the scales
    #    (stored = (x / scale).to(fp8)). Sequence s has q_lens[s] new tokens and kv_lens[s] keys.
    q_lens, kv_lens = [1, 1, 5], [17, 40, 5]
    inputs = make_inputs(cfg, q_lens, kv_lens, device=args.device)
    print(f"q {tuple(inputs.q.shape)} {inputs.q.dtype}, key_cache {tuple(inputs.key_cache.shape)} "
          f"{inputs.key_cache.dtype}, block_table {inputs.block_table.tolist()}")
    print(f"cu_seqlens_q {inputs.cu_seqlens_q.tolist()}, seq_lens {inputs.seq_lens.tolist()}, "
          f"scales {', '.join(f'{k}={v.item()}' for k, v in inputs.kwargs.items())}")

    # 3. One call; the backend is chosen from what each declares it computes correctly.
    out = dispatch.attention(
        inputs.q, inputs.key_cache, inputs.value_cache, inputs.cu_seqlens_q, inputs.seq_lens, inputs.block_table,
        config=cfg,
        q_scale=inputs.kwargs["q_scale"], k_scale=inputs.kwargs["k_scale"], v_scale=inputs.kwargs["v_scale"],
    )
    plan = dispatch.select(cfg, device=args.device)
    print(f"out {tuple(out.shape)} {out.dtype}, computed by {plan.name!r}")

    # 4. The float64 oracle on the same stored values: the error left is the arithmetic's own.
    expected = reference_attention(*inputs.args, **inputs.oracle_kwargs(cfg))
    got = output_as_real(out, cfg, inputs)
    relative = float((got - expected).norm() / expected.norm())
    bound = error_bound(cfg, plan.capability.fp8_query_p_dtype)
    print(f"||out - oracle|| / ||oracle|| = {relative:.2e} (bound {bound:.1e})")

    # 5. Every backend's verdict on this config, and why.
    print()
    print(dispatch.explain(cfg, device=args.device))
    return 0 if relative <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
