"""Paged attention inputs for any config: for tests, benchmarks and `python -m dispatch selftest`.

`make_inputs(config, q_lens, kv_lens)` draws real-valued q / k / v, quantizes
them the way a serving engine would for the config's mode ("a scale is a
dequantization factor": stored = (x / scale).to(dtype)), scatters keys into
randomly permuted pages, and poisons everything no sequence may read: unused
pages, the tail of each sequence's last page and the padding columns of the
block table all point at NaN (for int8, whose format has no NaN, the
per-token-head scale of such slots is NaN instead). A backend that reads one
of them produces NaN, which every comparison catches.

`reference_attention` is a vectorized float64 implementation of DESIGN.md's
semantics for the selftest; the test suite checks it against its own, naive
oracle (tests/oracle.py) and never uses it as the judge of a backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from typing import Optional

import torch

from dispatch.config import FP8_DTYPES, AttentionConfig, KVQuantMode, canonical_dtype_name

__all__ = ["AttentionInputs", "make_inputs", "alibi_slopes_for", "reference_attention", "output_as_real",
           "unit_roundoff", "Q_SCALE", "K_SCALE", "V_SCALE", "OUTPUT_SCALE"]

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
        """Keyword arguments for tests.oracle.reference_attention."""
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
    """Seeded inputs for `config` with the given per-sequence query and KV lengths.

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



def gather_sequence(cache: torch.Tensor, table_row: torch.Tensor, kv_len: int, config: AttentionConfig):
    """[num_blocks, block_size, H_kv, D] -> one sequence's first kv_len tokens, each KV head repeated
    for the query heads of its group: [kv_len, H, D]."""
    pages = table_row[: math.ceil(kv_len / config.block_size)].long()
    return cache[pages].flatten(0, 1)[:kv_len].repeat_interleave(config.num_queries_per_kv, dim=1)


def apply_score_rules(scores: torch.Tensor, kv_len: int, config: AttentionConfig,
                      alibi_slopes: Optional[torch.Tensor]) -> torch.Tensor:
    """Scaled scores [H, q_len, kv_len] -> softcap, ALiBi, then -inf where a key is not visible
    (bottom-right causal, sliding window), in the dtype of `scores`."""
    q_len = scores.shape[-2]
    if config.logits_soft_cap is not None:
        scores = config.logits_soft_cap * torch.tanh(scores / config.logits_soft_cap)
    pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    key = torch.arange(kv_len)[None, :]
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.to(scores.dtype)[:, None, None] * (key - pos).to(scores.dtype)
    visible = torch.ones(q_len, kv_len, dtype=torch.bool)
    if config.causal:
        visible &= key <= pos
    if config.sliding_window is not None:
        visible &= pos - key < config.sliding_window
    return scores.masked_fill(~visible, float("-inf"))


def reference_attention(inputs: AttentionInputs, config: AttentionConfig) -> torch.Tensor:
    """Float64 attention on the CPU, one sequence at a time, vectorized over heads and tokens.

    Returns real values [num_tokens, num_heads, head_size] (not rounded to the output dtype).
    """
    kw = inputs.kwargs

    def real(stored, scale=None, token_scales=None):
        x = stored.detach().cpu().double()
        if scale is not None:
            x = x * scale.detach().cpu().double().reshape(())
        if token_scales is not None:
            x = x * token_scales.detach().cpu().double()[..., None]
        return x

    q = real(inputs.q, kw.get("q_scale"))
    k = real(inputs.key_cache, kw.get("k_scale"), kw.get("k_scale_cache"))
    v = real(inputs.value_cache, kw.get("v_scale"), kw.get("v_scale_cache"))
    starts = inputs.cu_seqlens_q.cpu().tolist()
    kv_lens = inputs.seq_lens.cpu().tolist()
    table = inputs.block_table.cpu().long()
    out = torch.zeros_like(q)
    slopes = kw["alibi_slopes"].cpu().double() if config.use_alibi else None
    sinks = kw["sinks"].cpu().double() if config.use_sinks else None
    for seq, kv_len in enumerate(kv_lens):
        q_start, q_end = starts[seq], starts[seq + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        keys = gather_sequence(k, table[seq], kv_len, config)  # [kv_len, H, D]
        values = gather_sequence(v, table[seq], kv_len, config)
        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end], keys) * config.scale
        scores = apply_score_rules(scores, kv_len, config, slopes)
        logits = scores if sinks is None else torch.cat([scores, sinks[:, None, None].expand(-1, q_len, 1)], -1)
        probs = torch.softmax(logits, dim=-1)[..., :kv_len]
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, values)
    return out
