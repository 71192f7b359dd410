"""torchrun --nproc_per_node 2 benchmarks/transformers_tp.py [--out DIR] [--model-dir DIR]

Tensor parallelism by transformers itself (``tp_plan="auto"``), with every rank's attention run by
dispatch on its share of the heads, checked against a one-GPU run of the same weights:

1. Rank 0 saves a random-weight Llama (seeded; 16 query heads, 4 KV heads, head size 64, 4 layers)
   with ``save_pretrained`` into --model-dir; the other ranks wait for it. Nothing is downloaded.
2. Every rank reloads it with ``tp_plan="auto"`` and ``attn_implementation`` set to dispatch's
   attention, wrapped to record the query and KV heads each call sees, and runs: a prefill of two
   left-padded rows (29 and 40 tokens) into a `PagedKVCache`, 8 decode steps fed fixed tokens, and
   a greedy generation of 8 tokens.
3. Rank 0 reloads the files on its GPU without tensor parallelism and runs the same steps with
   dispatch (bf16), with transformers' eager attention in bf16 (the same-precision yardstick) and in
   float32 (the reference).

PASS when every rank's attention saw num_heads / world_size query heads and num_kv_heads /
world_size KV heads in every layer, and the tensor-parallel logits (real positions of the prefill
and every decode step) are within the bf16 rounding of a one-GPU run:
    max |tp - reference_fp32| <= 2 * max |eager_bf16 - reference_fp32| + 1e-2
(tensor parallelism only changes the order of bf16 sums: the all-reduce of the o_proj and
down_proj partial sums). Also printed: max |tp - one-GPU dispatch| and whether the greedy tokens
agree (informational: bf16 near-ties may flip a token). One line PASS / FAIL, and a JSON in --out.

Without torchrun (no WORLD_SIZE), steps 1 and 3 run alone on one device (the CPU in float16 when
there is no GPU) and the tensor-parallel check is reported as SKIPPED: a check of the script.
Under torchrun on a CPU-only machine the ranks use gloo and float16 (slow; tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

import torch

if __package__ in (None, ""):  # run as a script from a clone (torchrun runs a file): the project root is one folder up
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

NAME = "dispatch_tp"
PROMPTS = (29, 40)
DECODE_STEPS = 8
HEADS_SEEN: set = set()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--model-dir", default=None, help="where rank 0 saves the model (default: a temp dir "
                        "under --out)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--backend", default=None, help="dispatch backend (default: auto)")
    return parser.parse_args(argv)


def distributed() -> tuple[int, int]:
    """(rank, world size); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def save_model(directory: pathlib.Path, layers: int) -> None:
    import transformers

    config = transformers.LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                      head_dim=64, max_position_embeddings=4096, initializer_range=0.05,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.bfloat16)
    model.save_pretrained(directory)


def tensor_parallel_argument(transformers) -> dict:
    """``tp_plan="auto"`` the way this transformers takes it: ``distributed_config=DistributedConfig(tp_plan="auto")``
    (5.17 deprecates the bare ``tp_plan`` keyword, to be removed), else the keyword."""
    config_class = getattr(transformers, "DistributedConfig", None)
    return {"distributed_config": config_class(tp_plan="auto")} if config_class is not None else {"tp_plan": "auto"}


def register(backend) -> None:
    """dispatch's attention under NAME, wrapped to record (layer, query heads, KV heads) of every call."""
    from transformers import AttentionInterface

    from dispatch.integrations import transformers as dispatch_hf

    dispatch_hf.register(NAME, backend=backend)
    inner = AttentionInterface()[NAME]

    def recording(module, query, key, value, attention_mask, **kwargs):
        HEADS_SEEN.add((module.layer_idx, int(query.shape[1]), int(key.shape[1])))
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(NAME, recording)


def inputs(vocab: int):
    """Two left-padded rows, and the tokens fed in the decode steps (the same on every rank)."""
    generator = torch.Generator().manual_seed(1)
    width = max(PROMPTS)
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    for row, length in enumerate(PROMPTS):
        ids[row, width - length:] = torch.randint(2, vocab, (length,), generator=generator)
        mask[row, width - length:] = 1
    continuation = torch.randint(2, vocab, (len(PROMPTS), DECODE_STEPS), generator=generator)
    return ids, mask, continuation


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def stepwise(model, cache, ids, mask, continuation) -> torch.Tensor:
    """Prefill, then one fed token per step, as generate() does: float32 logits [B, width + steps, V]."""
    from dispatch.integrations import transformers as dispatch_hf

    device = model.device
    ids, mask, continuation = ids.to(device), mask.to(device), continuation.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dispatch_hf.cache_argument(model, cache)
    with torch.inference_mode():
        logits = [local(model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).logits).float()]
        for step in range(continuation.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            logits.append(local(model(input_ids=continuation[:, step:step + 1], attention_mask=mask,
                                      position_ids=positions, **kwargs).logits).float())
    return torch.cat(logits, dim=1).cpu()


def greedy(model, cache, ids, mask) -> torch.Tensor:
    from dispatch.integrations import transformers as dispatch_hf

    device = model.device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=DECODE_STEPS,
                             do_sample=False, disable_compile=True, **dispatch_hf.cache_argument(model, cache))
    return out[:, ids.shape[1]:].cpu()


def paged(model):
    from dispatch.integrations import transformers as dispatch_hf

    return dispatch_hf.PagedKVCache(model, max_batch_size=len(PROMPTS), max_cache_len=max(PROMPTS) + DECODE_STEPS + 1)


def run_dispatch(model, ids, mask, continuation):
    return stepwise(model, paged(model), ids, mask, continuation), greedy(model, paged(model), ids, mask)


def main(argv=None) -> int:
    args = parse_args(argv)
    import importlib.util

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and importlib.util.find_spec("accelerate") is None:
        print("FAIL: not run: transformers loads a tp_plan model only with `accelerate` installed "
              "(pip install accelerate, or put its wheel on PYTHONPATH)", flush=True)
        return 2
    rank, world = distributed()
    import transformers

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir
    if model_dir is None and rank == 0:
        model_dir = tempfile.mkdtemp(prefix="tp-model-", dir=out)
    if world > 1:  # every rank loads what rank 0 saved
        import torch.distributed as dist

        shared = [model_dir]
        dist.broadcast_object_list(shared, src=0)
        model_dir = shared[0]
    model_dir = pathlib.Path(model_dir)
    if rank == 0 and not (model_dir / "config.json").exists():
        save_model(model_dir, args.layers)
    barrier(world)

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float16
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    register(args.backend)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    ids, mask, continuation = inputs(config.vocab_size)
    report = {"world_size": world, "dtype": str(dtype), "transformers": transformers.__version__,
              "torch": torch.__version__, "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
              "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads, "layers": config.num_hidden_layers}

    tp_logits = tp_tokens = None
    if world > 1:
        import torch.distributed as dist

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=NAME,
                                                                  **tensor_parallel_argument(transformers)).eval()
        tp_logits, tp_tokens = run_dispatch(model, ids, mask, continuation)
        seen = [None] * world
        dist.all_gather_object(seen, sorted(HEADS_SEEN))
        del model
        report["heads_seen_per_rank"] = seen
    barrier(world)

    passed = True
    if rank == 0:
        HEADS_SEEN.clear()
        one = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=NAME)
        one_logits, one_tokens = run_dispatch(one.to(device).eval(), ids, mask, continuation)
        del one
        eager = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
        eager = eager.to(device).eval()
        eager_logits = stepwise(eager, transformers.DynamicCache(config=eager.config), ids, mask, continuation)
        del eager
        reference_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                            attn_implementation="eager")
        reference_model = reference_model.to(device).eval()
        reference = stepwise(reference_model, transformers.DynamicCache(config=reference_model.config), ids, mask,
                             continuation)
        real = torch.cat([mask, torch.ones(len(PROMPTS), DECODE_STEPS, dtype=torch.long)], dim=1).bool()

        def error(logits):
            return (logits[real].double() - reference[real].double()).abs().max().item()

        yardstick = error(eager_logits)
        bound = 2 * yardstick + 1e-2
        report.update(one_gpu_dispatch_error=error(one_logits), eager_same_precision_error=yardstick, bound=bound)
        lines = [f"one GPU: dispatch vs float32 reference {error(one_logits):.4g}, eager {dtype} vs reference "
                 f"{yardstick:.4g} (bound for tensor parallelism: {bound:.4g})"]
        if world > 1:
            expected = {(layer, config.num_attention_heads // world, config.num_key_value_heads // world)
                        for layer in range(config.num_hidden_layers)}
            heads_ok = all(set(map(tuple, seen)) == expected for seen in report["heads_seen_per_rank"])
            tp_error = error(tp_logits)
            tp_vs_one = (tp_logits[real].double() - one_logits[real].double()).abs().max().item()
            tokens_agree = bool(torch.equal(tp_tokens, one_tokens))
            passed = heads_ok and tp_error <= bound
            report.update(heads_ok=heads_ok, tp_error=tp_error, tp_vs_one_gpu=tp_vs_one, greedy_tokens_agree=tokens_agree,
                          passed=passed)
            lines += [f"heads seen per rank (layer, query heads, KV heads): {report['heads_seen_per_rank']}",
                      f"expected on every rank: {config.num_attention_heads // world} query / "
                      f"{config.num_key_value_heads // world} KV heads per layer -> {'ok' if heads_ok else 'WRONG'}",
                      f"tensor parallel ({world} ranks): vs float32 reference {tp_error:.4g}, vs one-GPU dispatch "
                      f"{tp_vs_one:.4g}; greedy tokens {'agree' if tokens_agree else 'differ'} with one GPU",
                      f"{'PASS' if passed else 'FAIL'}: transformers tp_plan='auto' on {world} ranks, attention "
                      f"through dispatch on each rank's heads, logits within {str(dtype).removeprefix('torch.')} "
                      "rounding of one device"]
        else:
            report["passed"] = None
            lines.append("SKIPPED: tensor parallel check (run under torchrun --nproc_per_node 2)")
        print("\n".join(lines), flush=True)
        (out / "transformers_tp.json").write_text(json.dumps(report, indent=2, default=str))
    barrier(world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
