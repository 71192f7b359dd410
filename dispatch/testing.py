"""Paged attention inputs for any config: for tests, benchmarks, examples and `python -m dispatch selftest`.

`make_inputs(config, q_lens, kv_lens)` builds the six tensors and the scales
of one `dispatch.attention` call the way a serving engine holds them, from
seeded dense values. It is the test-input builder (random values, poisoned
memory); an engine writes its own K/V into pages as they are produced.

The paged layout it builds, which is what every engine must hand over:

- Sequence s has q_lens[s] new query tokens and kv_lens[s] keys (its context
  plus those new tokens). Queries of all sequences are packed along dim 0 of
  q [num_tokens, num_heads, head_size]; cu_seqlens_q (int32 [num_seqs + 1]) is
  the running sum of q_lens, so sequence s owns rows cu_seqlens_q[s] to
  cu_seqlens_q[s + 1]; seq_lens (int32 [num_seqs]) is kv_lens.
- The caches are pools of pages: key_cache / value_cache [num_blocks,
  block_size, num_kv_heads, head_size]. Sequence s gets ceil(kv_lens[s] /
  block_size) pages, anywhere in the pool (here: a random permutation, so
  nothing relies on pages being in order); block_table (int32 [num_seqs,
  max_blocks_per_seq]) lists them in order, so key token j of sequence s sits
  at key_cache[block_table[s, j // block_size], j % block_size]. Columns past
  a sequence's last page are padding (never read).
- Values are quantized as an engine would for the config's mode ("a scale is
  a dequantization factor": stored = (x / scale).to(dtype)): one fp32 scale
  each for q / k / v (FP8_PER_TENSOR), or one per token and KV head in
  k_scale_cache / v_scale_cache [num_blocks, block_size, num_kv_heads]
  (amax / format max, per slot).

Everything no sequence may read is poisoned: unused pages, the tail of each
sequence's last page and the padding columns of the block table all point at
NaN (for int8, whose format has no NaN, the per-token-head scale of such slots
is NaN instead). A backend that reads one of them produces NaN, which every
comparison catches.

The float64 judge is dispatch.reference (the oracle; `oracle_kwargs` maps a
config to its keywords); named cases to feed `make_inputs` are in dispatch.cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dispatch.config import FP8_DTYPES, AttentionConfig, KVQuantMode, canonical_dtype_name

__all__ = ["AttentionInputs", "make_inputs", "engine_views", "alibi_slopes_for", "output_as_real", "unit_roundoff",
           "Q_SCALE",
           "K_SCALE", "V_SCALE", "OUTPUT_SCALE"]

# Unit roundoff (half an ulp at 1.0) of each floating format: the size of one rounding.
_UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8, "float8_e4m3fn": 2.0**-4,
                  "float8_e5m2": 2.0**-3}


def unit_roundoff(dtype) -> float:
    """Unit roundoff of a dtype given as torch.dtype or name ('bf16', torch.float16, ...)."""
    return _UNIT_ROUNDOFF[canonical_dtype_name(dtype)]

# Non-unit, distinct scales (the FP8 case of vLLM PR #42080).
Q_SCALE = 0.75
K_SCALE = 0.5
V_SCALE = 0.25
OUTPUT_SCALE = 0.05


@dataclass
class AttentionInputs:
    """The positional tensors and keyword scales of one `dispatch.attention` call."""

    q: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    kwargs: dict = field(default_factory=dict)  # q_scale, k_scale, ..., only those the config uses

    @property
    def args(self) -> tuple:
        return (self.q, self.key_cache, self.value_cache, self.cu_seqlens_q, self.seq_lens, self.block_table)

    def oracle_kwargs(self, config: AttentionConfig) -> dict:
        """Keyword arguments for dispatch.reference.reference_attention (the oracle), which reads no config."""
        kw = {k: v for k, v in self.kwargs.items() if k not in ("output_scale", "out")}
        return dict(
            kw,
            causal=config.causal,
            softmax_scale=config.softmax_scale,
            sliding_window=config.sliding_window,
            logits_soft_cap=config.logits_soft_cap,
        )


def _quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in `dtype`, rounded to nearest (int8: also clamped to +-127)."""
    scaled = x / scale
    if dtype == torch.int8:
        return scaled.round().clamp(-127, 127).to(torch.int8)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        limit = torch.finfo(dtype).max
        return scaled.clamp(-limit, limit).to(dtype)
    return scaled.to(dtype)


def alibi_slopes_for(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes (closest power of two, then interleaved)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:
        extra = 2.0 ** (-4.0 / closest)
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def make_inputs(
    config: AttentionConfig,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    poison: bool = True,
    extra_blocks: int = 2,
    q_scale: float = Q_SCALE,
    k_scale: float = K_SCALE,
    v_scale: float = V_SCALE,
    output_scale: float = OUTPUT_SCALE,
    value_range: float = 1.0,
    generate_on_device: bool = False,
) -> AttentionInputs:
    """Seeded inputs for `config` with the given per-sequence query and KV lengths (layout: module docstring).

    Returns AttentionInputs: q [sum(q_lens), num_heads, head_size] in q_dtype;
    key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_size] in
    kv_cache_dtype, num_blocks = the pages the sequences need + `extra_blocks`;
    cu_seqlens_q int32 [num_seqs + 1]; seq_lens int32 [num_seqs] (= kv_lens);
    block_table int32 [num_seqs, max pages + 1] (the last column is padding);
    and in `kwargs` only the fp32 scales and per-head tensors the config uses
    (q_scale, k_scale, v_scale [1]; k_scale_cache, v_scale_cache [num_blocks,
    block_size, num_kv_heads]; alibi_slopes, sinks [num_heads]; output_scale
    [1] for an fp8 output). Real values are N(0, value_range^2), K and V with
    a different gain per KV head so per-token-head scales really differ.
    ``poison=False`` leaves unused memory finite (for timing, or to show that
    poisoning changes nothing).

    Values are drawn on the CPU, so a seed gives the same inputs on every device
    (tests compare a GPU run with a CPU oracle). ``generate_on_device=True`` draws
    them on `device` instead: much faster for benchmark-sized caches, but the
    values then depend on the device.
    """
    if len(q_lens) != len(kv_lens) or any(q > k for q, k in zip(q_lens, kv_lens)):
        raise ValueError(f"need q_len <= kv_len per sequence, got q_lens={q_lens} kv_lens={kv_lens}")
    dev = torch.device(device)
    home = dev if generate_on_device else torch.device("cpu")
    gen = torch.Generator(device=home).manual_seed(seed)
    heads, kv_heads, d, bs = config.num_heads, config.num_kv_heads, config.head_size, config.block_size
    mode = config.kv_quant_mode
    cache_dtype = config.kv_cache_torch_dtype
    num_tokens = sum(q_lens)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=home) * value_range

    # Pages: each sequence gets ceil(kv_len / bs) distinct pages, drawn from a shuffled pool
    # that also holds `extra_blocks` pages nobody owns.
    pages_per_seq = [max(1, math.ceil(k / bs)) for k in kv_lens]
    num_blocks = sum(pages_per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen, device=home)
    unused = perm[sum(pages_per_seq):]
    width = max(pages_per_seq) + 1  # one padding column, always
    pad_page = int(unused[0]) if len(unused) else 0
    block_table = torch.full((len(kv_lens), width), pad_page, dtype=torch.int32, device=home)
    used_slots = torch.zeros(num_blocks, bs, dtype=torch.bool, device=home)
    start = 0
    for s, (n, kv_len) in enumerate(zip(pages_per_seq, kv_lens)):
        pages = perm[start : start + n]
        start += n
        block_table[s, :n] = pages.to(torch.int32)
        slots = torch.arange(kv_len, device=home)
        used_slots[pages[slots // bs], slots % bs] = True

    # Real values; per-head magnitudes differ so per-token-head scales really differ.
    head_gain = torch.linspace(0.5, 2.0, kv_heads, device=home).view(1, 1, kv_heads, 1)
    k_real = randn(num_blocks, bs, kv_heads, d) * head_gain
    v_real = randn(num_blocks, bs, kv_heads, d) * head_gain.flip(2)
    q_real = randn(num_tokens, heads, d)

    kwargs: dict = {}
    if config.q_is_fp8:
        qs = torch.tensor([q_scale], dtype=torch.float32, device=home)
        q = _quantize(q_real, qs, config.q_torch_dtype)
        kwargs["q_scale"] = qs
    else:
        q = q_real.to(config.q_torch_dtype)

    if mode is KVQuantMode.NONE:
        key_cache, value_cache = k_real.to(cache_dtype), v_real.to(cache_dtype)
    elif mode is KVQuantMode.FP8_PER_TENSOR:
        ks = torch.tensor([k_scale], dtype=torch.float32, device=home)
        vs = torch.tensor([v_scale], dtype=torch.float32, device=home)
        key_cache, value_cache = _quantize(k_real, ks, cache_dtype), _quantize(v_real, vs, cache_dtype)
        kwargs.update(k_scale=ks, v_scale=vs)
    else:
        # Per token and head: scale = amax / format max, so each slot uses its own scale.
        qmax = 127.0 if cache_dtype == torch.int8 else torch.finfo(cache_dtype).max
        ksc = (k_real.abs().amax(-1) / qmax).clamp_min(1e-6)
        vsc = (v_real.abs().amax(-1) / qmax).clamp_min(1e-6)
        key_cache = _quantize(k_real, ksc[..., None], cache_dtype)
        value_cache = _quantize(v_real, vsc[..., None], cache_dtype)
        kwargs.update(k_scale_cache=ksc.float(), v_scale_cache=vsc.float())

    if poison:
        unused_mask = ~used_slots
        if cache_dtype == torch.int8:
            key_cache[unused_mask] = 127
            value_cache[unused_mask] = -127
        else:
            # Through the raw bytes: fp8 tensors have no masked_fill; NaN casts to NaN in every float format.
            nan = (torch.tensor(float("nan"), dtype=cache_dtype, device=home).view(torch.uint8)
                   if cache_dtype.itemsize == 1 else None)
            for cache in (key_cache, value_cache):
                if nan is not None:
                    cache.view(torch.uint8)[unused_mask] = nan
                else:
                    cache[unused_mask] = float("nan")
        if "k_scale_cache" in kwargs:
            kwargs["k_scale_cache"][unused_mask] = float("nan")
            kwargs["v_scale_cache"][unused_mask] = float("nan")

    if config.use_alibi:
        kwargs["alibi_slopes"] = alibi_slopes_for(heads)
    if config.use_sinks:
        kwargs["sinks"] = torch.randn(heads, generator=gen, device=home) * 2.0
    if config.out_dtype in FP8_DTYPES:
        kwargs["output_scale"] = torch.tensor([output_scale], dtype=torch.float32)

    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    return AttentionInputs(
        q=q.to(dev),
        key_cache=key_cache.to(dev),
        value_cache=value_cache.to(dev),
        cu_seqlens_q=cu.to(dev),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
        block_table=block_table.to(dev),
        kwargs={k: v.to(dev) for k, v in kwargs.items()},
    )


def output_as_real(out: torch.Tensor, config: AttentionConfig, inputs: AttentionInputs) -> torch.Tensor:
    """A backend's output as float64 real values (fp8 output dequantized by output_scale)."""
    real = out.detach().cpu().to(torch.float64)
    if config.out_is_fp8:
        real = real * float(inputs.kwargs["output_scale"].cpu()[0])
    return real


def engine_views(inputs: AttentionInputs, config: AttentionConfig, layout: str = "NHD") -> AttentionInputs:
    """The same call as `inputs`, laid out the way a serving engine holds it: views, no contiguous tensor.

    - key_cache / value_cache: vLLM's split of one packed cache per layer, logically
      [num_blocks, num_kv_heads, block_size, 2 * head_size] (K then V in the last dimension), stored
      "NHD" ([num_blocks, block_size, num_kv_heads, 2 * head_size], vLLM's default) or "HND"
      (the logical order), and split with ``kv_cache.transpose(1, 2).split(head_size, -1)``;
    - k_scale_cache / v_scale_cache: ``as_strided`` views into one buffer holding both;
    - q: the query columns of a fused QKV projection; out: a slice of a wider step buffer;
    - block_table: the first columns of a wider table (vLLM keeps one [max_requests, max_pages]);
    - alibi_slopes / sinks: every other element of a longer vector.
    Every value equals the one in `inputs` (poisoned slots included); `kwargs` gains ``out``.
    """
    if layout not in ("NHD", "HND"):
        raise ValueError(f"layout: expected 'NHD' or 'HND', got {layout!r}")
    num_blocks, block_size, kv_heads, head_size = inputs.key_cache.shape
    device = inputs.q.device
    if layout == "NHD":
        packed = torch.empty(num_blocks, block_size, kv_heads, 2 * head_size, dtype=inputs.key_cache.dtype,
                             device=device).permute(0, 2, 1, 3)
    else:
        packed = torch.empty(num_blocks, kv_heads, block_size, 2 * head_size, dtype=inputs.key_cache.dtype,
                             device=device)
    key_cache, value_cache = packed.transpose(1, 2).split(head_size, -1)
    key_cache.copy_(inputs.key_cache)
    value_cache.copy_(inputs.value_cache)

    tokens, heads, _ = inputs.q.shape
    qkv = torch.empty(tokens, (heads + 2 * kv_heads) * head_size, dtype=inputs.q.dtype, device=device)
    q = qkv[:, : heads * head_size].view(tokens, heads, head_size)
    q.copy_(inputs.q)
    out = torch.empty(tokens, heads + 2, head_size, dtype=config.out_torch_dtype, device=device)[:, 1: heads + 1]

    rows, columns = inputs.block_table.shape
    wide_table = inputs.block_table[:, -1:].repeat(1, columns + 3)  # padding: the input's own padding page
    wide_table[:, :columns] = inputs.block_table
    block_table = wide_table[:, :columns]

    kwargs = dict(inputs.kwargs, out=out)
    if "k_scale_cache" in kwargs:
        both = torch.empty(num_blocks * block_size * kv_heads * 2, dtype=torch.float32, device=device)
        shape, strides = (num_blocks, block_size, kv_heads), (block_size * kv_heads * 2, kv_heads * 2, 2)
        for offset, name in enumerate(("k_scale_cache", "v_scale_cache")):
            view = both.as_strided(shape, strides, offset)
            view.copy_(inputs.kwargs[name])
            kwargs[name] = view
    for name in ("alibi_slopes", "sinks"):
        if name in kwargs:
            kwargs[name] = kwargs[name].repeat_interleave(2)[::2]
    return AttentionInputs(q=q, key_cache=key_cache, value_cache=value_cache, cu_seqlens_q=inputs.cu_seqlens_q,
                           seq_lens=inputs.seq_lens, block_table=block_table, kwargs=kwargs)
