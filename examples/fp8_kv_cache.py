"""An FP8 KV cache built by hand: pages, block table, slots and scales, then `dispatch.attention`.

    python examples/fp8_kv_cache.py                 # CUDA when available (bfloat16 keys), else the CPU (float16)

What an engine does every step, spelled out with `dispatch.kv_cache`:

1. Allocate the cache: ``[num_blocks, block_size, num_kv_heads, head_size]`` pages of float8_e4m3fn for
   keys and for values (`zeros_cache`).
2. Give each sequence pages. The block table row of sequence s lists its page ids in order: key j of s
   lives in page ``block_table[s, j // block_size]``, row ``j % block_size``. Pages need not be
   contiguous or in order; here they come from a shuffled free list.
3. Choose per-tensor scales (a scale is a dequantization factor: real = stored * scale) from the
   prompt's keys and values (`calibrate_scale`: amax / 448, here with headroom 2 for later tokens).
4. Write the prompt's keys and values: ``slot_mapping[t] = page * block_size + row`` for each token
   (`slots_for`), then `write_kv` quantizes them with the scales and scatters them in one operation.
5. Decode: one new token per sequence is written the same way at position ``seq_len``, and
   `dispatch.attention` reads every sequence's keys through the block table.

The decode step's output is compared with the float64 oracle over the cache's own stored values
(dequantized with its scales): attention over a quantized cache is exact to the 16-bit output's
rounding, which the example checks (exit 1 otherwise). Its distance to the same attention over an
unquantized 16-bit cache is the quantization error, printed beside it, as is what a kernel that
dropped ``k_scale`` would return. The same steps with per-token-head scales (``k_scale_cache`` /
``v_scale_cache``, which `write_kv` computes and stores itself) and with INT8 follow.
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
from dispatch.kv_cache import calibrate_scale, slots_for, write_kv, zeros_cache
from dispatch.reference import reference_attention

HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 8, 2, 64, 16
PROMPT_LENGTHS = [5, 16, 37]  # tokens per sequence, around the page edge


def config(dtype: torch.dtype, kv_cache_dtype, mode: KVQuantMode) -> AttentionConfig:
    return AttentionConfig(num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, q_dtype=dtype,
                           kv_cache_dtype=kv_cache_dtype, kv_quant_mode=mode, block_size=BLOCK_SIZE)


def run(cfg: AttentionConfig, prompt_keys, prompt_values, new_keys, new_values, q, device) -> tuple:
    """Steps 1-5 for one config; returns (output [num_seqs, HEADS, HEAD_SIZE], everything the call read)."""
    num_seqs = len(PROMPT_LENGTHS)
    max_len = max(PROMPT_LENGTHS) + 1
    pages_per_seq = -(-max_len // BLOCK_SIZE)
    num_blocks = num_seqs * pages_per_seq + 2  # two spare pages nobody owns

    # 1. The cache (and, for per-token-head modes, one fp32 scale per slot and KV head).
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    key_cache = zeros_cache(shape, cfg.kv_cache_torch_dtype, device)
    value_cache = zeros_cache(shape, cfg.kv_cache_torch_dtype, device)
    scales = {}
    if cfg.kv_quant_mode.is_per_token_head:
        scales = dict(k_scale_cache=torch.zeros(shape[:3], device=device),
                      v_scale_cache=torch.zeros(shape[:3], device=device))

    # 2. Pages from a shuffled free list, in block-table rows (int32, as attention takes them).
    free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(2)).tolist()
    block_table = torch.tensor([[free.pop() for _ in range(pages_per_seq)] for _ in range(num_seqs)],
                               dtype=torch.int32, device=device)

    # 3. Per-tensor scales from the prompt (headroom 2: a later key up to twice the prompt's largest fits).
    keys, values = torch.cat(prompt_keys), torch.cat(prompt_values)
    if cfg.kv_quant_mode is KVQuantMode.FP8_PER_TENSOR:
        scales = dict(k_scale=calibrate_scale(keys, cfg.kv_cache_dtype, headroom=2.0),
                      v_scale=calibrate_scale(values, cfg.kv_cache_dtype, headroom=2.0))

    # 4. The prompt: token t of sequence s goes to slot block_table[s, t // 16] * 16 + t % 16.
    seq_index = torch.cat([torch.full((n,), s) for s, n in enumerate(PROMPT_LENGTHS)]).to(device)
    positions = torch.cat([torch.arange(n) for n in PROMPT_LENGTHS]).to(device)
    write_kv(keys, values, key_cache, value_cache, slots_for(block_table, seq_index, positions, BLOCK_SIZE),
             config=cfg, **scales)

    # 5. One decode step: each sequence's new token at position seq_len, then attention over all of it.
    seq_lens = torch.tensor(PROMPT_LENGTHS, device=device) + 1
    new_slots = slots_for(block_table, torch.arange(num_seqs, device=device), seq_lens - 1, BLOCK_SIZE)
    write_kv(new_keys, new_values, key_cache, value_cache, new_slots, config=cfg, **scales)
    cu_seqlens_q = torch.arange(num_seqs + 1, dtype=torch.int32, device=device)  # one query per sequence
    args = (q, key_cache, value_cache, cu_seqlens_q, seq_lens.to(torch.int32), block_table)
    return dispatch.attention(*args, config=cfg, **scales), args, scales


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args(argv).device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16

    generator = torch.Generator().manual_seed(0)
    gain = torch.tensor([0.5, 3.0]).view(1, KV_HEADS, 1)  # KV heads of different magnitude

    def draw(*shape):
        return (torch.randn(*shape, generator=generator) * (gain if shape[-2] == KV_HEADS else 1)).to(dtype).to(device)

    prompt_keys = [draw(n, KV_HEADS, HEAD_SIZE) for n in PROMPT_LENGTHS]
    prompt_values = [draw(n, KV_HEADS, HEAD_SIZE) for n in PROMPT_LENGTHS]
    new_keys, new_values = draw(len(PROMPT_LENGTHS), KV_HEADS, HEAD_SIZE), draw(len(PROMPT_LENGTHS), KV_HEADS, HEAD_SIZE)
    q = draw(len(PROMPT_LENGTHS), HEADS, HEAD_SIZE)
    inputs = (prompt_keys, prompt_values, new_keys, new_values, q, device)

    exact, _, _ = run(config(dtype, dtype, KVQuantMode.NONE), *inputs)
    unit = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # unit roundoff of the 16-bit output
    print(f"{dtype} queries and keys on {device}; sequences of {PROMPT_LENGTHS} prompt tokens + 1 decode step")
    print(f"{'KV cache':32s} {'backend':8s} {'bytes/token':>11s} {'max |out - oracle on its cache|':>32s} "
          f"{'max |out - 16-bit cache|':>25s}")
    ok = True
    for name, cache_dtype, mode in (("fp8 e4m3, per-tensor scales", "float8_e4m3fn", KVQuantMode.FP8_PER_TENSOR),
                                    ("fp8 e4m3, per-token-head scales", "float8_e4m3fn", KVQuantMode.FP8_PER_TOKEN_HEAD),
                                    ("int8, per-token-head scales", "int8", KVQuantMode.INT8_PER_TOKEN_HEAD)):
        cfg = config(dtype, cache_dtype, mode)
        out, args, scales = run(cfg, *inputs)
        oracle = reference_attention(*args, causal=True, softmax_scale=cfg.scale, **scales)
        # Against the float64 oracle over the cache's own (dequantized) values, attention is exact to a few
        # roundings of the 16-bit output; the distance to the 16-bit cache is the quantization error itself.
        attention = (out.double().cpu() - oracle).abs().max().item()
        ok &= attention <= 4 * unit * oracle.abs().max().item()
        quantization = (out.double() - exact.double()).abs().max().item()
        bytes_per_token = 2 * KV_HEADS * (HEAD_SIZE + (4 if mode.is_per_token_head else 0))
        print(f"{name:32s} {dispatch.select(cfg, device).name:8s} {bytes_per_token:11d} {attention:32.5f} "
              f"{quantization:25.4f}")
        if mode is KVQuantMode.FP8_PER_TENSOR:
            # What a kernel that ignored k_scale would return (the bug of vLLM PR #42080, for the query's scale).
            dropped = dispatch.attention(*args, config=cfg, k_scale=torch.ones_like(scales["k_scale"]),
                                         v_scale=scales["v_scale"])
            print(f"{'  ... read with k_scale dropped':32s} {'':8s} {'':11s} "
                  f"{(dropped.double().cpu() - oracle).abs().max().item():32.5f}")
    print(f"(16-bit cache: {2 * KV_HEADS * HEAD_SIZE * 2} bytes/token; |out| up to {exact.abs().max().item():.2f})")
    print("OK: every quantized cache read exactly" if ok else "FAIL: an output differs from the oracle on its cache")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
