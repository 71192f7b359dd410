"""The dequant backend: a quantized KV cache read through a 16-bit workspace by the best 16-bit backend.

For prefill-heavy batches against an FP8 or INT8 cache with a 16-bit query, dequantizing
only the pages the batch reads into a 16-bit workspace (the query's dtype) and running a
16-bit attention on it beats attending to the quantized cache directly wherever a 16-bit
kernel prefills much faster than the quantized path (FlashAttention 4 on an H100 / H200;
measurements in benchmarks/RESULTS.md). Decodes are the opposite case: a decode reads each
key once, so copying its keys to 16 bits first costs more than it saves. One call here is
up to three launches:

1. `kernel.dequantize_pages`: one Triton launch writes, for each sequence, its keys and values
   as real = stored * scale rounded once to the query's dtype, into a compact paged
   workspace with an identity block table (kernel.py; page size below).
   Where the Triton kernel accepts the config itself, sequences with at most SHORT_QUERIES
   queries (decodes) are skipped: the inner call sees q_len keys of zeros for them;
2. the inner backend runs the derived 16-bit config (`workspace_config`: the same config with
   kv_cache_dtype = q_dtype, kv_quant_mode = NONE, block_size = WORKSPACE_BLOCK_SIZE) on it;
3. if decodes were skipped, the Triton kernel attends them straight from the quantized cache
   and overwrites their rows (`short_queries_only`; the other rows are left as they are).

Which sequences are decodes is read on the device (cu_seqlens_q), never on the host, so a
mixed batch (a few chunked prefills next to many decodes) dequantizes only its prefills'
pages and decodes at the quantized cache's bandwidth, all in one call.

The inner backend is the first of INNER_ORDER (flash_attn, triton, sdpa) that the dispatcher
accepts for the derived config, chosen through `dispatch.select` with the backend named, so it
obeys every rule of its own capability record; on CUDA it must also be CUDA-graph safe
(sdpa is not), since this backend declares it is. Numerics: after the one rounding of K and V
the inner backend's own arithmetic, i.e. the same as sdpa's same-precision path with a
quantized cache (dequantize, then compute in the query's dtype); decode rows carry the Triton
kernel's numerics against the quantized cache, within the same parity bounds.

Workspace pages: with FlashAttention 4 inside, exactly its KV tile (128 tokens for head size
128), which it loads by TMA, its fast paged path (`workspace_block_size`). Its record refuses
that page size for an engine's cache, whose unused last-page tail may hold NaN; the workspace
writes zeros there, so the inner plan is chosen with 32-token pages (every other rule applies)
and called with the tile's. With any other inner backend, WORKSPACE_BLOCK_SIZE (32): a
multiple of 16, as FlashAttention and the Triton kernel need, padding a sequence's last page
by at most 31 tokens.

Memory: the workspace holds 2 x num_seqs x ceil(max_blocks_per_seq x block_size / P) x P
tokens of num_kv_heads x head_size values in the query's dtype (P tokens per page), sized
from the block table's width (a host-side shape), not from the real lengths (which would need
a host sync); an engine whose block table is as wide as its longest possible sequence pays
for that width. Only the pages the batch reads are written.

Importing this module imports neither triton nor any other backend.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from dispatch import registry
from dispatch.capabilities import Capability, DeviceInfo, resolve_device
from dispatch.config import OUT_DTYPES, SIXTEEN_BIT_DTYPES, AttentionConfig, KVQuantMode
from dispatch.errors import InputError, UnsupportedConfigError
from dispatch.selector import Plan, select
from dispatch.speed import DECODE_MAX_QUERY_LEN

__all__ = ["CAPABILITY", "forward", "INNER_ORDER", "WORKSPACE_BLOCK_SIZE", "SHORT_QUERIES", "workspace_config",
           "InnerChoice", "choose_inner", "short_queries_on_triton"]

# The 16-bit backends, most preferred first: FlashAttention 4 prefills fastest where it runs.
INNER_ORDER = ("flash_attn", "triton", "sdpa")
WORKSPACE_BLOCK_SIZE = 32
# Sequences with at most this many queries (decodes, the workload boundary of dispatch.speed) are attended
# straight from the cache by the Triton kernel where it accepts the config; DECODES_FROM_THE_CACHE = False
# dequantizes them too (the tests compare the two plans).
SHORT_QUERIES = DECODE_MAX_QUERY_LEN
DECODES_FROM_THE_CACHE = True
# With FlashAttention 4 inside, workspace pages of exactly its KV tile (TMA loads, its fast paged path;
# `workspace_block_size`). False keeps WORKSPACE_BLOCK_SIZE for every inner backend (the A/B switch).
FA4_TILE_PAGES = True
QUANTIZED_MODES = frozenset({KVQuantMode.FP8_PER_TENSOR, KVQuantMode.FP8_PER_TOKEN_HEAD,
                             KVQuantMode.INT8_PER_TOKEN_HEAD})


def _handles(config: AttentionConfig) -> bool:
    """A config this backend's fields accept (a 16-bit query, a quantized cache): the others are refused
    by the fields alone, and have no workspace config."""
    return config.q_dtype in SIXTEEN_BIT_DTYPES and config.kv_quant_mode in QUANTIZED_MODES


@functools.lru_cache(maxsize=256)
def workspace_config(config: AttentionConfig, backend: str = "auto") -> AttentionConfig:
    """The 16-bit config the inner backend runs: `config` with kv_cache_dtype = q_dtype, kv_quant_mode =
    NONE, block_size = WORKSPACE_BLOCK_SIZE and `backend`; features, sizes and out_dtype unchanged."""
    fields = config.model_dump()
    fields.update(kv_cache_dtype=config.q_dtype, kv_quant_mode=KVQuantMode.NONE, block_size=WORKSPACE_BLOCK_SIZE,
                  backend=backend)
    return AttentionConfig(**fields)


@dataclass(frozen=True)
class InnerChoice:
    """The inner backend for one (config, device): its plan, or None with every candidate's reasons."""

    plan: Optional[Plan]
    refused: tuple[tuple[str, tuple[str, ...]], ...]  # candidates passed over before the chosen one, with reasons

    @property
    def name(self) -> Optional[str]:
        return self.plan.name if self.plan is not None else None


def _candidate(config: AttentionConfig, name: str, device: DeviceInfo) -> tuple[Optional[Plan], tuple[str, ...]]:
    try:
        plan = select(workspace_config(config, name), device)
    except UnsupportedConfigError as exc:
        return None, tuple(exc.reasons.get(name) or (str(exc),))
    if device.type == "cuda" and not plan.capability.cuda_graph_safe:
        return None, ("not CUDA-graph safe (its forward reads the GPU on the host), and the dequant backend "
                      "declares cuda_graph_safe=True",)
    return plan, ()


@functools.lru_cache(maxsize=256)
def choose_inner(config: AttentionConfig, device: DeviceInfo) -> InnerChoice:
    """The first backend of INNER_ORDER the dispatcher accepts for `workspace_config(config)` on `device`."""
    refused = []
    for name in INNER_ORDER:
        plan, why = _candidate(config, name, device)
        if plan is not None:
            return InnerChoice(plan, tuple(refused))
        refused.append((name, why))
    return InnerChoice(None, tuple(refused))


# ---- capability ----------------------------------------------------------------------------------


def _cpu_needs_interpreter(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """On the CPU only under Triton's interpreter (TRITON_INTERPRET=1), which runs the dequantization kernel."""
    if device.type == "cpu" and not device.triton_interpret:
        return ["device='cpu' needs TRITON_INTERPRET=1 (the dequantization kernel is Triton, which runs on CPU "
                "only through its interpreter)"]
    return []


def _interpreter_rounding(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """On the CPU, no bfloat16 query: the Triton interpreter truncates fp32->bfloat16 casts (triton 3.9)."""
    if device.type == "cpu" and config.q_dtype == "bfloat16":
        return ["q_dtype=bfloat16 not supported on device='cpu': the Triton interpreter truncates fp32->bfloat16 "
                "casts, so the workspace would not be rounded to nearest (the GPU rounds it right)"]
    return []


def _inner_backend(config: AttentionConfig, device: DeviceInfo) -> list[str]:
    """A 16-bit backend runs the dequantized config: flash_attn, triton or sdpa (graph-safe ones on CUDA).

    The reasons name each candidate and its own reasons; `choose_inner` says which one runs.
    """
    if not _handles(config):
        return []
    choice = choose_inner(config, device)
    if choice.plan is not None:
        return []
    sixteen = workspace_config(config)
    return [
        f"inner backend {name!r} cannot run the dequantized config (kv_cache_dtype={sixteen.kv_cache_dtype}, "
        f"kv_quant_mode=NONE, block_size={sixteen.block_size}): {'; '.join(why)}"
        for name, why in choice.refused
    ]


CAPABILITY = Capability(
    description=("Dequantize the pages a batch reads into a 16-bit workspace (Triton; pages of FA4's KV tile "
                 f"with FA4 inside, else {WORKSPACE_BLOCK_SIZE} tokens), then run the first 16-bit backend that "
                 "fits: " + ", ".join(INNER_ORDER) + " (sdpa on CPU only); decodes on triton from the cache "
                 "where it accepts the config"),
    q_dtypes=SIXTEEN_BIT_DTYPES,
    kv_cache_dtypes=frozenset({"float8_e4m3fn", "float8_e5m2", "int8"}),
    out_dtypes=OUT_DTYPES,  # the inner backend's own rules narrow it (_inner_backend)
    kv_quant_modes=QUANTIZED_MODES,
    devices=frozenset({"cuda", "cpu"}),
    # Head sizes, features and output dtypes are the inner backend's: its reasons come through _inner_backend.
    features=frozenset({"causal", "non_causal", "sliding_window", "softcap", "alibi", "sinks"}),
    min_compute_capability=(8, 0),
    min_compute_capability_by_dtype=(("float8_e4m3fn", (8, 9)), ("float8_e5m2", (8, 9))),
    required_modules=("triton",),
    cuda_graph_safe=True,
    extra_rules=(_cpu_needs_interpreter, _interpreter_rounding, _inner_backend),
    plan_note=lambda config, device: _plan_note(config, device),
)


# ---- the call --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def short_queries_on_triton(config: AttentionConfig, device: DeviceInfo) -> int:
    """SHORT_QUERIES when the Triton kernel accepts `config` itself (the quantized cache) on `device`, else 0:
    then the decodes of a batch are attended from the cache by it, and only the others are dequantized."""
    if not DECODES_FROM_THE_CACHE or not _handles(config):
        return 0
    fields = config.model_dump()
    fields.update(backend="triton")
    try:
        select(AttentionConfig(**fields), device)
    except UnsupportedConfigError:
        return 0
    return SHORT_QUERIES


def _plan_note(config: AttentionConfig, device: DeviceInfo) -> str:
    """What `explain` says runs here: the inner backend, its page size, and where the decodes go."""
    inner = choose_inner(config, device).plan
    note = f"here: dequantize, then {inner.name if inner else None}"
    if inner is not None:
        note += f" on {workspace_block_size(inner, device)}-token pages"
    if short_queries_on_triton(config, device):
        note += f"; sequences with at most {SHORT_QUERIES} queries (decodes) run on triton straight from the cache"
    return note


def workspace_block_size(inner: Plan, device: DeviceInfo) -> int:
    """Tokens per workspace page for the inner backend `inner`: FlashAttention 4's KV tile where FA4 runs
    inside and the tile is a power of two (the dequantization kernel's page is one Triton block), else
    WORKSPACE_BLOCK_SIZE.

    A page of exactly FA4's tile loads by TMA, its fast path, where other page sizes load row by row
    (cp.async). FA4's own record refuses that page size for an engine's cache (`_tma_reads_last_page_tail`):
    TMA reads the whole last page of a sequence, whose unused tail an engine may leave holding NaN. The
    workspace has no such tail: every slot past a sequence's length in a page it owns is written as zero
    (kernel.py). So the inner plan is selected with WORKSPACE_BLOCK_SIZE (every other rule of the record
    applies) and called with the tile's pages.
    """
    if FA4_TILE_PAGES and inner.name == "flash_attn":
        from backends.flash_attn import fa4

        if inner.backend_forward is fa4.forward:
            tile = fa4.kv_tile(inner.config, device)
            if tile is not None and tile & (tile - 1) == 0 and tile >= max(SHORT_QUERIES, 16):
                return tile
    return WORKSPACE_BLOCK_SIZE


@dataclass(frozen=True)
class _Call:
    """What a call with one (config, device) needs, resolved once."""

    config: AttentionConfig
    device: torch.device
    inner: Plan
    dtype: torch.dtype
    contiguous: frozenset[str]  # caller's arguments the inner backend needs contiguous
    short_queries: int  # > 0: sequences with at most this many queries run on the Triton kernel, from the cache
    workspace_block_size: int  # tokens per workspace page (workspace_block_size())


# id(config) -> _Call; the entry holds its config, so the id cannot be reused while the entry lives.
_calls: dict[int, _Call] = {}
_calls_lock = threading.Lock()
_MAX_CALLS = 256


def _clear_caches() -> None:
    """A registration can change any inner choice."""
    with _calls_lock:
        _calls.clear()
    choose_inner.cache_clear()
    short_queries_on_triton.cache_clear()


registry.on_change(_clear_caches)


def _call_for(config: AttentionConfig, device: torch.device) -> _Call:
    call = _calls.get(id(config))
    if call is not None and call.config is config and call.device == device:
        return call
    choice = choose_inner(config, resolve_device(device))
    if choice.plan is None:
        raise UnsupportedConfigError(
            "backend 'dequant': no 16-bit backend runs the dequantized config:\n"
            + "\n".join(f"  {name}: {'; '.join(why)}" for name, why in choice.refused),
            {name: list(why) for name, why in choice.refused})
    contiguous = frozenset(getattr(choice.plan.capability, "contiguous_arguments", ())) & {
        "q", "alibi_slopes", "sinks", "out"}
    info = resolve_device(device)
    call = _Call(config, device, choice.plan, config.q_torch_dtype, contiguous,
                 short_queries_on_triton(config, info), workspace_block_size(choice.plan, info))
    with _calls_lock:
        if len(_calls) >= _MAX_CALLS:
            _calls.clear()
        _calls[id(config)] = call
    return call


@functools.lru_cache(maxsize=None)
def _kernel():
    from backends.dequant import kernel  # imports triton: only once a call runs

    return kernel


@functools.lru_cache(maxsize=None)
def _triton_launcher():
    from backends.triton import launcher  # imports triton: only once a call runs

    return launcher


def forward(
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
) -> torch.Tensor:
    """Dequantize the pages the batch reads, then run the inner 16-bit backend; arguments already validated.

    q              [num_tokens, num_heads, head_size], fp16 / bf16
    key_cache      [num_blocks, block_size, num_kv_heads, head_size], fp8 / int8, any strides
    value_cache    same as key_cache
    cu_seqlens_q   int32 [num_seqs + 1], query start offsets
    seq_lens       int32 [num_seqs], KV length of each sequence (context + new tokens)
    block_table    int32 [num_seqs, max_blocks_per_seq], page ids
    k_scale, v_scale
                   fp32, one element each (FP8_PER_TENSOR), read on the device
    k_scale_cache, v_scale_cache
                   fp32 [num_blocks, block_size, num_kv_heads], any strides (per-token-head modes)
    alibi_slopes, sinks
                   fp32 [num_heads], passed to the inner backend
    output_scale   fp32, one element (fp8 output), passed to the inner backend
    out            optional [num_tokens, num_heads, head_size] in config.out_dtype

    q_scale is never set for a config this backend accepts (a 16-bit query). Nothing is read on
    the host; the workspace is allocated per call (the caching allocator reuses it).
    Returns [num_tokens, num_heads, head_size] in config.out_dtype (`out` when given).
    """
    call = _call_for(config, q.device)
    if call.contiguous:
        given = dict(q=q, alibi_slopes=alibi_slopes, sinks=sinks, out=out)
        for name in sorted(call.contiguous):
            value = given[name]
            if value is not None and not value.is_contiguous():
                raise InputError(f"{name}: backend 'dequant' runs {call.inner.name!r}, which needs a contiguous "
                                 f"tensor, got strides {value.stride()} for shape {tuple(value.shape)}")
    workspace = _kernel().dequantize_pages(
        key_cache, value_cache, seq_lens, block_table,
        dtype=call.dtype, workspace_block_size=call.workspace_block_size,
        k_scale=k_scale, v_scale=v_scale, k_scale_cache=k_scale_cache, v_scale_cache=v_scale_cache,
        cu_seqlens_q=cu_seqlens_q, short_queries=call.short_queries,
    )
    out = call.inner.forward(
        q, workspace.key_cache, workspace.value_cache, cu_seqlens_q, workspace.seq_lens, workspace.block_table,
        alibi_slopes=alibi_slopes, sinks=sinks, output_scale=output_scale, out=out,
    )
    if call.short_queries:
        # The decode rows, which the inner call computed against zeros: from the cache, overwritten in place.
        _triton_launcher().unified_attention(
            q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, config=config,
            k_scale=k_scale, v_scale=v_scale, k_scale_cache=k_scale_cache, v_scale_cache=v_scale_cache,
            alibi_slopes=alibi_slopes, sinks=sinks, output_scale=output_scale, out=out,
            short_queries_only=call.short_queries,
        )
    return out
