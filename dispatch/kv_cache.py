"""Writing keys and values into a paged KV cache the way `dispatch.attention` reads them.

An engine (or the transformers integration) calls `write_kv` once per layer and
step with the new tokens' keys and values; it quantizes them for the config's
KV mode and scatters them into their pages in one vectorized operation, with
no host synchronization (no value is read back from the device), so it can run
inside CUDA-graph capture and the caches may be strided views (vLLM allocates
one [num_blocks, 2, block_size, num_kv_heads, head_size] tensor and passes
``kv[:, 0]`` and ``kv[:, 1]``).

Scale semantics are the attention's (README "The API"):

- A scale is a dequantization factor: real value = ``stored.float() * scale``.
- Quantizing is ``x / scale`` (the quotient formed in float32), rounded to
  nearest (ties to even) in the cache format and saturated to its range:
  +-448 for float8_e4m3fn, +-57344 for float8_e5m2, +-127 for int8
  (symmetric: -128 is never written).
- FP8_PER_TENSOR: one fp32 ``k_scale`` and one ``v_scale`` (one element each)
  for the whole cache, given by the caller (`calibrate_scale` derives one from
  the amax of a sample, e.g. the prefill).
- FP8_PER_TOKEN_HEAD / INT8_PER_TOKEN_HEAD: every token's row of every KV head
  gets its own scale, ``amax(|row|) / format max``, written into
  ``k_scale_cache`` / ``v_scale_cache`` (fp32 [num_blocks, block_size,
  num_kv_heads]) at the token's slot. The row's largest element is stored as
  +-format max, so the whole range is used. An all-zero row (or one whose amax
  is below ``MIN_SCALE * format max``) gets the scale ``MIN_SCALE``, the
  smallest positive normal float32 (about 1.2e-38): positive and finite, so a
  reader never divides by zero or multiplies by NaN, and its stored values are
  zero (or the row's tiny values, exactly representable).
- NONE (16-bit cache): the values are copied unchanged; the keys must already
  have the cache's dtype.

Slots follow vLLM's convention: token t goes to ``slot_mapping[t] = page_id *
block_size + offset``, i.e. page ``slot // block_size``, row ``slot %
block_size`` of that page. `slots_for` computes them from a block table and
token positions. Slots must be distinct and inside the cache: they are not
checked against the cache on the device (that would need a sync), only with
``validate=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from dispatch.config import AttentionConfig, KVQuantMode
from dispatch.errors import InputError

__all__ = [
    "FORMAT_MAX",
    "MIN_SCALE",
    "KVCacheTensors",
    "PagedKV",
    "calibrate_scale",
    "paged_kv_from_dense",
    "per_token_head_scales",
    "quantize",
    "slots_for",
    "write_kv",
    "write_kv_unchecked",
    "zeros_cache",
]

# The largest finite value of each quantized cache format (int8 symmetric).
FORMAT_MAX = {
    torch.float8_e4m3fn: 448.0,
    torch.float8_e5m2: 57344.0,
    torch.int8: 127.0,
}
# The scale an all-zero (or vanishingly small) token row gets: positive, finite, normal.
MIN_SCALE = torch.finfo(torch.float32).tiny

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_ONE_BYTE_FLOATS = (torch.float8_e4m3fn, torch.float8_e5m2)


def _divide_exactly(numerator: torch.Tensor, denominator: float) -> torch.Tensor:
    """numerator / denominator, correctly rounded on every device. On CUDA, PyTorch divides a tensor by a
    Python number as a multiplication by its reciprocal, which can differ in the last bit from the CPU's
    division (per-token-head fp8 pages written on an H200 differed from the CPU's: the likely cause); a
    divisor tensor on the numerator's device is a true division on both."""
    return numerator / torch.full((1,), denominator, dtype=numerator.dtype, device=numerator.device)


def _format_max(dtype: torch.dtype) -> float:
    try:
        return FORMAT_MAX[dtype]
    except KeyError:
        raise InputError(f"kv_cache_dtype: expected one of {sorted(str(d) for d in FORMAT_MAX)} for a quantized "
                         f"cache, got {dtype}") from None


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` rounded to nearest-even in `dtype`, saturated to its range.

    Args:
        x: any shape, float16 / bfloat16 / float32 (the quotient is formed in float32).
        scale: float32, broadcastable to `x` (one element, or [..., 1] per row); positive.
        dtype: torch.float8_e4m3fn, torch.float8_e5m2 or torch.int8.

    Returns:
        `x`'s shape in `dtype`. Dequantize with ``stored.float() * scale``.
    """
    limit = _format_max(dtype)
    if scale.dtype != torch.float32:
        raise InputError(f"scale: expected float32, got {scale.dtype}")
    # A 16-bit x divided by a float32 tensor with dimensions is computed in float32 (type promotion), without
    # first materializing x in float32; a 0-dim scale would not promote, so it gets one dimension.
    scaled = torch.div(x, scale.reshape(1) if scale.dim() == 0 else scale)
    if dtype == torch.int8:
        return scaled.round().clamp_(-limit, limit).to(torch.int8)
    return scaled.clamp_(-limit, limit).to(dtype)


def per_token_head_scales(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dequantization scale of every row: ``max(amax(|x[..., :]|) / format max, MIN_SCALE)``.

    Args:
        x: [num_tokens, num_kv_heads, head_size] (any leading shape), any floating dtype.
        dtype: the cache format (fp8 or int8).

    Returns:
        float32 [num_tokens, num_kv_heads] (x's shape without the last dimension).
    """
    amax = x.abs().amax(dim=-1).float()  # exact in x's own dtype
    return _divide_exactly(amax, _format_max(dtype)).clamp_min_(MIN_SCALE)


def calibrate_scale(x: torch.Tensor, kv_cache_dtype: Union[str, torch.dtype], *, headroom: float = 1.0) -> torch.Tensor:
    """A per-tensor scale from a sample: ``max(amax(|x|) * headroom / format max, MIN_SCALE)``.

    With ``headroom=1`` the sample's largest value is stored as the format's max; later
    values larger than ``headroom`` times the sample's amax saturate. Runs on x's device
    without a host sync.

    Args:
        x: any shape (e.g. the prefill's keys [num_tokens, num_kv_heads, head_size]), floating.
        kv_cache_dtype: the cache format: float8_e4m3fn or float8_e5m2 (or int8).
        headroom: >= 1; how much larger than the sample's amax a value may be before it saturates.

    Returns:
        float32 [1] on x's device, to pass as ``k_scale`` / ``v_scale``.
    """
    if not (headroom >= 1.0 and math.isfinite(headroom)):
        raise InputError(f"headroom: expected a finite number >= 1, got {headroom!r}")
    from dispatch.config import torch_dtype

    dtype = kv_cache_dtype if isinstance(kv_cache_dtype, torch.dtype) else torch_dtype(kv_cache_dtype)
    amax = x.detach().float().abs().amax().reshape(1)
    return _divide_exactly(amax * headroom, _format_max(dtype)).clamp_min_(MIN_SCALE)


def slots_for(block_table: torch.Tensor, seq_index: torch.Tensor, positions: torch.Tensor,
              block_size: int) -> torch.Tensor:
    """vLLM slot ids of tokens given by (sequence, position in that sequence).

    Args:
        block_table: int32/int64 [num_seqs, max_blocks_per_seq]; page ids of each sequence.
        seq_index: int [num_tokens]; the sequence (row of block_table) of each token.
        positions: int [num_tokens]; the token's position in its sequence (0-based).
        block_size: tokens per page.

    Returns:
        int64 [num_tokens]: ``block_table[seq, pos // block_size] * block_size + pos % block_size``.
    """
    positions = positions.long()
    pages = block_table[seq_index.long(), torch.div(positions, block_size, rounding_mode="floor")].long()
    return pages * block_size + torch.remainder(positions, block_size)


# ---- argument checks (metadata only: no sync) ----------------------------------------


def _describe(t) -> str:
    if t is None:
        return "None"
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _check_cache(name: str, cache, config: AttentionConfig, device: torch.device) -> None:
    want = (config.block_size, config.num_kv_heads, config.head_size)
    if not isinstance(cache, torch.Tensor) or cache.dim() != 4 or tuple(cache.shape[1:]) != want:
        raise InputError(f"{name}: expected [num_blocks, {want[0]}, {want[1]}, {want[2]}] "
                         f"([num_blocks, block_size, num_kv_heads, head_size]), got {_describe(cache)}")
    if cache.dtype != config.kv_cache_torch_dtype:
        raise InputError(f"{name}: expected dtype {config.kv_cache_torch_dtype} (kv_cache_dtype), got {cache.dtype}")
    if cache.device != device:
        raise InputError(f"{name}: expected a tensor on {device} (the device of key), got one on {cache.device}")
    if cache.stride(-1) != 1:
        raise InputError(f"{name}: expected a contiguous last dimension (stride 1), got strides {cache.stride()}")


def _check_scalar(name: str, t, device: torch.device, why: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: required {why}, got {_describe(t)}")
    if t.numel() != 1 or t.dtype != torch.float32 or t.device != device:
        raise InputError(f"{name}: expected a float32 tensor of one element on {device} {why}, got {_describe(t)}")


def _absent(name: str, t, why: str) -> None:
    if t is not None:
        raise InputError(f"{name}: must be None {why}, got {_describe(t)}")


def _check_write_inputs(key, value, key_cache, value_cache, slot_mapping, config, k_scale, v_scale,
                        k_scale_cache, v_scale_cache) -> None:
    if not isinstance(config, AttentionConfig):
        raise InputError(f"config: expected an AttentionConfig, got {type(config).__name__}")
    if not isinstance(key, torch.Tensor):
        raise InputError(f"key: expected a tensor [num_tokens, num_kv_heads, head_size], got {_describe(key)}")
    device = key.device
    shape = (config.num_kv_heads, config.head_size)
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != shape:
            raise InputError(f"{name}: expected [num_tokens, {shape[0]}, {shape[1]}] "
                             f"([num_tokens, num_kv_heads, head_size]), got {_describe(t)}")
        if t.dtype not in _SIXTEEN_BIT:
            raise InputError(f"{name}: expected float16 or bfloat16, got {t.dtype}")
        if t.device != device:
            raise InputError(f"{name}: expected a tensor on {device} (the device of key), got one on {t.device}")
    if value.shape != key.shape or value.dtype != key.dtype:
        raise InputError(f"value: expected the shape and dtype of key ({_describe(key)}), got {_describe(value)}")
    mode = config.kv_quant_mode
    if mode is KVQuantMode.NONE and key.dtype != config.kv_cache_torch_dtype:
        raise InputError(f"key: expected dtype {config.kv_cache_torch_dtype} for kv_quant_mode=NONE "
                         f"(a 16-bit cache stores the keys unchanged), got {key.dtype}")
    _check_cache("key_cache", key_cache, config, device)
    _check_cache("value_cache", value_cache, config, device)
    if value_cache.shape != key_cache.shape:
        raise InputError(f"value_cache: expected the shape of key_cache {tuple(key_cache.shape)}, "
                         f"got {tuple(value_cache.shape)}")
    if (not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1
            or slot_mapping.dtype not in (torch.int32, torch.int64) or slot_mapping.shape[0] != key.shape[0]):
        raise InputError(f"slot_mapping: expected an int32 or int64 tensor [num_tokens={key.shape[0]}], "
                         f"got {_describe(slot_mapping)}")
    if slot_mapping.device != device:
        raise InputError(f"slot_mapping: expected a tensor on {device} (the device of key), "
                         f"got one on {slot_mapping.device}")
    why = f"for kv_quant_mode={mode.value}"
    if mode is KVQuantMode.FP8_PER_TENSOR:
        _check_scalar("k_scale", k_scale, device, why)
        _check_scalar("v_scale", v_scale, device, why)
    else:
        _absent("k_scale", k_scale, why)
        _absent("v_scale", v_scale, why)
    if mode.is_per_token_head:
        want = (key_cache.shape[0], config.block_size, config.num_kv_heads)
        for name, t in (("k_scale_cache", k_scale_cache), ("v_scale_cache", v_scale_cache)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or t.dtype != torch.float32:
                raise InputError(f"{name}: expected float32 {list(want)} ([num_blocks, block_size, num_kv_heads]) "
                                 f"{why}, got {_describe(t)}")
            if t.device != device:
                raise InputError(f"{name}: expected a tensor on {device} (the device of key), got one on {t.device}")
    else:
        _absent("k_scale_cache", k_scale_cache, why)
        _absent("v_scale_cache", v_scale_cache, why)


def _check_slot_values(slot_mapping: torch.Tensor, key_cache: torch.Tensor, block_size: int) -> None:
    """Debug-mode check: reads the slots on the host (a sync on a GPU)."""
    slots = slot_mapping.detach().cpu().long()
    capacity = key_cache.shape[0] * block_size
    bad = (slots < 0) | (slots >= capacity)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise InputError(f"slot_mapping: token {index} has slot {int(slots[index])}, not in [0, {capacity}) "
                         f"(num_blocks={key_cache.shape[0]} x block_size={block_size})")
    if slots.unique().numel() != slots.numel():
        raise InputError("slot_mapping: slots must be distinct (two tokens written to one slot)")


def zeros_cache(shape: Sequence[int], dtype: torch.dtype, device: Union[str, torch.device]) -> torch.Tensor:
    """A zero-filled cache tensor of any cache dtype (fp8 through its bytes: zero bits are 0.0 in every format)."""
    if dtype in _ONE_BYTE_FLOATS:
        return torch.zeros(tuple(shape), dtype=torch.uint8, device=device).view(dtype)
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


def _scatter(cache: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> None:
    """cache[pages[t], offsets[t]] = rows[t] for every t, in place, through any strides."""
    if cache.dtype in _ONE_BYTE_FLOATS:
        # Through the raw bytes: index_put_ on fp8 is not implemented on every torch version / device.
        cache.view(torch.uint8).index_put_((pages, offsets), rows.view(torch.uint8))
    else:
        cache.index_put_((pages, offsets), rows)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    config: AttentionConfig,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    v_scale_cache: Optional[torch.Tensor] = None,
    validate: bool = False,
) -> None:
    """Quantize new keys and values for ``config.kv_quant_mode`` and write them into their slots.

    Args:
        key, value: [num_tokens, num_kv_heads, head_size] in float16 or bfloat16 (for
            kv_quant_mode NONE: the cache's dtype); the new tokens of all sequences.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size] in
            ``config.kv_cache_dtype``; written in place. Any strides with a contiguous last
            dimension (e.g. views ``kv[:, 0]`` / ``kv[:, 1]`` of one [num_blocks, 2, ...] tensor).
        slot_mapping: int32 or int64 [num_tokens]; token t goes to page
            ``slot_mapping[t] // block_size``, row ``slot_mapping[t] % block_size``.
            Distinct, in range (see `slots_for`).
        config: the AttentionConfig the cache is read with (num_kv_heads, head_size,
            block_size, kv_cache_dtype, kv_quant_mode).
        k_scale, v_scale: float32 [1]; required for FP8_PER_TENSOR (see `calibrate_scale`),
            else None.
        k_scale_cache, v_scale_cache: float32 [num_blocks, block_size, num_kv_heads]; required
            for FP8_PER_TOKEN_HEAD and INT8_PER_TOKEN_HEAD, else None; each written token's
            scales are stored at its slot.
        validate: also check the slots on the host (range, distinct): a sync, for debugging.

    One vectorized scatter per tensor, no Python loop over tokens and no host sync (unless
    ``validate``). Raises InputError (naming the argument) when a tensor does not match
    the config.
    """
    _check_write_inputs(key, value, key_cache, value_cache, slot_mapping, config, k_scale, v_scale,
                        k_scale_cache, v_scale_cache)
    if validate:
        _check_slot_values(slot_mapping, key_cache, config.block_size)
    write_kv_unchecked(key, value, key_cache, value_cache, slot_mapping, config, k_scale, v_scale, k_scale_cache,
                       v_scale_cache)


def write_kv_unchecked(key, value, key_cache, value_cache, slot_mapping, config, k_scale, v_scale, k_scale_cache,
                       v_scale_cache) -> None:
    """`write_kv` without its argument checks, for a caller that checked the same tensors once (an engine's
    per-step loop over layers). Wrong shapes or dtypes here give wrong caches or errors from torch."""
    slots = slot_mapping.long()
    block_size = config.block_size
    pages = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots - pages * block_size
    mode = config.kv_quant_mode
    cache_dtype = config.kv_cache_torch_dtype
    if mode is KVQuantMode.NONE:
        stored_k, stored_v = key, value
    elif mode is KVQuantMode.FP8_PER_TENSOR:
        stored_k = quantize(key, k_scale.reshape(1), cache_dtype)
        stored_v = quantize(value, v_scale.reshape(1), cache_dtype)
    else:
        row_k = per_token_head_scales(key, cache_dtype)
        row_v = per_token_head_scales(value, cache_dtype)
        stored_k = quantize(key, row_k[..., None], cache_dtype)
        stored_v = quantize(value, row_v[..., None], cache_dtype)
        k_scale_cache.index_put_((pages, offsets), row_k)
        v_scale_cache.index_put_((pages, offsets), row_v)
    _scatter(key_cache, pages, offsets, stored_k)
    _scatter(value_cache, pages, offsets, stored_v)


# ---- dense per-sequence K/V -> paged tensors -------------------------------------------


class KVCacheTensors:
    """What any holder of a paged cache answers from its ``key_cache``, ``value_cache``, ``k_scale``,
    ``v_scale``, ``k_scale_cache`` and ``v_scale_cache`` attributes (None where the mode has none)."""

    _SCALE_NAMES = ("k_scale", "v_scale", "k_scale_cache", "v_scale_cache")

    def scales(self) -> dict:
        """The scale keywords of `dispatch.attention` this cache needs (the others are absent)."""
        return {name: getattr(self, name) for name in self._SCALE_NAMES if getattr(self, name) is not None}

    def nbytes(self) -> int:
        """Bytes held by the pages and their scales."""
        tensors = (self.key_cache, self.value_cache, self.k_scale_cache, self.v_scale_cache)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class PagedKV(KVCacheTensors):
    """A paged KV cache with its block table, ready for `dispatch.attention`.

    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size] in kv_cache_dtype.
    block_table: int32 [num_seqs, max_blocks_per_seq]; sequence s's key j lives in page
        ``block_table[s, j // block_size]``, row ``j % block_size``; unused columns hold page 0.
    seq_lens: int32 [num_seqs]; keys per sequence.
    k_scale, v_scale: float32 [1] (FP8_PER_TENSOR) or None.
    k_scale_cache, v_scale_cache: float32 [num_blocks, block_size, num_kv_heads] (per-token-head
        modes) or None.
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    k_scale: Optional[torch.Tensor] = None
    v_scale: Optional[torch.Tensor] = None
    k_scale_cache: Optional[torch.Tensor] = None
    v_scale_cache: Optional[torch.Tensor] = None


def _as_sequences(name: str, data) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise InputError(f"{name}: expected a list of [seq_len, num_kv_heads, head_size] tensors or one "
                             f"[num_seqs, seq_len, num_kv_heads, head_size] tensor, got {_describe(data)}")
        return list(data.unbind(0))
    sequences = list(data)
    if not sequences or not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in sequences):
        raise InputError(f"{name}: expected a non-empty list of [seq_len, num_kv_heads, head_size] tensors, "
                         f"got {[_describe(t) for t in sequences]}")
    return sequences


def paged_kv_from_dense(
    keys: Union[torch.Tensor, Sequence[torch.Tensor]],
    values: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    config: AttentionConfig,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    spare_blocks: int = 0,
) -> PagedKV:
    """Build a paged cache (pages, block table, lengths, scales) from dense per-sequence K/V.

    Sequence s gets ``ceil(len_s / block_size)`` consecutive pages; its tokens are written
    with `write_kv`, so the quantization is exactly what an engine writing token by token
    would store.

    Args:
        keys, values: a list of [len_s, num_kv_heads, head_size] tensors (one per sequence,
            16-bit), or one [num_seqs, seq_len, num_kv_heads, head_size] tensor (equal lengths).
        config: gives block_size, kv_cache_dtype and kv_quant_mode.
        k_scale, v_scale: float32 [1] for FP8_PER_TENSOR; when None, calibrated from these
            keys / values (`calibrate_scale`, headroom 1). Must be None for the other modes.
        spare_blocks: extra, unused pages at the end (room for later tokens).

    Returns:
        A `PagedKV` on the keys' device.
    """
    key_list, value_list = _as_sequences("keys", keys), _as_sequences("values", values)
    if len(key_list) != len(value_list) or any(k.shape != v.shape for k, v in zip(key_list, value_list)):
        raise InputError(f"values: expected the shapes of keys {[tuple(k.shape) for k in key_list]}, "
                         f"got {[tuple(v.shape) for v in value_list]}")
    if spare_blocks < 0:
        raise InputError(f"spare_blocks: expected >= 0, got {spare_blocks}")
    bs = config.block_size
    lengths = [k.shape[0] for k in key_list]
    pages_per_seq = [max(1, math.ceil(n / bs)) for n in lengths]
    num_blocks = sum(pages_per_seq) + spare_blocks
    device = key_list[0].device
    starts = [0]
    for n in pages_per_seq[:-1]:
        starts.append(starts[-1] + n)
    block_table = torch.zeros(len(lengths), max(pages_per_seq), dtype=torch.int32)
    for s, (start, n) in enumerate(zip(starts, pages_per_seq)):
        block_table[s, :n] = torch.arange(start, start + n, dtype=torch.int32)
    # Sequence s's tokens fill its consecutive pages from the first row: slot = start page * bs + position.
    slot_mapping = torch.cat([torch.arange(n) + start * bs for n, start in zip(lengths, starts)])
    key = torch.cat(key_list)
    value = torch.cat(value_list)
    shape = (num_blocks, bs, config.num_kv_heads, config.head_size)
    cache_dtype = config.kv_cache_torch_dtype
    key_cache, value_cache = zeros_cache(shape, cache_dtype, device), zeros_cache(shape, cache_dtype, device)
    mode = config.kv_quant_mode
    scales: dict = {}
    if mode is KVQuantMode.FP8_PER_TENSOR:
        scales["k_scale"] = k_scale if k_scale is not None else calibrate_scale(key, cache_dtype)
        scales["v_scale"] = v_scale if v_scale is not None else calibrate_scale(value, cache_dtype)
    elif mode.is_per_token_head:
        scales["k_scale_cache"] = torch.zeros(shape[:3], dtype=torch.float32, device=device)
        scales["v_scale_cache"] = torch.zeros(shape[:3], dtype=torch.float32, device=device)
    # A scale given for a mode that takes none reaches write_kv, which refuses it by name.
    write_kv(key, value, key_cache, value_cache, slot_mapping.to(device), config=config,
             k_scale=scales.get("k_scale", k_scale), v_scale=scales.get("v_scale", v_scale),
             k_scale_cache=scales.get("k_scale_cache"), v_scale_cache=scales.get("v_scale_cache"))
    return PagedKV(key_cache=key_cache, value_cache=value_cache, block_table=block_table.to(device),
                   seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device), **scales)
