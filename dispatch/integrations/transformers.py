"""Hugging Face transformers (5.x) runs every attention layer through `dispatch.attention`.

    import torch, transformers
    from dispatch.integrations import transformers as dispatch_hf

    dispatch_hf.register()              # "dispatch" in AttentionInterface and AttentionMaskInterface
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="dispatch",
                                                              dtype=torch.bfloat16)
    cache = dispatch_hf.PagedKVCache(model, max_batch_size=8, max_cache_len=4096,
                                     kv_mode="fp8_per_token_head")
    tokens = model.generate(**inputs, max_new_tokens=256, **dispatch_hf.cache_argument(model, cache))

What `register(name)` adds:

- an attention function, called by every attention layer as ``fn(module, query
  [B, H, Sq, D], key [B, Hkv, Sk, D], value, attention_mask, dropout=,
  scaling=, **kwargs)`` and returning ``(out [B, Sq, H, D], None)``;
- a mask function under the same name. transformers gives a name that has no
  entry in ``AttentionMaskInterface`` no mask at all, so a left-padded row
  would silently attend to its pad tokens. This one returns a `DispatchMask`:
  which mask the model asked for (causal, sliding window W, or bidirectional)
  and the 2D padding mask. A mask dispatch cannot express (chunked attention,
  packed sequences, token-type or image overlays, a 4D mask given by the
  caller) is refused, never approximated.

Pad tokens are excluded as variable-length sequences: with left padding,
row b's real tokens are the last ones of its chunk, so they are packed into
one varlen batch (``cu_seqlens_q``) and pad positions get zeros.

Two ways to run:

- with `PagedKVCache` (the fast path): pages in this project's layout
  [num_blocks, block_size, num_kv_heads, head_size] per layer, one block table
  shared by all layers, a bump allocator (pages are handed out as sequences
  grow and returned all at once by ``reset()``). ``update()`` only hands the new
  keys and values to the attention function, which knows the padding: it
  writes them into their pages with one `dispatch.kv_cache.write_kv` per layer
  and step (no copy of old pages) and attends through the block table. KV
  modes: 16-bit, FP8 per tensor (scales given, or calibrated once, per layer,
  from the first forward's real tokens: amax * headroom / format max), FP8 and
  INT8 per token and head.
- without it (no cache, ``DynamicCache`` or ``StaticCache``; 16-bit only): each
  call packs the dense keys into pages (`dispatch.kv_cache.paged_kv_from_dense`),
  which copies the whole cache every step. Correct, for forward passes and
  checks; generation should use `PagedKVCache`.

Per-sequence lengths come from the attention mask, read on the host once per
forward (one small device-to-host copy of three [B] vectors: real tokens per
row, real tokens in the new chunk, and whether the row is left-padded):
generate() already synchronizes every step for its stopping check, so this
adds no stall, and reading the mask is what lets a changed or malformed mask
be refused instead of trusted. Everything else a step needs (slots, lengths,
block table) is computed on the host from the cache's own bookkeeping and
copied to the device once per step, not per layer.

Per-layer settings come from the model: the sliding window and softcap from
its config (``layer_types``, ``sliding_window``, ``attn_logit_softcapping``),
checked against the mask and keyword arguments each layer actually receives
(``scaling``, ``softcap``, ``sliding_window``, sinks as ``s_aux``), which are
what the model computes with. A dispatch config file with a ``layers`` map
(`dispatch.config_for_layer`) may choose per layer how the cache is stored and
which backend runs (``kv_cache_dtype``, ``kv_quant_mode``, ``backend``); what it
says about what is computed (heads, head size, causal, window, softcap,
scale, sinks, dtypes) must agree with the model, or the layer is refused.

Refused with a clear error, at set-up or on the first call: a float32 (or any
non-16-bit) model, a mask dispatch cannot express, an unknown attention
keyword, dropout > 0, a call that needs gradients (dispatch has no backward),
``output_attentions=True``, beam search and other cache reorderings.

Checked against transformers 5.17 (the GPU machine's) and 5.24 (CPU CI): the
attention function's signature and keywords (``dropout``, ``scaling``,
``position_ids``, ``use_cache``), the mask interface's keywords, the Cache
API that generate() calls (5.17 passes ``past_key_values``, 5.24 ``cache``:
`cache_argument` picks the right keyword) and ``Cache.update(key, value,
layer_idx)`` (5.24 adds ``kwargs=``, which is accepted and ignored).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

import dispatch
from dispatch.config import FP8_DTYPES, AttentionConfig, KVQuantMode, canonical_dtype_name, torch_dtype
from dispatch.kv_cache import (KVCacheTensors, calibrate_scale, paged_kv_from_dense, write_kv, write_kv_unchecked,
                                zeros_cache)

__all__ = [
    "DispatchMask",
    "LayerSettings",
    "PagedKVCache",
    "UnsupportedModelError",
    "cache_argument",
    "model_layer_settings",
    "register",
    "registered_names",
]

_MIN_TRANSFORMERS = (5, 0)


class UnsupportedModelError(ValueError):
    """The model needs something `dispatch.attention` cannot compute exactly (refused, never approximated)."""


# ---- registration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Registration:
    name: str
    backend: Optional[str]


_REGISTERED: dict[str, _Registration] = {}


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("dispatch.integrations.transformers needs transformers>=5: "
                          "pip install 'attention-dispatch[transformers]'") from exc
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    if version < _MIN_TRANSFORMERS:
        raise ImportError(f"dispatch.integrations.transformers needs transformers>=5, found {transformers.__version__}")
    return transformers


def register(name: str = "dispatch", *, backend: Optional[str] = None) -> str:
    """Add the attention function and its mask function to transformers under `name`.

    Then ``from_pretrained(..., attn_implementation=name)``, ``from_config(...)`` or
    ``model.set_attn_implementation(name)`` run every attention layer through
    `dispatch.attention`. ``backend`` names the dispatch backend for calls without a
    `PagedKVCache` (and for caches that name none); None means the config default
    ("auto", or ``DISPATCH_BACKEND`` / a ``dispatch.use()`` scope). Registering again
    replaces the options. Returns `name`.
    """
    _import_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # transformers reads meaning into these: a name containing "sdpa", "flash" or "flex_attention" gets that
    # implementation's model checks (Gemma2 or GPT-OSS refuse "sdpa"), and "paged|" is a prefix of its own.
    taken = ("sdpa", "flash", "flex_attention", "paged")
    if not isinstance(name, str) or not name.isidentifier() or name == "eager" or any(t in name for t in taken):
        raise ValueError(f"name: expected a new attention implementation name (an identifier that is not 'eager' and "
                         f"contains none of {list(taken)}, which transformers interprets), got {name!r}")
    _REGISTERED[name] = _Registration(name, backend)

    def attention(module, query, key, value, attention_mask, **kwargs):
        return _attention_forward(name, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = attention.__qualname__ = f"dispatch_attention_{name}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _dispatch_mask)
    return name


def registered_names() -> tuple[str, ...]:
    """The names `register` added in this process."""
    return tuple(_REGISTERED)


def cache_argument(model, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``: the keyword this model's forward takes
    (transformers 5.24 renamed ``past_key_values`` to ``cache``; 5.17 knows only the old name)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache}


# ---- the mask -------------------------------------------------------------------------------------


@dataclass
class DispatchMask:
    """What the model's mask function asked for, in a form dispatch can run.

    causal: key j visible to the query at position p only when j <= p (else bidirectional).
    sliding_window: W, key j visible when p - j < W; None means unlimited.
    padding: bool [batch_size, mask_length] (True = a real token), the model's 2D attention mask,
        or None when every token is real. Rows must be left-padded (zeros, then ones).
    q_length, kv_length: the query chunk and the key length the model's cache reports.
    q_offset: tokens the cache had seen before this chunk (int; a tensor for StaticCache).
    """

    causal: bool
    sliding_window: Optional[int]
    padding: Optional[torch.Tensor]
    batch_size: int
    q_length: int
    kv_length: int
    q_offset: Any = 0
    _dense_layout: Any = field(default=None, repr=False)


# Keywords of transformers' mask interface that change nothing dispatch computes (sdpa/eager hints).
_MASK_HINTS = frozenset({"allow_is_causal_skip", "allow_is_bidirectional_skip", "allow_torch_fix", "dtype", "config",
                         "use_vmap", "device", "local_size"})


def _closure_vars(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__ or ())))


@functools.lru_cache(maxsize=1)
def _mask_codes():
    from transformers import masking_utils as mu

    return (mu.causal_mask_function, mu.bidirectional_mask_function, mu.and_masks(mu.causal_mask_function).__code__,
            mu.sliding_window_overlay(1).__code__)


def _read_mask_function(mask_function) -> tuple[bool, Optional[int]]:
    """(causal, sliding_window) of a transformers mask function, recognized by structure; else refused."""
    causal_fn, bidirectional_fn, and_code, sliding_code = _mask_codes()
    if mask_function is causal_fn:
        return True, None
    if mask_function is bidirectional_fn:
        return False, None
    code = getattr(mask_function, "__code__", None)
    if code is and_code:
        parts = _closure_vars(mask_function).get("mask_functions", ())
        overlays = [p for p in parts if getattr(p, "__code__", None) is sliding_code]
        if len(parts) == 2 and len(overlays) == 1 and causal_fn in parts:
            window = _closure_vars(overlays[0]).get("sliding_window")
            if isinstance(window, int) and window > 0:
                return True, window
    name = getattr(mask_function, "__qualname__", repr(mask_function))
    raise UnsupportedModelError(
        f"attention mask: the model asks for mask function {name}, which dispatch cannot express (it runs causal, "
        "sliding-window causal and bidirectional masks with left padding; chunked attention, packed sequences and "
        "token-type or image overlays are refused rather than approximated)")


def _dispatch_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> DispatchMask:
    """The mask function registered with `register`: describes the mask instead of materializing it."""
    unknown = sorted(set(kwargs) - _MASK_HINTS)
    if unknown:
        raise UnsupportedModelError(f"attention mask: unknown mask keyword(s) {unknown} from transformers; dispatch "
                                    "cannot tell whether they change the mask, so it refuses")
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function as mask_function
    causal, window = _read_mask_function(mask_function)
    local_size = kwargs.get("local_size")
    if local_size is not None and local_size != window:
        raise UnsupportedModelError(f"attention mask: local_size={local_size} disagrees with the mask function's "
                                    f"sliding window {window}")
    if kv_offset:
        raise UnsupportedModelError(
            f"attention mask: kv_offset={kv_offset} (a cache that keeps only the last keys, e.g. a sliding-window "
            "DynamicCache layer): dispatch needs every key; use PagedKVCache, which keeps them all")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise UnsupportedModelError(f"attention mask: expected the 2D padding mask [batch, keys], got "
                                        f"{type(attention_mask).__name__} of shape "
                                        f"{tuple(getattr(attention_mask, 'shape', ()))}")
        attention_mask = attention_mask.to(torch.bool)
    return DispatchMask(causal=causal, sliding_window=window, padding=attention_mask, batch_size=batch_size,
                        q_length=q_length, kv_length=kv_length, q_offset=q_offset)


# ---- one call's semantics --------------------------------------------------------------------------

# Keywords that describe the call but change nothing dispatch computes (positions are already in the
# rotated q and k; the rest are model-level flags that flow down to every module).
_IGNORED_KWARGS = frozenset({"position_ids", "use_cache", "output_hidden_states", "return_dict", "num_items_in_batch",
                             "output_router_logits", "cache_position", "deterministic"})
# Keywords that select something dispatch does not run when they carry a value.
_REFUSED_WHEN_SET = {
    "cu_seq_lens_q": "packed sequences (flash-attention varlen inputs)",
    "cu_seq_lens_k": "packed sequences (flash-attention varlen inputs)",
    "max_length_q": "packed sequences (flash-attention varlen inputs)",
    "max_length_k": "packed sequences (flash-attention varlen inputs)",
    "seq_idx": "packed sequences",
    "position_bias": "an additive position bias (T5-style)",
    "head_mask": "a head mask",
    "indices": "sparse attention indices",
    "block_indices": "sparse attention blocks",
}


@dataclass(frozen=True)
class _Call:
    """What one attention call computes (from the mask and the keywords)."""

    causal: bool
    sliding_window: Optional[int]
    logits_soft_cap: Optional[float]
    softmax_scale: Optional[float]
    sinks: Optional[torch.Tensor]  # fp32 [num_heads]
    padding: Optional[torch.Tensor]
    mask: Optional[DispatchMask]


def _read_call(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
               kwargs: dict) -> _Call:
    layer = getattr(module, "layer_idx", None)
    where = f"layer {layer}" if layer is not None else type(module).__name__
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise UnsupportedModelError(
            f"{where}: query dtype {query.dtype}: dispatch runs float16 and bfloat16 models; load the model with "
            "dtype=torch.bfloat16 (or torch.float16)")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise UnsupportedModelError(f"{where}: key/value dtypes {key.dtype}/{value.dtype} differ from the query's "
                                    f"{query.dtype}")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        raise UnsupportedModelError(
            f"{where}: the inputs require gradients, and dispatch.attention has no backward pass; run inference "
            "under torch.no_grad() or torch.inference_mode() (generate() does)")
    kwargs = dict(kwargs)
    dropout = kwargs.pop("dropout", 0.0)
    if dropout:
        raise UnsupportedModelError(f"{where}: dropout={dropout}: dispatch computes attention without dropout; "
                                    "call model.eval() or set attention_dropout=0")
    if kwargs.pop("output_attentions", False):
        raise UnsupportedModelError(f"{where}: output_attentions=True needs the attention weights, which dispatch "
                                    "never materializes; use attn_implementation='eager' for that")
    scaling = kwargs.pop("scaling", None)
    softcap = kwargs.pop("softcap", None)
    window_kwarg = kwargs.pop("sliding_window", None)
    is_causal = kwargs.pop("is_causal", None)
    sinks = kwargs.pop("s_aux", None)
    other_sinks = kwargs.pop("sinks", None)
    if sinks is not None and other_sinks is not None:
        raise UnsupportedModelError(f"{where}: both s_aux and sinks given")
    sinks = sinks if sinks is not None else other_sinks
    for name, what in _REFUSED_WHEN_SET.items():
        if kwargs.pop(name, None) is not None:
            raise UnsupportedModelError(f"{where}: {name} is set, which means {what}; dispatch does not run that")
    unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
    if unknown:
        raise UnsupportedModelError(
            f"{where}: unknown attention keyword(s) {unknown}: dispatch cannot tell whether they change the result, "
            "so it refuses")

    if isinstance(attention_mask, DispatchMask):
        causal, window, padding, mask = (attention_mask.causal, attention_mask.sliding_window, attention_mask.padding,
                                         attention_mask)
    elif attention_mask is None:
        # No mask function ran (the model skipped mask creation): every token is real.
        causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))
        window, padding, mask = window_kwarg, None, None
    else:
        raise UnsupportedModelError(
            f"{where}: got a ready-made {type(attention_mask).__name__} attention mask (e.g. a 4D mask passed to the "
            "model); dispatch runs only the masks its mask function describes: pass the 2D padding mask instead")
    if is_causal is not None and bool(is_causal) != causal:
        raise UnsupportedModelError(f"{where}: is_causal={is_causal} disagrees with the model's "
                                    f"{'causal' if causal else 'bidirectional'} mask")
    if window_kwarg is not None and window_kwarg != window:
        raise UnsupportedModelError(f"{where}: sliding_window={window_kwarg} disagrees with the model's mask "
                                    f"(window {window})")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.numel() != query.shape[1]:
            raise UnsupportedModelError(f"{where}: sinks: expected one value per query head ({query.shape[1]}), got "
                                        f"{tuple(getattr(sinks, 'shape', ()))}")
        sinks = sinks.detach().reshape(-1).to(torch.float32).contiguous()
    return _Call(causal=causal, sliding_window=int(window) if window is not None else None,
                 logits_soft_cap=float(softcap) if softcap else None,
                 softmax_scale=float(scaling) if scaling is not None else None,
                 sinks=sinks, padding=padding, mask=mask)


def _semantics(call: _Call, query: torch.Tensor, key: torch.Tensor) -> dict:
    """The AttentionConfig fields that say what is computed, from one call."""
    return dict(num_heads=int(query.shape[1]), num_kv_heads=int(key.shape[1]), head_size=int(query.shape[3]),
                q_dtype=canonical_dtype_name(query.dtype), causal=call.causal, sliding_window=call.sliding_window,
                logits_soft_cap=call.logits_soft_cap, softmax_scale=call.softmax_scale,
                use_sinks=call.sinks is not None)


# ---- the varlen layout of a padded chunk -----------------------------------------------------------


def _padding_stats(padding: torch.Tensor, q_length: int) -> tuple[list[int], list[int], list[bool]]:
    """Per row of a 2D padding mask: real tokens, real tokens among the last q_length, left-padded or not.
    One device-to-host copy."""
    totals = padding.sum(dim=-1)
    chunk = padding[:, padding.shape[1] - q_length:].sum(dim=-1)
    left_padded = (padding[:, 1:] >= padding[:, :-1]).all(dim=-1) if padding.shape[1] > 1 else \
        torch.ones_like(totals, dtype=torch.bool)
    host = torch.stack([totals.long(), chunk.long(), left_padded.long()]).cpu()
    return host[0].tolist(), host[1].tolist(), [bool(x) for x in host[2].tolist()]


def _real_rows(counts: Sequence[int], q_length: int) -> Optional[torch.Tensor]:
    """Indices (host, int64) of the real tokens of a [B * q_length] chunk whose row b ends with counts[b]
    real tokens; None when every token is real."""
    if all(n == q_length for n in counts):
        return None
    return torch.cat([torch.arange(b * q_length + q_length - n, (b + 1) * q_length) for b, n in enumerate(counts)])


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _pack(x: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, heads, S, D] -> [B * S, heads, D] (token-major, contiguous), keeping the rows in `index`."""
    batch, heads, length, size = x.shape
    tokens = x.transpose(1, 2).reshape(batch * length, heads, size)
    if index is not None:
        return tokens.index_select(0, index)
    return tokens.contiguous()


def _unpack(out: torch.Tensor, index: Optional[torch.Tensor], batch: int, length: int) -> torch.Tensor:
    """[N, H, D] -> [B, S, H, D], zeros at the pad positions."""
    if index is None:
        return out.view(batch, length, *out.shape[1:])
    full = out.new_zeros(batch * length, *out.shape[1:])
    full.index_copy_(0, index, out)
    return full.view(batch, length, *out.shape[1:])


# ---- the attention function --------------------------------------------------------------------------


@dataclass
class _Pending:
    """New keys handed out by PagedKVCache.update(), waiting for the layer's attention call."""

    store: "_PagedStore"
    layer: int
    key: torch.Tensor
    value: torch.Tensor


_PENDING: contextvars.ContextVar[Optional[_Pending]] = contextvars.ContextVar("dispatch_hf_pending", default=None)
_DENSE_CONFIGS: dict[tuple, AttentionConfig] = {}


def _attention_forward(name: str, module, query, key, value, attention_mask, **kwargs):
    call = _read_call(module, query, key, value, attention_mask, kwargs)
    layer = getattr(module, "layer_idx", None)
    pending = _PENDING.get()
    if pending is not None and pending.layer == layer:
        if pending.key is not key or pending.value is not value:
            raise UnsupportedModelError(
                f"layer {layer}: the keys given to attention are not the ones PagedKVCache.update() returned (the model "
                "changes them after the cache update), which the paged cache cannot follow")
        _PENDING.set(None)
        out = pending.store.attend(layer, query, key, value, call, _REGISTERED[name])
    else:
        out = _attend_dense(name, query, key, value, call)
    return out, None


def _dense_layout(call: _Call, batch: int, q_length: int, kv_length: int, device: torch.device):
    """(keys per row, real queries per row, query index, first real key per row) of a dense call."""
    mask = call.mask
    if mask is not None and mask._dense_layout is not None and mask._dense_layout[0] == (q_length, kv_length):
        return mask._dense_layout[1]
    if call.padding is None:
        length = kv_length
        if mask is not None:
            offset = mask.q_offset
            # StaticCache keeps max_cache_len slots: only the first q_offset + q_length hold keys.
            length = int(offset) + q_length if offset is not None else kv_length
        totals, counts, starts = [length] * batch, [q_length] * batch, [0] * batch
    else:
        padding = call.padding
        if padding.shape[0] != batch or not q_length <= padding.shape[1] <= kv_length:
            raise UnsupportedModelError(f"attention mask: padding mask of shape {tuple(padding.shape)} does not fit "
                                        f"a batch of {batch} with {q_length} queries and {kv_length} keys")
        totals, counts, left_padded = _padding_stats(padding, q_length)
        bad = [b for b, ok in enumerate(left_padded) if not ok or totals[b] == 0]
        if bad:
            raise UnsupportedModelError(f"attention mask: rows {bad} are not left-padded (zeros, then ones, with at "
                                        "least one token); dispatch runs left padding only")
        starts = [padding.shape[1] - t for t in totals]
    index = _real_rows(counts, q_length)
    layout = (totals, counts, None if index is None else index.to(device), starts)
    if mask is not None:
        mask._dense_layout = ((q_length, kv_length), layout)
    return layout


def _attend_dense(name: str, query, key, value, call: _Call) -> torch.Tensor:
    """Attention over dense keys (no PagedKVCache): pack them into pages each call (16-bit)."""
    batch, _, q_length, _ = query.shape
    kv_length = key.shape[2]
    totals, counts, index, starts = _dense_layout(call, batch, q_length, kv_length, query.device)
    registration = _REGISTERED[name]
    fields = _semantics(call, query, key)
    config_key = (registration.backend, tuple(sorted(fields.items())))
    config = _DENSE_CONFIGS.get(config_key)
    if config is None:
        extra = {"backend": registration.backend} if registration.backend else {}
        config = AttentionConfig(**fields, kv_cache_dtype=fields["q_dtype"], **extra)
        dispatch.select(config, query.device)  # refuse here, with every backend's reasons
        if len(_DENSE_CONFIGS) >= 1024:  # a model has few; the bound keeps a pathological caller from growing it
            _DENSE_CONFIGS.clear()
        _DENSE_CONFIGS[config_key] = config
    keys = [key[b, :, starts[b]:starts[b] + totals[b]].transpose(0, 1) for b in range(batch)]
    values = [value[b, :, starts[b]:starts[b] + totals[b]].transpose(0, 1) for b in range(batch)]
    paged = paged_kv_from_dense(keys, values, config=config)
    cu = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=query.device)
    # q_length bounds every row's query on the host: auto may take the backend measured fastest for it.
    out = dispatch.attention(_pack(query, index), paged.key_cache, paged.value_cache, cu, paged.seq_lens,
                             paged.block_table, config=config, sinks=call.sinks, max_query_len=q_length)
    return _unpack(out, index, batch, q_length)


# ---- per-layer settings from the model -------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSettings:
    """What a model's config says about one attention layer."""

    layer: int
    layer_type: str  # "full_attention" or "sliding_attention"
    sliding_window: Optional[int]
    logits_soft_cap: Optional[float]


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    if getter is not None:
        try:
            return getter(decoder=True)
        except TypeError:
            return getter()
    return config


def model_layer_settings(config) -> list[LayerSettings]:
    """Each layer's sliding window and softcap, read from a transformers config as transformers' own caches and
    masks read it: ``layer_types`` when given, else every layer sliding when ``sliding_window`` is set."""
    config = _text_config(config)
    layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if getattr(config, "attention_chunk_size", None) is not None:
            layer_types = ["chunked_attention"] * layers
        else:
            layer_types = ["sliding_attention" if window is not None else "full_attention"] * layers
    softcap = getattr(config, "attn_logit_softcapping", None) or None
    settings = []
    for index, layer_type in enumerate(list(layer_types)[:layers]):
        if layer_type not in ("full_attention", "sliding_attention"):
            raise UnsupportedModelError(f"layer {index}: layer type {layer_type!r}; dispatch runs 'full_attention' "
                                        "and 'sliding_attention' layers")
        sliding = layer_type == "sliding_attention"
        if sliding and window is None:
            raise UnsupportedModelError(f"layer {index}: a sliding_attention layer but the config has no sliding_window")
        settings.append(LayerSettings(index, layer_type, int(window) if sliding else None,
                                      float(softcap) if softcap else None))
    return settings


# ---- the paged store (everything but the transformers Cache shell) ------------------------------------


def _kv_mode(value) -> KVQuantMode:
    try:
        return value if isinstance(value, KVQuantMode) else KVQuantMode(value)
    except ValueError:
        raise ValueError(f"kv_mode: expected one of {[m.value for m in KVQuantMode]} (any case), got {value!r}") from None


@dataclass(frozen=True)
class _Policy:
    """How one layer's cache is stored and which backend reads it (the part a config file may choose)."""

    kv_quant_mode: KVQuantMode
    kv_cache_dtype: Optional[str]  # None: the model's 16-bit dtype
    backend: Optional[str]
    file_config: Optional[AttentionConfig] = None


# Fields of a file's config that say what is computed: they must match the model.
_SEMANTIC_FIELDS = ("num_heads", "num_kv_heads", "head_size", "q_dtype", "causal", "sliding_window",
                    "logits_soft_cap", "use_sinks", "use_alibi")


def _file_conflicts(file_config: AttentionConfig, expected: dict) -> list[str]:
    problems = []
    for name in _SEMANTIC_FIELDS:
        if name in expected and getattr(file_config, name) != expected[name]:
            problems.append(f"{name}={getattr(file_config, name)!r} but the model has {expected[name]!r}")
    if "softmax_scale" in expected:
        model_scale = expected["softmax_scale"] or 1.0 / math.sqrt(expected["head_size"])
        if not math.isclose(file_config.scale, model_scale, rel_tol=1e-6):
            problems.append(f"softmax scale {file_config.scale!r} but the model scales by {model_scale!r}")
    if "q_dtype" in expected and file_config.out_dtype != expected["q_dtype"]:
        problems.append(f"out_dtype={file_config.out_dtype!r} but the model needs {expected['q_dtype']!r}")
    return problems


@dataclass
class _Step:
    """One forward's varlen layout, shared by every layer (device tensors, built once per step)."""

    batch: int
    q_length: int
    index: Optional[torch.Tensor]  # int64 [N]: real tokens of the flattened [B * q_length] chunk; None: all
    slot_mapping: torch.Tensor  # int64 [N]
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    block_table: torch.Tensor  # int32 [B, max_blocks_per_seq]
    done: set = field(default_factory=set)


class _Layer(KVCacheTensors):
    """One layer's pages and scales."""

    def __init__(self, index: int, settings: Optional[LayerSettings], policy: _Policy):
        self.index = index
        self.settings = settings
        self.policy = policy
        self.key_cache: Optional[torch.Tensor] = None
        self.value_cache: Optional[torch.Tensor] = None
        self.k_scale: Optional[torch.Tensor] = None  # FP8_PER_TENSOR
        self.v_scale: Optional[torch.Tensor] = None
        self.k_scale_cache: Optional[torch.Tensor] = None  # per-token-head modes
        self.v_scale_cache: Optional[torch.Tensor] = None
        self.config_key: Optional[tuple] = None
        self.config: Optional[AttentionConfig] = None
        self.written = False  # write_kv checked these pages once


class _PagedStore:
    """Pages, block table, per-row lengths and the per-step layout behind PagedKVCache."""

    def __init__(self, *, model_config, num_layers: int, max_batch_size: int, max_cache_len: int, block_size: int,
                 num_blocks: int, policies: Sequence[_Policy], settings: Sequence[Optional[LayerSettings]],
                 given_scales: Optional[tuple[Sequence[float], Sequence[float]]], headroom: float):
        self.model_config = model_config
        self.max_batch_size = max_batch_size
        self.max_cache_len = max_cache_len
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = math.ceil(max_cache_len / block_size)
        self.given_scales = given_scales
        self.headroom = headroom
        self.layers = [_Layer(i, settings[i], policies[i]) for i in range(num_layers)]
        self.reset()

    def reset(self) -> None:
        self.columns = 0  # tokens per row seen so far, pads included (what transformers calls the seq length)
        self.batch: Optional[int] = None
        self.lengths = torch.zeros(0, dtype=torch.int64)  # real tokens per row
        self.pages = torch.zeros(0, dtype=torch.int64)  # pages per row
        self.table = torch.zeros(self.max_batch_size, self.max_blocks_per_seq, dtype=torch.int64)
        self.next_page = 0
        self.step: Optional[_Step] = None
        self.device_table: Optional[torch.Tensor] = None
        self.table_changed = True  # the device copy of the block table is stale
        pending = _PENDING.get()
        if pending is not None and pending.store is self:
            _PENDING.set(None)

    # -- transformers' side: update() ------------------------------------------------------------------

    def stash(self, key_states: torch.Tensor, value_states: torch.Tensor, layer: int):
        implementation = getattr(self.model_config, "_attn_implementation", None)
        if implementation not in _REGISTERED:
            raise UnsupportedModelError(
                f"PagedKVCache: the model's attn_implementation is {implementation!r}; only an attention function "
                f"added by dispatch.integrations.transformers.register() reads these pages (registered: "
                f"{sorted(_REGISTERED)})")
        if not 0 <= layer < len(self.layers):
            raise UnsupportedModelError(f"PagedKVCache: layer {layer} is not one of the cache's {len(self.layers)} "
                                        "layers")
        pending = _PENDING.get()
        if pending is not None and pending.store is self:
            raise UnsupportedModelError(
                f"PagedKVCache: layer {pending.layer}'s new keys were never attended before layer {layer} updated "
                "the cache (a failed forward, or a model that does not call attention right after the update); "
                "call cache.reset() and start again")
        entry = self.layers[layer]
        if entry.key_cache is None:
            self._allocate(entry, key_states)
        _PENDING.set(_Pending(self, layer, key_states, value_states))
        return key_states, value_states

    def _allocate(self, entry: _Layer, key_states: torch.Tensor) -> None:
        heads, size = int(key_states.shape[1]), int(key_states.shape[3])
        device = key_states.device
        policy = entry.policy
        dtype = torch_dtype(policy.kv_cache_dtype) if policy.kv_cache_dtype else key_states.dtype
        shape = (self.num_blocks, self.block_size, heads, size)
        entry.key_cache = zeros_cache(shape, dtype, device)
        entry.value_cache = zeros_cache(shape, dtype, device)
        if policy.kv_quant_mode.is_per_token_head:
            entry.k_scale_cache = torch.zeros(shape[:3], dtype=torch.float32, device=device)
            entry.v_scale_cache = torch.zeros(shape[:3], dtype=torch.float32, device=device)
        elif policy.kv_quant_mode is KVQuantMode.FP8_PER_TENSOR and self.given_scales is not None:
            k_scales, v_scales = self.given_scales
            entry.k_scale = torch.tensor([k_scales[entry.index]], dtype=torch.float32, device=device)
            entry.v_scale = torch.tensor([v_scales[entry.index]], dtype=torch.float32, device=device)

    # -- dispatch's side: the attention call -------------------------------------------------------------

    def attend(self, layer: int, query, key, value, call: _Call, registration: _Registration) -> torch.Tensor:
        batch, _, q_length, _ = query.shape
        step = self._step_for(layer, call, batch, q_length, query.device)
        entry = self.layers[layer]
        config = self._config_for(entry, call, query, key, registration)
        new_keys, new_values = _pack(key, step.index), _pack(value, step.index)
        if config.kv_quant_mode is KVQuantMode.FP8_PER_TENSOR and entry.k_scale is None:
            # Calibrated once, from this layer's first real tokens (the prefill), then fixed.
            entry.k_scale = calibrate_scale(new_keys, config.kv_cache_dtype, headroom=self.headroom)
            entry.v_scale = calibrate_scale(new_values, config.kv_cache_dtype, headroom=self.headroom)
        if entry.written:
            # The same pages, scales and config as the checked first write; keys and slots are packed here.
            write_kv_unchecked(new_keys, new_values, entry.key_cache, entry.value_cache, step.slot_mapping, config,
                               entry.k_scale, entry.v_scale, entry.k_scale_cache, entry.v_scale_cache)
        else:
            write_kv(new_keys, new_values, entry.key_cache, entry.value_cache, step.slot_mapping, config=config,
                     k_scale=entry.k_scale, v_scale=entry.v_scale, k_scale_cache=entry.k_scale_cache,
                     v_scale_cache=entry.v_scale_cache)
            entry.written = True
        # q_length bounds every row's query on the host (the engine's max_query_len): prefill steps may run
        # on the backend measured fastest for prefill (dispatch/speed.py), decode steps on the decode one.
        out = dispatch.attention(_pack(query, step.index), entry.key_cache, entry.value_cache, step.cu_seqlens_q,
                                 step.seq_lens, step.block_table, config=config, sinks=call.sinks,
                                 max_query_len=q_length, **entry.scales())
        return _unpack(out, step.index, batch, q_length)

    def _step_for(self, layer: int, call: _Call, batch: int, q_length: int, device: torch.device) -> _Step:
        step = self.step
        if step is not None and layer not in step.done:
            if (step.batch, step.q_length) != (batch, q_length):
                raise UnsupportedModelError(
                    f"PagedKVCache: layer {layer} got {batch} x {q_length} queries in a step that started with "
                    f"{step.batch} x {step.q_length}")
        else:
            if step is not None and len(step.done) != len(self.layers):
                # Its tokens are in some layers' pages and not in others': reading on would be wrong.
                raise UnsupportedModelError(
                    f"PagedKVCache: the previous forward attended {len(step.done)} of {len(self.layers)} layers (it "
                    "failed part-way); call cache.reset() and run the batch again")
            step = self.step = self._new_step(call, batch, q_length, device)
        step.done.add(layer)
        return step

    def _new_step(self, call: _Call, batch: int, q_length: int, device: torch.device) -> _Step:
        """Host bookkeeping of one forward: lengths from the mask, pages, slots; then one upload."""
        if self.batch is None:
            if batch > self.max_batch_size:
                raise UnsupportedModelError(f"PagedKVCache: batch of {batch} rows, but max_batch_size="
                                            f"{self.max_batch_size}")
            self.batch = batch
            self.lengths = torch.zeros(batch, dtype=torch.int64)
            self.pages = torch.zeros(batch, dtype=torch.int64)
        elif batch != self.batch:
            raise UnsupportedModelError(f"PagedKVCache: a batch of {batch} rows, but the cache holds {self.batch}; "
                                        "call cache.reset() before a new batch")
        old = self.lengths
        if call.padding is None:
            counts = torch.full((batch,), q_length, dtype=torch.int64)
        else:
            padding = call.padding
            if tuple(padding.shape) != (batch, self.columns + q_length):
                raise UnsupportedModelError(
                    f"PagedKVCache: attention mask of shape {tuple(padding.shape)}, expected ({batch}, "
                    f"{self.columns + q_length}): the cache has seen {self.columns} tokens per row and this forward "
                    f"adds {q_length}")
            totals, chunk, left_padded = _padding_stats(padding, q_length)
            counts = torch.tensor(chunk, dtype=torch.int64)
            bad = [b for b in range(batch) if not left_padded[b] or totals[b] == 0]
            if bad:
                raise UnsupportedModelError(f"attention mask: rows {bad} are not left-padded (zeros, then ones, with "
                                            "at least one token); dispatch runs left padding only")
            changed = [b for b in range(batch) if totals[b] != int(old[b]) + chunk[b]]
            if changed:
                raise UnsupportedModelError(
                    f"attention mask: rows {changed} count other past tokens than the cache holds "
                    f"({[int(old[b]) for b in changed]}); the mask of earlier tokens must not change")
        lengths = old + counts
        too_long = [b for b in range(batch) if int(lengths[b]) > self.max_cache_len]
        if too_long:
            raise UnsupportedModelError(f"PagedKVCache: rows {too_long} would hold {int(lengths.max())} tokens, more "
                                        f"than max_cache_len={self.max_cache_len}")
        self._grow(lengths)
        # Slots of the new tokens, row by row: position old[b] + i of row b.
        total = int(counts.sum())
        rows = torch.repeat_interleave(torch.arange(batch), counts)
        firsts = torch.cumsum(counts, 0) - counts
        positions = torch.arange(total) - torch.repeat_interleave(firsts, counts) + torch.repeat_interleave(old, counts)
        slots = self.table[rows, positions // self.block_size] * self.block_size + positions % self.block_size
        index = _real_rows(counts.tolist(), q_length)
        cu = torch.zeros(batch + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(counts, 0).to(torch.int32)
        if self.table_changed:
            self.device_table = _to_device(self.table[:batch].to(torch.int32), device)
            self.table_changed = False
        self.lengths = lengths
        self.columns += q_length
        return _Step(batch=batch, q_length=q_length, index=None if index is None else _to_device(index, device),
                     slot_mapping=_to_device(slots, device), cu_seqlens_q=_to_device(cu, device),
                     seq_lens=_to_device(lengths.to(torch.int32), device), block_table=self.device_table)

    def _grow(self, lengths: torch.Tensor) -> None:
        """Hand out pages (bump allocator) until every row has room for its length."""
        needed = torch.div(lengths + self.block_size - 1, self.block_size, rounding_mode="floor")
        new = needed - self.pages
        count = int(new.sum())
        if count == 0:
            return
        if self.next_page + count > self.num_blocks:
            raise UnsupportedModelError(f"PagedKVCache: out of pages ({self.num_blocks} of {self.block_size} tokens); "
                                        "give a larger num_blocks (or max_batch_size x max_cache_len)")
        pages = torch.arange(self.next_page, self.next_page + count)
        rows = torch.repeat_interleave(torch.arange(len(new)), new)
        firsts = torch.cumsum(new, 0) - new
        columns = torch.arange(count) - torch.repeat_interleave(firsts, new) + torch.repeat_interleave(self.pages, new)
        self.table[rows, columns] = pages
        self.next_page += count
        self.pages = needed
        self.table_changed = True

    def _config_for(self, entry: _Layer, call: _Call, query, key, registration: _Registration) -> AttentionConfig:
        config_key = (query.shape[1], key.shape[1], query.shape[3], query.dtype, call.causal, call.sliding_window,
                      call.logits_soft_cap, call.softmax_scale, call.sinks is not None)
        if entry.config_key == config_key:
            return entry.config
        fields = _semantics(call, query, key)
        where = f"layer {entry.index}"
        settings = entry.settings
        if settings is not None:
            if settings.sliding_window != call.sliding_window:
                raise UnsupportedModelError(f"{where}: the model's config gives sliding_window="
                                            f"{settings.sliding_window}, but its mask has window {call.sliding_window}")
            if settings.logits_soft_cap != call.logits_soft_cap:
                raise UnsupportedModelError(f"{where}: the model's config gives attn_logit_softcapping="
                                            f"{settings.logits_soft_cap}, but the call passes softcap="
                                            f"{call.logits_soft_cap}")
        policy = entry.policy
        if policy.file_config is not None:
            expected = dict(fields, num_heads=_global_heads(self.model_config, fields["num_heads"], "q"),
                            num_kv_heads=_global_heads(self.model_config, fields["num_kv_heads"], "kv"),
                            use_alibi=False)
            problems = _file_conflicts(policy.file_config, expected)
            if problems:
                raise UnsupportedModelError(f"{where}: the dispatch config file disagrees with the model: "
                                            + "; ".join(problems))
        cache_dtype = policy.kv_cache_dtype or fields["q_dtype"]
        backend = policy.backend or registration.backend
        config = AttentionConfig(**fields, kv_cache_dtype=cache_dtype, kv_quant_mode=policy.kv_quant_mode,
                                 block_size=self.block_size, **({"backend": backend} if backend else {}))
        if entry.key_cache.dtype != config.kv_cache_torch_dtype:
            raise UnsupportedModelError(f"{where}: pages were allocated as {entry.key_cache.dtype}, the config needs "
                                        f"{config.kv_cache_dtype}")
        dispatch.select(config, query.device)  # refuse here, with every backend's reasons
        entry.config_key, entry.config = config_key, config
        return config

    def nbytes(self) -> int:
        return sum(entry.nbytes() for entry in self.layers)

    def used_bytes(self) -> int:
        """Bytes of the pages handed out so far (all layers, with their scales)."""
        if self.num_blocks == 0:
            return 0
        return self.nbytes() * self.next_page // self.num_blocks


def _global_heads(model_config, local: int, which: str) -> int:
    """The model's head count (tensor parallelism hands each rank a share; a file describes the model)."""
    name = "num_attention_heads" if which == "q" else "num_key_value_heads"
    value = getattr(_text_config(model_config), name, None)
    if which == "kv" and value is None:
        value = getattr(_text_config(model_config), "num_attention_heads", None)
    return int(value) if value is not None else local


# ---- the transformers Cache shell ---------------------------------------------------------------------


def _model_parts(model) -> tuple[Any, Optional[torch.dtype], Optional[torch.device]]:
    """(config, dtype, device) of a model, or (config, None, None) of a config."""
    if isinstance(model, torch.nn.Module):
        return model.config, getattr(model, "dtype", None), getattr(model, "device", None)
    return model, None, None


def _layer_policies(kv_mode, fp8_dtype: str, backend: Optional[str], config_file, block_size: int,
                    num_layers: int) -> list[_Policy]:
    """Each layer's KV mode, cache dtype and backend: the same for all, or from a config file's layers map."""
    if config_file is None:
        mode = _kv_mode(kv_mode if kv_mode is not None else KVQuantMode.NONE)
        cache_dtype = {KVQuantMode.NONE: None, KVQuantMode.FP8_PER_TENSOR: fp8_dtype,
                       KVQuantMode.FP8_PER_TOKEN_HEAD: fp8_dtype, KVQuantMode.INT8_PER_TOKEN_HEAD: "int8"}[mode]
        return [_Policy(mode, cache_dtype, backend)] * num_layers
    if kv_mode is not None:
        raise ValueError("kv_mode: give either kv_mode or config_file (whose layers choose the KV mode), not both")
    loaded = dispatch.load_file(config_file, backend=backend)
    policies = []
    for index in range(num_layers):
        file_config = loaded.config_for_layer(index)
        if file_config.block_size != block_size:
            raise ValueError(f"{loaded.path}: layer {index} has block_size={file_config.block_size}, but every layer "
                             f"of a PagedKVCache shares one block table of block_size={block_size}")
        if file_config.q_is_fp8:
            raise UnsupportedModelError(f"{loaded.path}: layer {index} has q_dtype={file_config.q_dtype}; the model's "
                                        "queries are 16-bit (an FP8 query is not produced by transformers models)")
        cache_dtype = None if file_config.kv_quant_mode is KVQuantMode.NONE else file_config.kv_cache_dtype
        policies.append(_Policy(file_config.kv_quant_mode, cache_dtype, file_config.backend if file_config.backend
                                != "auto" else None, file_config))
    return policies


def _setup_checks(policies: Sequence[_Policy], settings: Sequence[LayerSettings], config, dtype, device) -> None:
    """Refuse at set-up what the model's config already shows dispatch cannot run."""
    text = _text_config(config)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_size = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    q_dtype = canonical_dtype_name(dtype)
    for policy, layer in zip(policies, settings):
        fields = dict(num_heads=heads, num_kv_heads=kv_heads, head_size=head_size, q_dtype=q_dtype,
                      sliding_window=layer.sliding_window, logits_soft_cap=layer.logits_soft_cap)
        if policy.file_config is not None:
            problems = _file_conflicts(policy.file_config, fields)
            if problems:
                raise UnsupportedModelError(f"layer {layer.layer}: the dispatch config file disagrees with the "
                                            "model: " + "; ".join(problems))
        config_fields = dict(fields, kv_cache_dtype=policy.kv_cache_dtype or q_dtype,
                             kv_quant_mode=policy.kv_quant_mode)
        if policy.backend:
            config_fields["backend"] = policy.backend
        try:
            attention_config = AttentionConfig(**config_fields)
        except ValueError as exc:
            raise UnsupportedModelError(f"layer {layer.layer}: {exc}") from None
        if device is not None and device.type != "meta":
            dispatch.select(attention_config, device)


@functools.lru_cache(maxsize=1)
def _cache_class():
    _import_transformers()
    from transformers.cache_utils import Cache, CacheLayerMixin

    class PagedLayer(CacheLayerMixin):
        """One layer of a PagedKVCache, as transformers' Cache sees it (the pages live in the store)."""

        is_compileable = False
        is_croppable = False

        def __init__(self, store: _PagedStore, index: int, sliding: bool):
            super().__init__()
            self.store, self.index, self.is_sliding = store, index, sliding

        def lazy_initialization(self, key_states, value_states) -> None:
            self.store._allocate(self.store.layers[self.index], key_states)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            keys = self.store.stash(key_states, value_states, self.index)
            self.is_initialized = True
            return keys

        def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
            return self.store.columns + query_length, 0

        def get_seq_length(self) -> int:
            return self.store.columns

        def get_max_length(self) -> int:
            return self.store.max_cache_len

        def reset(self) -> None:
            self.store.reset()

        def reorder_cache(self, beam_idx) -> None:
            raise NotImplementedError("PagedKVCache: beam search (reordering rows) is not supported; use greedy or "
                                      "sampling with one sequence per row")

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove:
                raise NotImplementedError("PagedKVCache: cropping (assisted decoding) is not supported")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("PagedKVCache: expanding rows (num_return_sequences, beams) is not supported; "
                                      "repeat the prompts in the batch instead")

        def batch_select_indices(self, indices) -> None:
            raise NotImplementedError("PagedKVCache: selecting rows is not supported")

        def offload(self) -> None:
            raise NotImplementedError("PagedKVCache: offloading is not supported")

        def prefetch(self) -> None:
            raise NotImplementedError("PagedKVCache: offloading is not supported")

    class PagedKVCache(Cache):
        """A transformers Cache whose keys and values live in dispatch's pages, read by `dispatch.attention`.

        Args:
            model: the model (a PreTrainedModel: its config, dtype and device are checked at set-up) or its
                config. Its ``attn_implementation`` must be a name given to `register`.
            max_batch_size: rows per batch (a left-padded batch counts its rows).
            max_cache_len: tokens per row, prompt and generated (pads not counted).
            kv_mode: "none" (16-bit pages in the model's dtype), "fp8_per_tensor", "fp8_per_token_head" or
                "int8_per_token_head" (a `KVQuantMode`, any case). None with ``config_file``.
            block_size: tokens per page (16 suits every backend; the Triton kernel needs a multiple of 16).
            num_blocks: pages per layer; default ``max_batch_size * ceil(max_cache_len / block_size)``.
            fp8_dtype: "float8_e4m3fn" (default) or "float8_e5m2" for the FP8 modes.
            k_scale, v_scale: FP8_PER_TENSOR dequantization scales: one float for every layer, or one per
                layer. When None, each layer calibrates its scales once, from the first forward's real tokens
                (the prefill): amax(|K|) * calibration_headroom / format max; later tokens beyond that
                saturate to the format's max.
            calibration_headroom: >= 1; 2 (the default) lets a decoded value reach twice the prefill's
                largest before it saturates, at no cost in relative precision for normal fp8 values.
            config_file: a dispatch config file (TOML / YAML / JSON) whose ``layers`` map chooses each
                layer's kv_cache_dtype, kv_quant_mode and backend; its other fields must match the model.
            backend: the dispatch backend ("triton", "sdpa", ...); None: the file's, `register`'s, or auto.

        Greedy decoding and sampling with one sequence per row; beam search, assisted decoding and row
        reordering are refused. ``reset()`` frees every page for a new batch.
        """

        def __init__(self, model, *, max_batch_size: int, max_cache_len: int,
                     kv_mode: Union[str, KVQuantMode, None] = None, block_size: int = 16,
                     num_blocks: Optional[int] = None, fp8_dtype: str = "float8_e4m3fn",
                     k_scale: Union[float, Sequence[float], None] = None,
                     v_scale: Union[float, Sequence[float], None] = None,
                     calibration_headroom: float = 2.0, config_file: Union[str, os.PathLike, None] = None,
                     backend: Optional[str] = None):
            config, dtype, device = _model_parts(model)
            text = _text_config(config)
            num_layers = int(text.num_hidden_layers)
            for name, value in (("max_batch_size", max_batch_size), ("max_cache_len", max_cache_len),
                                ("block_size", block_size)):
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ValueError(f"{name}: expected a positive int, got {value!r}")
            if num_blocks is None:
                num_blocks = max_batch_size * math.ceil(max_cache_len / block_size)
            if not isinstance(num_blocks, int) or num_blocks <= 0:
                raise ValueError(f"num_blocks: expected a positive int, got {num_blocks!r}")
            fp8_name = canonical_dtype_name(fp8_dtype)
            if fp8_name not in FP8_DTYPES:
                raise ValueError(f"fp8_dtype: expected one of {sorted(FP8_DTYPES)}, got {fp8_dtype!r}")
            if not (calibration_headroom >= 1.0 and math.isfinite(calibration_headroom)):
                raise ValueError(f"calibration_headroom: expected a finite number >= 1, got {calibration_headroom!r}")
            implementation = getattr(text, "_attn_implementation", None)
            if implementation not in _REGISTERED:
                raise UnsupportedModelError(
                    f"PagedKVCache: the model's attn_implementation is {implementation!r}; load it with "
                    f"attn_implementation= one of {sorted(_REGISTERED) or ['(call register() first)']}")
            if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
                raise UnsupportedModelError(f"PagedKVCache: the model runs in {dtype}; dispatch runs float16 and "
                                            "bfloat16 models (load it with dtype=torch.bfloat16)")
            settings = model_layer_settings(config)
            policies = _layer_policies(kv_mode, fp8_name, backend, config_file, block_size, num_layers)
            given = None
            if k_scale is not None or v_scale is not None:
                if k_scale is None or v_scale is None:
                    raise ValueError("k_scale, v_scale: give both or neither (neither: calibrated from the prefill)")
                if any(p.kv_quant_mode is not KVQuantMode.FP8_PER_TENSOR for p in policies):
                    raise ValueError("k_scale, v_scale: only for kv_mode=FP8_PER_TENSOR")
                given = (_per_layer("k_scale", k_scale, num_layers), _per_layer("v_scale", v_scale, num_layers))
            if dtype is not None:
                _setup_checks(policies, settings, config, dtype, device)
            self.store = _PagedStore(model_config=text, num_layers=num_layers, max_batch_size=max_batch_size,
                                     max_cache_len=max_cache_len, block_size=block_size, num_blocks=num_blocks,
                                     policies=policies, settings=settings, given_scales=given,
                                     headroom=float(calibration_headroom))
            layers = [PagedLayer(self.store, i, settings[i].sliding_window is not None) for i in range(num_layers)]
            super().__init__(layers=layers)

        def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
            """Hand the new keys [B, Hkv, S, D] of layer `layer_idx` to its attention call (returned as given);
            they are written into pages there, where the padding is known."""
            keys = self.store.stash(key_states, value_states, layer_idx)
            self.layers[layer_idx].is_initialized = True
            return keys

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.store.columns

        def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
            return self.store.columns + query_length, 0

        def get_max_length(self, layer_idx: Optional[int] = None) -> int:
            return self.store.max_cache_len

        def reset(self) -> None:
            """Free every page (and forget the calibrated per-tensor scales) for a new batch."""
            self.store.reset()
            for entry in self.store.layers:
                if self.store.given_scales is None:
                    entry.k_scale = entry.v_scale = None

        def memory_bytes(self) -> int:
            """Bytes allocated for pages and scales, all layers."""
            return self.store.nbytes()

        def used_bytes(self) -> int:
            """Bytes of the pages handed out so far, all layers."""
            return self.store.used_bytes()

        def layer_config(self, layer_idx: int) -> Optional[AttentionConfig]:
            """The AttentionConfig layer `layer_idx` ran with (None before its first call)."""
            return self.store.layers[layer_idx].config

        def layer_scales(self, layer_idx: int) -> dict:
            """The layer's scale tensors: k_scale / v_scale (per tensor) or k_scale_cache / v_scale_cache."""
            return self.store.layers[layer_idx].scales()

        def layer_pages(self, layer_idx: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
            """The layer's (key_cache, value_cache) pages [num_blocks, block_size, num_kv_heads, head_size]."""
            entry = self.store.layers[layer_idx]
            return entry.key_cache, entry.value_cache

        def block_table(self) -> torch.Tensor:
            """A copy of the block table, int64 [rows, max_blocks_per_seq] (page ids; unused columns are 0)."""
            return self.store.table[: self.store.batch or 0].clone()

        def seq_lens(self) -> list[int]:
            """Real tokens per row (pads excluded)."""
            return [int(x) for x in self.store.lengths]

    for cls in (PagedLayer, PagedKVCache):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return PagedKVCache


def _per_layer(name: str, value, num_layers: int) -> list[float]:
    values = [float(value)] * num_layers if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != num_layers or not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"{name}: expected one positive scale, or one per layer ({num_layers}), got {value!r}")
    return values


def __getattr__(name: str):
    """PagedKVCache: defined on first access, which imports transformers (PEP 562)."""
    if name == "PagedKVCache":
        return _cache_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
