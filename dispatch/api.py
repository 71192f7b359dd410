"""`attention()`: check the tensors against the config, then run the selected backend.

Every check reads only tensor metadata (shape, dtype, device, strides); none
reads a value back from the GPU, so the call stays capturable in a CUDA graph.
Checks of the values themselves (lengths consistent, page ids in range) need
the values on the host: they run only in debug mode, with ``validate=True`` or
the environment variable DISPATCH_DEBUG=1 (read once, at import).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Optional

import torch

from dispatch import registry
from dispatch.config import AttentionConfig, KVQuantMode
from dispatch.errors import InputError
from dispatch.overrides import Override, _override
from dispatch.selector import Plan, select

__all__ = ["attention"]

DEBUG = os.environ.get("DISPATCH_DEBUG", "0") not in ("", "0")

# Bound once: the hot path skips the attribute lookups. torch.compile still recognizes the function itself.
_is_compiling = torch.compiler.is_compiling
# The contextvar's bound get(): current_override() without its Python call layer.
_current_override = _override.get


class _CallSpec:
    """What a valid call with one config looks like, precomputed: the hot path's checks.

    `fast_check()` is a fast, conservative predicate over tensor metadata. When it says
    no, `check_inputs()` runs and names the problem (or finds none: `fast_check()` is
    stricter, e.g. it wants whole tensors contiguous where only the last dimension
    must be). The plan for each (tensor device, `dispatch.use()` override) is cached
    here too, in front of select()'s own cache, so a cached call neither hashes the
    config nor resolves the device.
    """

    __slots__ = ("config", "q_dtype", "cache_dtype", "out_dtype", "dtypes", "heads", "head_size", "block_size",
                 "kv_heads", "heads_shape", "q_row_bytes", "out_row_bytes", "page_bytes", "needed", "scalar_scales",
                 "scale_caches", "head_vectors", "plans", "last_plan")

    def __init__(self, config: AttentionConfig):
        mode = config.kv_quant_mode
        self.config = config
        self.q_dtype, self.cache_dtype, self.out_dtype = (config.q_torch_dtype, config.kv_cache_torch_dtype,
                                                          config.out_torch_dtype)
        self.dtypes = (self.q_dtype, self.cache_dtype, self.cache_dtype, torch.int32, torch.int32, torch.int32)
        self.heads, self.head_size = config.num_heads, config.head_size
        self.block_size, self.kv_heads = config.block_size, config.num_kv_heads
        self.heads_shape = (config.num_heads,)  # alibi_slopes, sinks
        # Bytes per token of q and out, and per page of a KV cache: the sizes of contiguous tensors of known shape.
        self.q_row_bytes = config.num_heads * config.head_size * self.q_dtype.itemsize
        self.out_row_bytes = config.num_heads * config.head_size * self.out_dtype.itemsize
        self.page_bytes = config.block_size * config.num_kv_heads * config.head_size * self.cache_dtype.itemsize
        # which of q_scale, k_scale, v_scale, k_scale_cache, v_scale_cache, alibi_slopes, sinks, output_scale
        self.needed = (config.q_is_fp8, mode is KVQuantMode.FP8_PER_TENSOR, mode is KVQuantMode.FP8_PER_TENSOR,
                       mode.is_per_token_head, mode.is_per_token_head, config.use_alibi, config.use_sinks,
                       config.out_is_fp8)
        # Which groups of scale checks can apply at all, so a config without them skips the group's code.
        self.scalar_scales = config.q_is_fp8 or mode is KVQuantMode.FP8_PER_TENSOR or config.out_is_fp8
        self.scale_caches = mode.is_per_token_head
        self.head_vectors = config.use_alibi or config.use_sinks
        self.plans: dict[tuple[torch.device, Override], Plan] = {}
        # (device, override, plan) of the last plan handed out: one tuple, so a reader on another thread sees
        # a consistent triple. It spares the common call a dict lookup, whose key hashes the Override
        # dataclass (a Python-level __hash__, more than 100 ns).
        self.last_plan: tuple = (None, None, None)

    def fast_check(self, q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, q_scale, k_scale,
                   v_scale, k_scale_cache, v_scale_cache, alibi_slopes, sinks, output_scale, out):
        """The device of q when every fast check passes, else None (then `check_inputs()` decides).

        Written for speed (this is the per-call cost of the dispatcher): each torch attribute read costs
        50-110 ns and dominates, so every tensor attribute is read once, and nothing is read that the
        shapes already tell (the byte sizes for the aliasing test); shapes are indexed, not sliced
        (slicing a torch.Size costs more than two indexes).
        """
        try:
            device = q.device
            q_shape, k_shape = q.shape, key_cache.shape
            lens_shape, cu_shape, table_shape = seq_lens.shape, cu_seqlens_q.shape, block_table.shape
            # The six dtypes in one tuple comparison (dtypes are singletons: its identity test decides each).
            if ((q.dtype, key_cache.dtype, value_cache.dtype, seq_lens.dtype, cu_seqlens_q.dtype, block_table.dtype)
                    != self.dtypes
                    or len(q_shape) != 3 or q_shape[1] != self.heads or q_shape[2] != self.head_size
                    or len(k_shape) != 4 or k_shape[1] != self.block_size or k_shape[2] != self.kv_heads
                    or k_shape[3] != self.head_size or value_cache.shape != k_shape
                    or len(lens_shape) != 1 or len(cu_shape) != 1 or len(table_shape) != 2
                    or cu_shape[0] != lens_shape[0] + 1 or table_shape[0] != lens_shape[0] or table_shape[1] == 0
                    or key_cache.device != device or value_cache.device != device or seq_lens.device != device
                    or cu_seqlens_q.device != device or block_table.device != device
                    or not (q.is_contiguous() and key_cache.is_contiguous() and value_cache.is_contiguous()
                            and seq_lens.is_contiguous() and cu_seqlens_q.is_contiguous()
                            and block_table.is_contiguous())):
                return None
            # The scales the config needs are present and the others absent: one tuple comparison. Past it,
            # a group's tensors are either all None or all needed, so `is not None` picks the ones to check.
            if (q_scale is not None, k_scale is not None, v_scale is not None, k_scale_cache is not None,
                    v_scale_cache is not None, alibi_slopes is not None, sinks is not None,
                    output_scale is not None) != self.needed:
                return None
            if self.scalar_scales:
                for scale in (q_scale, k_scale, v_scale, output_scale):
                    if scale is not None and (scale.dtype is not torch.float32 or scale.device != device
                                              or scale.numel() != 1):
                        return None
            if self.scale_caches:
                cache_shape = (k_shape[0], self.block_size, self.kv_heads)
                for scale in (k_scale_cache, v_scale_cache):
                    if (scale.dtype is not torch.float32 or scale.shape != cache_shape or scale.device != device
                            or not scale.is_contiguous()):
                        return None
            if self.head_vectors:
                for vector in (alibi_slopes, sinks):
                    if vector is not None and (vector.dtype is not torch.float32 or vector.shape != self.heads_shape
                                               or vector.device != device):
                        return None
            if out is not None:
                if (out.dtype is not self.out_dtype or out.shape != q_shape or out.device != device
                        or not out.is_contiguous()):
                    return None
                # All four are contiguous by now, so each spans [data_ptr, data_ptr + nbytes); the byte counts
                # come from the shapes checked above (cheaper than reading t.nbytes, a C call per tensor).
                start = out.data_ptr()
                end = start + q_shape[0] * self.out_row_bytes
                q_start, k_start, v_start = q.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr()
                cache_bytes = k_shape[0] * self.page_bytes
                if ((start < q_start + q_shape[0] * self.q_row_bytes and q_start < end)
                        or (start < k_start + cache_bytes and k_start < end)
                        or (start < v_start + cache_bytes and v_start < end)):
                    return None
            return device
        except (AttributeError, TypeError, IndexError):  # not a tensor where one was expected
            return None

    def plan(self, device: torch.device, override: Override) -> Plan:
        """The plan for (device, override): from this spec's cache, else from select()."""
        key = (device, override)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = select(self.config, device)
        self.last_plan = (device, override, plan)
        return plan


_specs: dict[int, _CallSpec] = {}
_specs_lock = threading.Lock()
_MAX_SPECS = 4096  # configs are few in practice; the bound keeps a pathological caller from growing this forever


def _clear_specs() -> None:
    with _specs_lock:
        _specs.clear()


registry.on_change(_clear_specs)  # a new registration may change any plan


def _spec_for(config) -> _CallSpec:
    """The spec of `config`, made on a miss. attention() inlines the hit path (a dict get and an identity
    test), so the isinstance check lives here: a hit means `config` is the AttentionConfig the entry holds."""
    if not isinstance(config, AttentionConfig):
        raise InputError(f"config: expected an AttentionConfig, got {type(config).__name__}")
    # Keyed by identity (hashing a pydantic model costs more than the whole fast path);
    # the spec holds the config, so its id cannot be reused while the entry lives.
    spec = _specs.get(id(config))
    if spec is None or spec.config is not config:
        spec = _CallSpec(config)
        with _specs_lock:
            if len(_specs) >= _MAX_SPECS:
                _specs.clear()
            _specs[id(config)] = spec
    return spec


def _describe(t) -> str:
    if t is None:
        return "None"
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__}"
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _check_tensor(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device, why: str = "") -> None:
    """shape entries may be None (any size). Raises InputError naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: expected a {dtype} tensor{why}, got {_describe(t)}")
    if t.dim() != len(shape) or any(e is not None and e != g for e, g in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise InputError(f"{name}: expected shape {want}{why}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise InputError(f"{name}: expected dtype {dtype}{why}, got {t.dtype}")
    if t.device != device:
        raise InputError(f"{name}: expected a tensor on {device} (the device of q), got one on {t.device}")


def _check_scalar_scale(name: str, t, device: torch.device, why: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: required {why}, got {_describe(t)}")
    if t.numel() != 1:
        raise InputError(f"{name}: expected one element (a per-tensor scale) {why}, got shape {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise InputError(f"{name}: expected dtype torch.float32 {why}, got {t.dtype}")
    if t.device != device:
        raise InputError(f"{name}: expected a tensor on {device} (the device of q), got one on {t.device}")


def _absent(name: str, t, why: str) -> None:
    if t is not None:
        raise InputError(f"{name}: must be None {why}, got {_describe(t)}")


def _check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise InputError(f"{name}: expected a contiguous last dimension (stride 1), got strides {t.stride()}")


def check_inputs(
    config: AttentionConfig,
    q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table,
    q_scale, k_scale, v_scale, k_scale_cache, v_scale_cache, alibi_slopes, sinks, output_scale, out,
) -> None:
    """Raise InputError for the first argument that does not match `config`."""
    if not isinstance(q, torch.Tensor):
        raise InputError(f"q: expected a tensor [num_tokens, num_heads, head_size], got {_describe(q)}")
    device = q.device
    heads, kv_heads, d, bs = config.num_heads, config.num_kv_heads, config.head_size, config.block_size
    _check_tensor("q", q, (None, heads, d), config.q_torch_dtype, device,
                  " ([num_tokens, num_heads, head_size] in q_dtype)")
    _check_last_dim_contiguous("q", q)
    num_tokens = q.shape[0]
    _check_tensor("key_cache", key_cache, (None, bs, kv_heads, d), config.kv_cache_torch_dtype, device,
                  " ([num_blocks, block_size, num_kv_heads, head_size] in kv_cache_dtype)")
    num_blocks = key_cache.shape[0]
    _check_tensor("value_cache", value_cache, tuple(key_cache.shape), config.kv_cache_torch_dtype, device,
                  " (same as key_cache)")
    _check_last_dim_contiguous("key_cache", key_cache)
    _check_last_dim_contiguous("value_cache", value_cache)
    _check_tensor("seq_lens", seq_lens, (None,), torch.int32, device, " (int32 [num_seqs])")
    num_seqs = seq_lens.shape[0]
    _check_tensor("cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,), torch.int32, device,
                  f" (int32 [num_seqs + 1] with num_seqs={num_seqs} from seq_lens)")
    _check_tensor("block_table", block_table, (num_seqs, None), torch.int32, device,
                  " (int32 [num_seqs, max_blocks_per_seq])")
    if block_table.shape[1] == 0:
        raise InputError("block_table: expected at least one page per sequence, got shape "
                         f"{tuple(block_table.shape)}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens)):
        _check_last_dim_contiguous(name, t)
    _check_last_dim_contiguous("block_table", block_table)

    mode = config.kv_quant_mode
    mode_why = f"for kv_quant_mode={mode.value}"
    if config.q_is_fp8:
        _check_scalar_scale("q_scale", q_scale, device, f"for q_dtype={config.q_dtype}")
    else:
        _absent("q_scale", q_scale, f"for q_dtype={config.q_dtype} (only an fp8 query has a scale)")
    if mode is KVQuantMode.FP8_PER_TENSOR:
        _check_scalar_scale("k_scale", k_scale, device, mode_why)
        _check_scalar_scale("v_scale", v_scale, device, mode_why)
    else:
        _absent("k_scale", k_scale, mode_why)
        _absent("v_scale", v_scale, mode_why)
    if mode.is_per_token_head:
        for name, t in (("k_scale_cache", k_scale_cache), ("v_scale_cache", v_scale_cache)):
            if t is None:
                raise InputError(f"{name}: required {mode_why}, got None")
            _check_tensor(name, t, (num_blocks, bs, kv_heads), torch.float32, device,
                          " (fp32 [num_blocks, block_size, num_kv_heads])")
            if not t.is_contiguous():
                raise InputError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    else:
        _absent("k_scale_cache", k_scale_cache, mode_why)
        _absent("v_scale_cache", v_scale_cache, mode_why)

    if config.use_alibi:
        _check_tensor("alibi_slopes", alibi_slopes, (heads,), torch.float32, device,
                      " (fp32 [num_heads], required for use_alibi=True)")
    else:
        _absent("alibi_slopes", alibi_slopes, "for use_alibi=False")
    if config.use_sinks:
        _check_tensor("sinks", sinks, (heads,), torch.float32, device, " (fp32 [num_heads], required for use_sinks=True)")
    else:
        _absent("sinks", sinks, "for use_sinks=False")
    if config.out_is_fp8:
        _check_scalar_scale("output_scale", output_scale, device, f"for out_dtype={config.out_dtype}")
    else:
        _absent("output_scale", output_scale, f"for out_dtype={config.out_dtype} (only fp8 output is scaled)")

    if out is not None:
        _check_tensor("out", out, (num_tokens, heads, d), config.out_torch_dtype, device,
                      " ([num_tokens, num_heads, head_size] in out_dtype)")
        _check_last_dim_contiguous("out", out)
        for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
            if _overlaps(out, t):
                raise InputError(f"out: must not share memory with {name}")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


def check_values(config: AttentionConfig, q, key_cache, cu_seqlens_q, seq_lens, block_table) -> None:
    """Debug-mode checks that read the index tensors on the host (a sync on GPU)."""
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    table = block_table.cpu()
    if starts[0] != 0:
        raise InputError(f"cu_seqlens_q: expected cu_seqlens_q[0] == 0, got {starts[0]}")
    if starts[-1] != q.shape[0]:
        raise InputError(f"cu_seqlens_q: expected cu_seqlens_q[-1] == num_tokens={q.shape[0]}, got {starts[-1]}")
    num_blocks = key_cache.shape[0]
    for seq, kv_len in enumerate(lens):
        q_len = starts[seq + 1] - starts[seq]
        if q_len < 0:
            raise InputError(f"cu_seqlens_q: expected non-decreasing offsets, got {starts[seq]} then "
                             f"{starts[seq + 1]} at sequence {seq}")
        if kv_len < q_len:
            raise InputError(f"seq_lens: sequence {seq} has kv_len={kv_len} < its q_len={q_len}; seq_lens counts "
                             "context + new tokens, so it is at least the number of query tokens")
        pages = math.ceil(kv_len / config.block_size)
        if pages > table.shape[1]:
            raise InputError(f"block_table: sequence {seq} needs {pages} pages for kv_len={kv_len}, but the table "
                             f"has {table.shape[1]} columns")
        used = table[seq, :pages]
        bad = (used < 0) | (used >= num_blocks)
        if bool(bad.any()):
            column = int(bad.nonzero()[0])
            raise InputError(f"block_table: sequence {seq}, column {column}: page id {int(used[column])} not in "
                             f"[0, {num_blocks}) (num_blocks of key_cache)")


def attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    config: AttentionConfig,
    q_scale: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    v_scale_cache: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    output_scale: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Paged, variable-length attention on the backend `config.backend` names or `auto` picks.

    Args:
        q: [num_tokens, num_heads, head_size] in ``config.q_dtype``; the query tokens of all
            sequences, concatenated.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size] in
            ``config.kv_cache_dtype``; pages of ``block_size`` tokens.
        cu_seqlens_q: int32 [num_seqs + 1]; sequence s owns query rows
            cu_seqlens_q[s] : cu_seqlens_q[s + 1].
        seq_lens: int32 [num_seqs]; KV length of each sequence (context + new tokens), which
            must be at least its query length.
        block_table: int32 [num_seqs, max_blocks_per_seq]; key j of sequence s lives in page
            block_table[s, j // block_size], slot j % block_size.
        config: the AttentionConfig this call must match.
        q_scale: fp32, one element; required when q is fp8, else None.
        k_scale, v_scale: fp32, one element each; required for FP8_PER_TENSOR, else None.
        k_scale_cache, v_scale_cache: fp32 [num_blocks, block_size, num_kv_heads]; required
            for FP8_PER_TOKEN_HEAD and INT8_PER_TOKEN_HEAD, else None.
        alibi_slopes: fp32 [num_heads]; required when ``config.use_alibi``.
        sinks: fp32 [num_heads]; required when ``config.use_sinks``.
        output_scale: fp32, one element; required when ``config.out_dtype`` is fp8
            (stored output = attention / output_scale, saturated to the format's range).
        out: optional preallocated [num_tokens, num_heads, head_size] in ``config.out_dtype``.
        validate: also check the index values (lengths, page ids) on the host; None means
            "when DISPATCH_DEBUG=1". This syncs with the GPU: for debugging, not for serving.

    A scale is a dequantization factor: real value = stored.float() * scale. Query i of a
    sequence with q_len queries and kv_len keys sits at position kv_len - q_len + i, so the
    causal mask is aligned bottom-right (q_len=2, kv_len=5)::

        key   0 1 2 3 4
        q0    1 1 1 1 0
        q1    1 1 1 1 1

    Returns:
        [num_tokens, num_heads, head_size] in ``config.out_dtype`` (``out`` itself when given).

    Raises:
        InputError: an argument does not match the config (the message names it).
        UnsupportedConfigError: no backend (or not the named one) can run the config.
    """
    if _is_compiling():
        # Under torch.compile: one opaque custom op; its eager implementation (this function) does the checks.
        from dispatch.ops import attention_op, config_key

        result = attention_op(q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, config_key(config),
                              q_scale, k_scale, v_scale, k_scale_cache, v_scale_cache, alibi_slopes, sinks,
                              output_scale)
        return result if out is None else out.copy_(result)
    # The spec lookup and the plan memo are inlined here (each Python call layer costs ~50-100 ns).
    spec = _specs.get(id(config))
    if spec is None or spec.config is not config:
        spec = _spec_for(config)
    device = spec.fast_check(q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, q_scale, k_scale,
                             v_scale, k_scale_cache, v_scale_cache, alibi_slopes, sinks, output_scale, out)
    if device is None:
        check_inputs(config, q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, q_scale, k_scale,
                     v_scale, k_scale_cache, v_scale_cache, alibi_slopes, sinks, output_scale, out)
        device = q.device
    if validate or (validate is None and DEBUG):
        check_values(config, q, key_cache, cu_seqlens_q, seq_lens, block_table)
    override = _current_override()
    last_device, last_override, plan = spec.last_plan
    # `is` suffices for the override: outside any `dispatch.use()` scope it is always the contextvar's one
    # default object, inside one the scope's object; any other object misses here and takes spec.plan(),
    # whose dict compares overrides by value.
    if override is not last_override or device != last_device:
        plan = spec.plan(device, override)
    return plan.backend_forward(
        q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, config=config,
        q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, k_scale_cache=k_scale_cache,
        v_scale_cache=v_scale_cache, alibi_slopes=alibi_slopes, sinks=sinks, output_scale=output_scale, out=out,
    )
