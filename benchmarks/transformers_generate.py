"""python -m benchmarks.transformers_generate [--batch-sizes 1,16,64] [--modes ...] [--layers 32] [--out DIR]

Greedy generation with a Llama-3-8B-shaped model (hidden 4096, 32 layers, 32 query heads, 8 KV heads,
head size 128, intermediate 14336, vocab 128256; random bf16 weights, no download) through transformers:
dispatch's attention with its paged KV cache in each KV mode, against transformers' own `sdpa` attention
with its default (dynamic) cache and with its static cache. Prompt 1024 tokens, 256 new tokens, no
padding, batch sizes 1, 16 and 64.

Per (batch size, mode), after one warm-up generation of 2 tokens on the same shapes (it compiles the
kernels; generate() is never torch.compile'd here: disable_compile=True for every mode):
  prefill_s      time of a generation of 1 new token (the prompt's forward pass and one sampling step)
  total_s        time of the full generation (prefill + new_tokens - 1 decode steps)
  decode tok/s   = batch * (new_tokens - 1) / (total_s - prefill_s)
  e2e tok/s      = batch * new_tokens / total_s
  kv_cache_bytes the cache's tensors after the run: dispatch's pages and scales as allocated (rows x
                 ceil((prompt + new) / block_size) pages per layer), the dynamic cache's grown tensors,
                 the static cache's preallocated ones
  peak_bytes     torch.cuda.max_memory_allocated during the timed run, minus the weights
  same_tokens    fraction of generated tokens equal to sdpa-dynamic's (same weights and prompt; a
                 quantized cache is expected to diverge, a 16-bit one only at near-ties of bf16 logits)
Timings use torch.cuda.synchronize() around each generate(), which itself synchronizes every step.

Writes transformers_generate.json and transformers_generate.md to --out (default: $OUT or .). On a CPU
run tiny shapes (e.g. --hidden 64 --layers 2 --heads 4 --kv-heads 2 --head-dim 16 --intermediate 128
--vocab 256 --prompt 20 --new-tokens 6 --batch-sizes 1,3 --dtype float16): it checks the script, it
times nothing meaningful.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script from a clone: the project root is one folder up
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

DISPATCH_MODES = {
    "dispatch-bf16": "none",
    "dispatch-fp8-per-tensor": "fp8_per_tensor",
    "dispatch-fp8-per-token-head": "fp8_per_token_head",
    "dispatch-int8-per-token-head": "int8_per_token_head",
}
SDPA_MODES = ("sdpa-dynamic", "sdpa-static")
MODES = tuple(DISPATCH_MODES) + SDPA_MODES
ATTENTION_NAME = "dispatch_bench"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float16 (default on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="dispatch backend (default: auto)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float16")
    return args


def environment(device: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    try:  # a copy of the tree without .git (the GPU machine) passes the commit in DISPATCH_COMMIT
        env["commit"] = os.environ.get("DISPATCH_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "unknown"
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return env


def build_model(args, device: torch.device):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(8192, args.prompt + args.new_tokens),
        rope_theta=500000.0, pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialize the random weights on the device (8B parameters)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                              dtype=getattr(torch, args.dtype))
    model.eval()
    model.generation_config.eos_token_id = None  # always generate new_tokens
    model.generation_config.pad_token_id = 0
    return model


def cache_bytes(cache) -> int:
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def make_cache(model, mode: str, batch: int, args):
    import transformers

    from dispatch.integrations import transformers as dispatch_hf

    max_len = args.prompt + args.new_tokens
    if mode in DISPATCH_MODES:
        return dispatch_hf.PagedKVCache(model, max_batch_size=batch, max_cache_len=max_len,
                                        kv_mode=DISPATCH_MODES[mode], block_size=args.block_size,
                                        backend=args.backend)
    if mode == "sdpa-static":
        return transformers.StaticCache(config=model.config, max_cache_len=max_len)
    return transformers.DynamicCache(config=model.config)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(model, ids, cache, new_tokens: int):
    from dispatch.integrations import transformers as dispatch_hf

    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, disable_compile=True,
                              **dispatch_hf.cache_argument(model, cache))


def run_one(model, mode: str, ids: torch.Tensor, args, device: torch.device, weights_bytes: int) -> dict:
    batch = ids.shape[0]
    implementation = ATTENTION_NAME if mode in DISPATCH_MODES else "sdpa"
    if model.config._attn_implementation != implementation:
        model.set_attn_implementation(implementation)
    generate(model, ids, make_cache(model, mode, batch, args), 2)  # warm-up: compiles prefill and decode kernels
    synchronize(device)

    start = time.perf_counter()
    generate(model, ids, make_cache(model, mode, batch, args), 1)
    synchronize(device)
    prefill_s = time.perf_counter() - start

    cache = make_cache(model, mode, batch, args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = generate(model, ids, cache, args.new_tokens)
    synchronize(device)
    total_s = time.perf_counter() - start
    result = {
        "mode": mode, "batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
        "prefill_s": prefill_s, "total_s": total_s,
        # None when timing noise leaves no decode time to divide by (tiny CPU runs)
        "decode_tok_s": batch * (args.new_tokens - 1) / (total_s - prefill_s) if total_s > prefill_s else None,
        "e2e_tok_s": batch * args.new_tokens / total_s,
        "kv_cache_bytes": cache_bytes(cache),
        "peak_bytes": (torch.cuda.max_memory_allocated(device) - weights_bytes) if device.type == "cuda" else None,
        "tokens": out[:, args.prompt:].cpu(),
    }
    if mode in DISPATCH_MODES:
        import dispatch

        config = cache.layer_config(0)
        result["dispatch_backend"] = dispatch.select(config, device).name
        result["attention_config"] = config.summary()
    del cache, out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(results: list[dict], env: dict, args) -> str:
    lines = [f"# transformers generate: Llama-3-8B shape ({args.layers} layers), prompt {args.prompt}, "
             f"{args.new_tokens} new tokens, {args.dtype}",
             "",
             f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}, "
             f"commit {env['commit']}, {env['date']}",
             "",
             "| batch | mode | backend | prefill s | decode tok/s | e2e tok/s | KV cache GiB | peak extra GiB | "
             "same tokens as sdpa-dynamic |",
             "|---|---|---|---|---|---|---|---|---|"]
    gib = 2.0 ** 30
    for r in results:
        peak = f"{r['peak_bytes'] / gib:.2f}" if r["peak_bytes"] is not None else "-"
        same = f"{r['same_tokens']:.3f}" if r.get("same_tokens") is not None else "-"
        decode = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] is not None else "-"
        lines.append(f"| {r['batch']} | {r['mode']} | {r.get('dispatch_backend', 'sdpa')} | {r['prefill_s']:.3f} | "
                     f"{decode} | {r['e2e_tok_s']:.1f} | {r['kv_cache_bytes'] / gib:.3f} | {peak} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    from dispatch.integrations import transformers as dispatch_hf

    dispatch_hf.register(ATTENTION_NAME, backend=args.backend)
    model = build_model(args, device)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    env = environment(device)
    print(f"{env['device']}: {args.layers} layers, {weights_bytes / 2**30:.1f} GiB of weights; "
          f"torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}", flush=True)
    generator = torch.Generator().manual_seed(1)
    results = []
    began = time.perf_counter()
    for batch in args.batch_sizes:
        ids = torch.randint(2, args.vocab, (batch, args.prompt), generator=generator).to(device)
        reference = None
        for mode in args.modes:
            result = run_one(model, mode, ids, args, device, weights_bytes)
            if mode == "sdpa-dynamic":
                reference = result["tokens"]
            results.append(result)
            decode = result["decode_tok_s"] or float("nan")
            print(f"batch {batch:3d} {mode:30s} prefill {result['prefill_s']:7.3f} s  decode {decode:9.1f} tok/s  "
                  f"KV {result['kv_cache_bytes'] / 2**30:7.3f} GiB  [{time.perf_counter() - began:6.0f} s]", flush=True)
        for result in results:
            if result["batch"] == batch and reference is not None:
                result["same_tokens"] = float((result["tokens"] == reference).float().mean())
    for result in results:
        result.pop("tokens")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transformers_generate.json").write_text(json.dumps(
        {"environment": env, "arguments": vars(args), "results": results}, indent=2))
    table = markdown(results, env, args)
    (out / "transformers_generate.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
