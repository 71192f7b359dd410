"""Greedy generation with a transformers model whose attention runs through dispatch, in every KV mode.

    pip install torch==2.13.0 -e '.[transformers]'   # from a clone, on a CPU (drop the pin with CUDA torch)
    python examples/transformers_generate.py         # CUDA when available (bfloat16), else the CPU (float16)

A small Llama-style model built from a config with seeded random weights (nothing is downloaded) gets
three prompts of 7, 19 and 33 tokens, left-padded into one batch, and generates 24 tokens each:

- with transformers' own ``eager`` and ``sdpa`` attention and its default (dynamic) cache;
- through dispatch (`dispatch.integrations.transformers`): `register()` adds the attention function and
  its mask function, the model is loaded with ``attn_implementation="dispatch"``, and a `PagedKVCache`
  keeps the keys and values in pages: 16-bit, FP8 per tensor (scales calibrated from the prefill), FP8
  and INT8 per token and head.

For each it prints tokens per second (after a warm-up; tiny models on a CPU measure overhead, not
attention), the KV cache's bytes, and how it agrees with eager: generated tokens equal to eager's, and
the largest difference of the first step's logits (the prompts' own predictions, before any generated
token can differ). The 16-bit dispatch cache generates eager's tokens; quantized caches differ by their
quantization error, and a random model's near-ties turn that into different tokens sooner or later.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

try:
    import dispatch
except ImportError:  # run from a clone that was not pip-installed: the package sits one folder up
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import dispatch

import transformers

from dispatch.integrations import transformers as dispatch_hf

PROMPT_LENGTHS = (7, 19, 33)
KV_MODES = ("none", "fp8_per_tensor", "fp8_per_token_head", "int8_per_token_head")


def build_model(implementation: str, dtype: torch.dtype, device: torch.device):
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=1024, initializer_range=0.1, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=None)
    torch.manual_seed(0)  # the same random weights for every implementation
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=dtype)
    return model.to(device).eval()


def left_padded_prompts(vocab: int, device: torch.device):
    generator = torch.Generator().manual_seed(1)
    width = max(PROMPT_LENGTHS)
    ids = torch.zeros(len(PROMPT_LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        ids[row, width - length:] = torch.randint(2, vocab, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids.to(device), mask.to(device)


def kv_bytes(cache) -> int:
    if isinstance(cache, dispatch_hf.PagedKVCache):
        return cache.memory_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def generate(model, ids, mask, new_tokens: int, make_cache):
    """(new tokens [B, new_tokens], first step's logits [B, vocab], seconds, the cache it filled)."""
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       **dispatch_hf.cache_argument(model, make_cache()))  # warm-up (kernels compile on a GPU)
        cache = make_cache()
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             **dispatch_hf.cache_argument(model, cache))
        if ids.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return out.sequences[:, ids.shape[1]:], out.logits[0].float(), seconds, cache


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--backend", default=None, help="dispatch backend (default: auto)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # dispatch runs 16-bit models

    dispatch_hf.register("dispatch", backend=args.backend)
    ids, mask = left_padded_prompts(2048, device)
    rows = []
    eager_tokens = eager_logits = None
    for implementation in ("eager", "sdpa"):
        model = build_model(implementation, dtype, device)
        tokens, logits, seconds, cache = generate(model, ids, mask, args.new_tokens,
                                                  lambda: transformers.DynamicCache(config=model.config))
        if implementation == "eager":
            eager_tokens, eager_logits = tokens, logits
        rows.append((f"transformers {implementation}", "-", tokens, logits, seconds, kv_bytes(cache)))
    model = build_model("dispatch", dtype, device)
    for mode in KV_MODES:
        def make_cache(mode=mode):
            return dispatch_hf.PagedKVCache(model, max_batch_size=len(PROMPT_LENGTHS),
                                            max_cache_len=max(PROMPT_LENGTHS) + args.new_tokens, kv_mode=mode)

        tokens, logits, seconds, cache = generate(model, ids, mask, args.new_tokens, make_cache)
        backend = dispatch.select(cache.layer_config(0), device).name
        rows.append((f"dispatch {mode}", backend, tokens, logits, seconds, kv_bytes(cache)))

    print(f"Llama-style model, 2 layers, 8 query / 2 KV heads of 32, {dtype}, on {device}; prompts of "
          f"{list(PROMPT_LENGTHS)} tokens left-padded, {args.new_tokens} new tokens each")
    print(f"{'attention / KV mode':32s} {'backend':8s} {'tokens/s':>9s} {'KV bytes':>10s} "
          f"{'tokens = eager':>15s} {'max |logits - eager|, step 1':>29s}")
    total = eager_tokens.numel()
    for name, backend, tokens, logits, seconds, nbytes in rows:
        same = int((tokens == eager_tokens).sum())
        difference = (logits - eager_logits).abs().max().item()
        print(f"{name:32s} {backend:8s} {tokens.numel() / seconds:9.1f} {nbytes:10d} {same:>8d} of {total:<4d} "
              f"{difference:29.4f}")
    # The yardstick for "agrees with eager" is transformers' own sdpa: two 16-bit implementations differ in
    # rounding, and a near-tie of two logits can then pick a different token (and the rest of that row follows).
    same = {name: int((tokens == eager_tokens).sum()) for name, _, tokens, *_ in rows}
    print(f"16-bit tokens equal to eager's: dispatch {same['dispatch none']} of {total}, transformers sdpa "
          f"{same['transformers sdpa']} of {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
