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

from dispatch import contract, registry
from dispatch.config import AttentionConfig
from dispatch.errors import InputError
from dispatch.overrides import Override, _override
from dispatch.selector import Plan, select
from dispatch.speed import workload_of

__all__ = ["attention"]

DEBUG = os.environ.get("DISPATCH_DEBUG", "0") not in ("", "0")

# Bound once: the hot path skips the attribute lookups. torch.compile still recognizes the function itself.
_is_compiling = torch.compiler.is_compiling
# The contextvar's bound get(): current_override() without its Python call layer.
_current_override = _override.get


class _CallSpec:
    """What a valid call with one config looks like, precomputed: the hot path's checks.

    `fast_check` is generated from the contract table for this config (`contract.compile_fast_check`):
    a fast, conservative predicate over tensor metadata. When it says no, `contract.check()` runs and
    names the problem. The plan for each (tensor device, `dispatch.use()` override) is cached here
    too, in front of select()'s own cache, so a cached call neither hashes the config nor resolves
    the device.
    """

    __slots__ = ("config", "fast_check", "plans", "last_plan")

    def __init__(self, config: AttentionConfig):
        self.config = config
        self.fast_check = contract.compile_fast_check(config)
        self.plans: dict[tuple, Plan] = {}
        # (device, override, shape class, plan) of the last plan handed out: one tuple, so a reader on
        # another thread sees a consistent record. It spares the common call a dict lookup, whose key
        # hashes the Override dataclass (a Python-level __hash__, more than 100 ns).
        self.last_plan: tuple = (None, None, None, None)

    def plan(self, device: torch.device, override: Override, workload: Optional[str]) -> Plan:
        """The plan for (device, override, workload): from this spec's cache, else from select()."""
        key = (device, override, workload)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = select(self.config, device, workload=workload)
        self.last_plan = (device, override, workload, plan)
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


def check_inputs(config: AttentionConfig, *args) -> None:
    """Raise InputError for the first argument that does not match `config` (arguments in the
    contract's order: the six positional tensors, then q_scale ... out)."""
    contract.check(config, dict(zip(_NAMES, args)))


_NAMES = tuple(a.name for a in contract.ARGUMENTS)


def _check_contiguous(plan: Plan, values: dict) -> None:
    """Arguments the chosen backend declares it needs fully contiguous (Capability.contiguous_arguments)."""
    for name in sorted(plan.capability.contiguous_arguments):
        value = values.get(name)
        if value is not None and not value.is_contiguous():
            raise InputError(f"{name}: backend {plan.name!r} needs a contiguous tensor (its capability's "
                             f"contiguous_arguments), got strides {value.stride()} for shape {tuple(value.shape)}")


def _finite_positive(name: str, t: torch.Tensor) -> None:
    if not (math.isfinite(float(t.reshape(-1)[0])) and float(t.reshape(-1)[0]) > 0):
        raise InputError(f"{name}: expected a finite, positive scale, got {float(t.reshape(-1)[0])}")


def check_values(config: AttentionConfig, q, key_cache, cu_seqlens_q, seq_lens, block_table, *,
                 q_scale=None, k_scale=None, v_scale=None, k_scale_cache=None, v_scale_cache=None,
                 output_scale=None) -> None:
    """Debug-mode checks that read values on the host (a sync on GPU): lengths, page ids, scales."""
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    table = block_table.cpu()
    if starts[0] != 0:
        raise InputError(f"cu_seqlens_q: expected cu_seqlens_q[0] == 0, got {starts[0]}")
    if starts[-1] != q.shape[0]:
        raise InputError(f"cu_seqlens_q: expected cu_seqlens_q[-1] == num_tokens={q.shape[0]}, got {starts[-1]}")
    num_blocks = key_cache.shape[0]
    used_pages = []
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
        used_pages.append((used, kv_len))
    # Scales: a NaN, infinite, zero or negative scale makes every output it touches wrong (inf gives NaN,
    # 0 saturates an fp8 output), so debug mode refuses them by name.
    for name, scale in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale),
                        ("output_scale", output_scale)):
        if scale is not None:
            _finite_positive(name, scale.detach().float().cpu())
    for name, scales in (("k_scale_cache", k_scale_cache), ("v_scale_cache", v_scale_cache)):
        if scales is None:
            continue
        host = scales.detach().cpu()
        for seq, (pages, kv_len) in enumerate(used_pages):
            # The slots this sequence reads: whole pages, then the first kv_len % block_size of the last.
            rows = host[pages.long()].reshape(-1, host.shape[2])[:kv_len]
            bad = ~torch.isfinite(rows)
            if bool(bad.any()):
                token, head = (int(i) for i in bad.nonzero()[0])
                raise InputError(f"{name}: sequence {seq}, token {token}, KV head {head}: expected a finite "
                                 f"scale in every slot the call reads, got {float(rows[token, head])}")


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
    max_query_len: Optional[int] = None,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Paged, variable-length attention on the backend `config.backend` names or `auto` picks.

    Args (generated from the contract table, dispatch/contract.py):
{arguments}
        config: the AttentionConfig this call must match.
        max_query_len: optional host-side int, an upper bound on the longest query of the batch
            (engines hold it: vLLM's and FlashInfer's metadata carry it on the host). It only
            steers `auto`: with it, auto runs the fastest backend measured for this workload
            ("decode" when at most DECODE_MAX_QUERY_LEN, else "prefill"; `dispatch.speed`);
            without it, auto walks the default order. Never read on the device; an explicit
            backend ignores it. With validate, the bound is checked.
        validate: also check the values on the host: lengths, page ids, the hint, and that scales
            are finite and positive (and scale caches finite in every slot read); None means
            "when DISPATCH_DEBUG=1". This syncs with the GPU: for debugging, not for serving.

    Shapes: every tensor's last dimension must be contiguous; other strides are free (views into
    an engine's buffers run as they are, without copies). A scale is a dequantization factor:
    real value = stored.float() * scale. Query i of a sequence with q_len queries and kv_len keys
    sits at position kv_len - q_len + i, so the causal mask is aligned bottom-right
    (q_len=2, kv_len=5)::

        key   0 1 2 3 4
        q0    1 1 1 1 0
        q1    1 1 1 1 1

    Without validate, the caller guarantees what no metadata check can see: cu_seqlens_q starts
    at 0, never decreases and ends at num_tokens; seq_lens[s] >= its query length; block_table
    has ceil(seq_lens[s] / block_size) valid page ids (in [0, num_blocks)) in each row. A
    kernel that reads past them returns garbage or faults.

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
    workload = None if max_query_len is None else workload_of(max_query_len)
    if validate or (validate is None and DEBUG):
        check_values(config, q, key_cache, cu_seqlens_q, seq_lens, block_table, q_scale=q_scale, k_scale=k_scale,
                     v_scale=v_scale, k_scale_cache=k_scale_cache, v_scale_cache=v_scale_cache,
                     output_scale=output_scale)
        if max_query_len is not None:
            _check_max_query_len(max_query_len, cu_seqlens_q)
    override = _current_override()
    last_device, last_override, last_workload, plan = spec.last_plan
    # `is` suffices for the override: outside any `dispatch.use()` scope it is always the contextvar's one
    # default object, inside one the scope's object; any other object misses here and takes spec.plan(),
    # whose dict compares overrides by value.
    if override is not last_override or device != last_device or workload != last_workload:
        plan = spec.plan(device, override, workload)
    if plan.capability.contiguous_arguments:
        _check_contiguous(plan, dict(q=q, key_cache=key_cache, value_cache=value_cache, k_scale_cache=k_scale_cache,
                                     v_scale_cache=v_scale_cache, alibi_slopes=alibi_slopes, sinks=sinks, out=out))
    return plan.backend_forward(
        q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, config=config,
        q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, k_scale_cache=k_scale_cache,
        v_scale_cache=v_scale_cache, alibi_slopes=alibi_slopes, sinks=sinks, output_scale=output_scale, out=out,
    )


def _check_max_query_len(max_query_len, cu_seqlens_q) -> None:
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 0:
        raise InputError(f"max_query_len: expected a non-negative int (a host-side bound), got {max_query_len!r}")
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    longest = max(lengths, default=0)
    if longest > max_query_len:
        raise InputError(f"max_query_len: {max_query_len} is below the longest query of the call ({longest} tokens)")


attention.__doc__ = attention.__doc__.replace("{arguments}", contract.argument_docs())
