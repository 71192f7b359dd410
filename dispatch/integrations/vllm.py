"""vLLM attention-backend plugin: ``--attention-backend CUSTOM`` runs `dispatch.attention`.

Install ``attention-dispatch[vllm]``: its ``vllm.general_plugins`` entry point
(`register`) runs in every vLLM process and registers `DispatchAttentionBackend`
as ``AttentionBackendEnum.CUSTOM``. The backend reuses vLLM 0.33's Triton
backend for everything but the attention itself: its metadata builder, its KV
cache layout and its cache writer (``do_kv_cache_update``). Only the kernel
call in ``forward`` is replaced, by `dispatch.attention` on views of vLLM's
cache, so vLLM's writer and dispatch's readers share one cache format.

Refusals happen at start-up, with dispatch's own reasons:

- ``validate_configuration`` (vLLM's backend selection) builds the
  `AttentionConfig` the layer would run with (`config_from_vllm`) and asks
  `dispatch.select` for it; every reason a backend gives comes back to vLLM,
  which fails start-up with them. ``python -m dispatch explain`` on the same
  config (`explain_arguments`) gives the same verdict.
- The impl's ``__init__`` (model construction) builds the full configs, with
  the head counts, softcap and ALiBi that selection does not see, and selects
  their backends; a refusal raises `UnsupportedConfigError` there.

Per call, ``forward`` only looks up the prepared config (keyed by the query's
and the output's dtypes and the cache's block size, all host metadata) and
calls `dispatch.attention`; no value is read back from the device, so the call
can be captured in a CUDA graph whenever the chosen backends declare
``cuda_graph_safe`` (the metadata builder reports exactly that to vLLM).

vLLM is imported only when its classes are first needed: importing this
module, and `register`, import nothing from vLLM beyond the registry.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

import dispatch
from dispatch.config import AttentionConfig, KVQuantMode, canonical_dtype_name
from dispatch.errors import UnsupportedConfigError
from dispatch.speed import WORKLOADS

__all__ = [
    "register",
    "config_from_vllm",
    "dispatch_reasons",
    "explain_arguments",
    "split_kv_cache",
    "KV_CACHE_DTYPES",
    "DispatchAttentionBackend",
    "DispatchAttentionImpl",
    "DispatchAttentionMetadataBuilder",
]

BACKEND_CLASS_PATH = f"{__name__}.DispatchAttentionBackend"

# vLLM's kv_cache_dtype names that dispatch can read, with the KV mode each maps to. vLLM's Triton
# cache writer (which this plugin reuses) stores every fp8 name in the platform's fp8 format, e4m3 on
# CUDA, fp8_e5m2 included (triton_reshape_and_cache_flash views the cache as
# current_platform.fp8_dtype()), so that is the format dispatch must read.
KV_CACHE_DTYPES: dict[str, KVQuantMode] = {
    "auto": KVQuantMode.NONE,
    "float16": KVQuantMode.NONE,
    "half": KVQuantMode.NONE,
    "bfloat16": KVQuantMode.NONE,
    "fp8": KVQuantMode.FP8_PER_TENSOR,
    "fp8_e4m3": KVQuantMode.FP8_PER_TENSOR,
    "fp8_e5m2": KVQuantMode.FP8_PER_TENSOR,
    "fp8_per_token_head": KVQuantMode.FP8_PER_TOKEN_HEAD,
    "int8_per_token_head": KVQuantMode.INT8_PER_TOKEN_HEAD,
}
# The fp8 caches for which vLLM quantizes the query when the impl asks for it (its attention layer
# asserts exactly these two names before quantizing; per-token-head caches never get an fp8 query).
_QUANTIZED_QUERY_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
# Tensors that vLLM hands over as views (K/V halves of the packed cache, as_strided scale caches, q
# sliced from the fused qkv projection): a backend that needs them fully contiguous cannot serve vLLM.
_VLLM_VIEWS = frozenset({"q", "key_cache", "value_cache", "k_scale_cache", "v_scale_cache"})
# validate_configuration does not see head counts or the window's size; the verdict does not depend on
# them (capabilities declare features, not values), so these stand in for them there.
_PLACEHOLDER_HEADS = 1
_PLACEHOLDER_WINDOW = 1
# vLLM's default block size, for selection calls made before the block size is decided (None).
_DEFAULT_BLOCK_SIZE = 16

DeviceLike = Union[str, torch.device, dispatch.DeviceInfo, None]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the backend as AttentionBackendEnum.CUSTOM.

    Registering is not selecting: vLLM runs it only with ``--attention-backend CUSTOM``.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)


# ---- vLLM's settings -> AttentionConfig (pure: no vLLM import) -------------------------------------


def fp8_storage_dtype() -> str:
    """The fp8 format vLLM's cache writer stores: its platform's fp8 dtype (float8_e4m3fn on CUDA and
    CPU, float8_e4m3fnuz on some ROCm GPUs, which dispatch does not read and so refuses)."""
    from vllm.platforms import current_platform

    return str(current_platform.fp8_dtype()).removeprefix("torch.")


def config_from_vllm(
    *,
    head_size: int,
    dtype: Union[torch.dtype, str],
    kv_cache_dtype: str = "auto",
    block_size: Optional[int] = None,
    num_heads: int = _PLACEHOLDER_HEADS,
    num_kv_heads: Optional[int] = None,
    scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    logits_soft_cap: Optional[float] = None,
    use_alibi: bool = False,
    has_sink: bool = False,
    quantized_query: bool = False,
    fp8_output: bool = False,
    fp8_dtype: str = "float8_e4m3fn",
    backend: str = "auto",
) -> AttentionConfig:
    """The AttentionConfig of one vLLM attention layer.

    Args mirror vLLM's: ``dtype`` is the model's activation dtype (the query's and the output's
    dtype before any quantization); ``kv_cache_dtype`` vLLM's cache dtype name ("auto", "fp8", ...);
    ``block_size`` the cache's tokens per page (None: vLLM's default 16); ``scale`` the softmax
    scale; ``sliding_window`` W lets query position p see key j when p - j < W (vLLM's
    ``window_size=(W - 1, 0)``); ``logits_soft_cap`` None or 0 means off (vLLM uses 0 for off).
    ``quantized_query``: vLLM hands the query quantized to fp8 with ``layer._q_scale`` (it does so
    for "fp8"/"fp8_e4m3" caches when the impl sets ``supports_quant_query_input``).
    ``fp8_output``: vLLM fused static per-tensor fp8 output quantization into the layer
    (``output_scale``, stored = attention / output_scale, dispatch's meaning too).
    ``fp8_dtype`` is the format vLLM's cache writer stores fp8 caches in (`fp8_storage_dtype`).

    Raises ValueError (a pydantic ValidationError for dispatch's own config rules) naming what
    cannot be expressed.
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r}: dispatch reads no such KV cache (vLLM names it reads: "
            f"{sorted(KV_CACHE_DTYPES)})"
        )
    mode = KV_CACHE_DTYPES[kv_cache_dtype]
    model_dtype = canonical_dtype_name(dtype)
    if mode is KVQuantMode.NONE:
        cache_dtype = model_dtype if kv_cache_dtype == "auto" else canonical_dtype_name(kv_cache_dtype)
    elif mode is KVQuantMode.INT8_PER_TOKEN_HEAD:
        cache_dtype = "int8"
    else:
        cache_dtype = fp8_dtype
    if quantized_query and kv_cache_dtype not in _QUANTIZED_QUERY_KV_CACHE_DTYPES:
        raise ValueError(
            f"quantized_query=True needs kv_cache_dtype in {list(_QUANTIZED_QUERY_KV_CACHE_DTYPES)}, got "
            f"{kv_cache_dtype!r} (vLLM quantizes the query only for those)"
        )
    return AttentionConfig(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads if num_kv_heads is not None else num_heads,
        head_size=head_size,
        q_dtype=fp8_dtype if quantized_query else model_dtype,
        kv_cache_dtype=cache_dtype,
        kv_quant_mode=mode,
        out_dtype=fp8_dtype if fp8_output else model_dtype,
        block_size=block_size if block_size is not None else _DEFAULT_BLOCK_SIZE,
        causal=True,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap if logits_soft_cap else None,
        softmax_scale=scale,
        use_alibi=use_alibi,
        use_sinks=has_sink,
        backend=backend,
    )


def _config_error_text(exc: ValueError) -> str:
    """A config error as one line: pydantic's messages without its framing, else the text itself."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in errors())
    return str(exc)


def explain_arguments(config: AttentionConfig) -> list[str]:
    """``FIELD=VALUE`` arguments for ``python -m dispatch explain`` that rebuild `config` exactly."""
    fields = config.model_dump(mode="json")
    return [f"{name}={value if isinstance(value, str) else json.dumps(value)}"
            for name, value in fields.items() if value is not None]


def _plans(config: AttentionConfig, device: DeviceLike) -> list[dispatch.Plan]:
    """The plan for a call without a workload hint (what `explain` reports) and for each workload that
    forward's ``max_query_len`` hint can name. Raises UnsupportedConfigError when no backend fits."""
    return [dispatch.select(config, device)] + [dispatch.select(config, device, workload) for workload in WORKLOADS]


def _contiguity_reasons(plans: Sequence[dispatch.Plan]) -> list[str]:
    reasons = []
    for plan in {p.name: p for p in plans}.values():
        needs = sorted(set(plan.capability.contiguous_arguments) & _VLLM_VIEWS)
        if needs:
            reasons.append(
                f"dispatch backend {plan.name!r} needs {', '.join(needs)} fully contiguous "
                "(Capability.contiguous_arguments); vLLM hands them over as views of its buffers"
            )
    return reasons


def dispatch_reasons(config: AttentionConfig, device: DeviceLike = None) -> list[str]:
    """Every reason dispatch cannot serve `config` for vLLM on `device`; empty when it can.

    The reasons are dispatch's own: each backend's, as `dispatch.select` (and `python -m dispatch
    explain`) gives them, prefixed with the backend's name.
    """
    try:
        plans = _plans(config, device)
    except UnsupportedConfigError as exc:
        return [f"dispatch backend {name!r}: {reason}" for name, reasons in exc.reasons.items() for reason in reasons]
    return _contiguity_reasons(plans)


def _model_device() -> torch.device:
    """The device vLLM builds this process's model on: its current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---- vLLM's packed cache -> dispatch's views ----------------------------------------------------------


def split_kv_cache(kv_cache: torch.Tensor, config: AttentionConfig):
    """Views of one layer's vLLM cache in dispatch's layout; no copy.

    kv_cache: [num_blocks, num_kv_heads, block_size, 2 * content] (vLLM's logical layout, any
        physical strides with a contiguous last dimension); K is the first ``content`` elements of
        the last dimension and V the second. In 16-bit and fp8 per-tensor modes content is
        head_size (fp8 stored as uint8); in per-token-head modes it is head_size plus 4 bytes, whose
        last 4 hold the row's fp32 scale (vLLM's TritonAttentionBackend.customize_spec).

    Returns (key_cache, value_cache, k_scale_cache, v_scale_cache): the caches
    [num_blocks, block_size, num_kv_heads, head_size] in ``config.kv_cache_dtype``, and for
    per-token-head modes the scales fp32 [num_blocks, block_size, num_kv_heads] (strided), else None.
    """
    head_size = config.head_size
    halves = kv_cache.transpose(1, 2)
    if config.kv_quant_mode.is_per_token_head:
        content = kv_cache.shape[-1] // 2
        key_cache, value_cache = (half[..., :head_size] for half in halves.split(content, dim=-1))
        # The scale of a (slot, head) row sits right after its head_size values, in each half.
        words = kv_cache.view(torch.float32)  # [num_blocks, num_kv_heads, block_size, 2 * content bytes / 4]
        k_word = head_size * kv_cache.element_size() // 4
        v_word = (content + head_size) * kv_cache.element_size() // 4
        k_scale_cache = words[..., k_word].transpose(1, 2)
        v_scale_cache = words[..., v_word].transpose(1, 2)
    else:
        key_cache, value_cache = halves.split(head_size, dim=-1)
        k_scale_cache = v_scale_cache = None
    cache_dtype = config.kv_cache_torch_dtype
    if key_cache.dtype != cache_dtype:  # fp8 is allocated as uint8
        key_cache, value_cache = key_cache.view(cache_dtype), value_cache.view(cache_dtype)
    return key_cache, value_cache, k_scale_cache, v_scale_cache


@dataclass(frozen=True)
class _Call:
    """One prepared variant of a layer's call: its config and which scales it passes."""

    config: AttentionConfig
    cuda_graph_safe: bool
    passes_q_scale: bool
    passes_kv_scales: bool


# ---- the vLLM classes, built on first access ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _vllm_classes() -> dict[str, type]:
    """Define the three vLLM classes (importing vLLM's Triton backend) once, on first access."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym
    from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
    from vllm.v1.attention.backends.triton_attn import (
        TritonAttentionBackend,
        TritonAttentionImpl,
        TritonAttentionMetadataBuilder,
    )

    class DispatchAttentionImpl(TritonAttentionImpl):
        """TritonAttentionImpl whose attention runs through `dispatch.attention`.

        Inherits the KV-cache writer (``do_kv_cache_update``) and its cache layout; replaces
        ``forward``. Configs are built here and on the first call with a new (query dtype, output
        dtype, block size), never per call.
        """

        def __init__(
            self,
            num_heads: int,
            head_size: int,
            scale: float,
            num_kv_heads: int,
            alibi_slopes: Optional[list[float]],
            sliding_window: Optional[int],
            kv_cache_dtype: str,
            logits_soft_cap: Optional[float] = None,
            attn_type: str = AttentionType.DECODER,
            kv_sharing_target_layer_name: Optional[str] = None,
            sinks: Optional[torch.Tensor] = None,
            use_alibi_sqrt: bool = False,
            chunk_lookback: int = -1,
        ) -> None:
            problems = []
            if attn_type != AttentionType.DECODER:
                problems.append(f"attn_type={attn_type!r}: the dispatch backend serves decoder attention only")
            if use_alibi_sqrt:
                problems.append("use_alibi_sqrt=True: dispatch's ALiBi adds slope * (j - pos), not its square root")
            if chunk_lookback > -1:
                problems.append(f"chunk_lookback={chunk_lookback}: dispatch has no chunked attention")
            if problems:
                raise UnsupportedConfigError("vLLM layer cannot run on dispatch: " + "; ".join(problems))
            super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                             kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
                             use_alibi_sqrt, chunk_lookback)
            from vllm.config import get_current_vllm_config_or_none

            self._device = _model_device()
            # The model's activation dtype: vLLM's Attention layer reads the same default dtype
            # (torch.get_default_dtype() during model construction) for its output buffer.
            self._model_dtype = torch.get_default_dtype()
            self._fp8_dtype = fp8_storage_dtype()
            self._layer_settings = dict(
                head_size=head_size, dtype=self._model_dtype, kv_cache_dtype=kv_cache_dtype, num_heads=num_heads,
                num_kv_heads=num_kv_heads, scale=float(scale), sliding_window=sliding_window,
                logits_soft_cap=logits_soft_cap, use_alibi=alibi_slopes is not None, has_sink=sinks is not None,
                fp8_dtype=self._fp8_dtype,
            )
            # vLLM quantizes the query (per tensor, with layer._q_scale) for fp8 per-tensor caches when
            # the impl asks for it: the FP8-query path, as vLLM's own Triton backend does on CUDA.
            self.supports_quant_query_input = kv_cache_dtype in _QUANTIZED_QUERY_KV_CACHE_DTYPES
            self._calls: dict[tuple[torch.dtype, torch.dtype, int], _Call] = {}
            self._fp8_output = False
            vllm_config = get_current_vllm_config_or_none()
            configured_block = vllm_config.cache_config.block_size if vllm_config is not None else None
            self._expected_block_size = configured_block or _DEFAULT_BLOCK_SIZE
            self._prepare(self._expected_block_size)
            # Per-head vectors dispatch wants as fp32 on q's device, made on first use per device.
            self._head_vectors: tuple[Optional[torch.device], Optional[torch.Tensor], Optional[torch.Tensor]] = (
                None, None, None)

        # -- configs ------------------------------------------------------------------------------

        def _prepare(self, block_size: int, fp8_output: bool = False) -> None:
            """Build and select every call variant vLLM may hand this layer with `block_size` pages
            (with an fp8 output when `fp8_output`). Raises UnsupportedConfigError (dispatch's
            reasons) when one cannot be served; then nothing is added."""
            queries = [False, True] if self.supports_quant_query_input else [False]
            calls = {}
            for quantized_query in queries:
                try:
                    config = config_from_vllm(block_size=block_size, quantized_query=quantized_query,
                                              fp8_output=fp8_output, **self._layer_settings)
                except ValueError as exc:  # dispatch's config rules: one error type for every start-up refusal
                    raise UnsupportedConfigError(
                        f"vLLM layer cannot run on dispatch: {_config_error_text(exc)}") from exc
                plans = _plans(config, self._device)
                contiguity = _contiguity_reasons(plans)
                if contiguity:
                    raise UnsupportedConfigError("; ".join(contiguity))
                calls[(config.q_torch_dtype, config.out_torch_dtype, block_size)] = _Call(
                    config=config,
                    cuda_graph_safe=all(p.capability.cuda_graph_safe for p in plans),
                    passes_q_scale=config.q_is_fp8,
                    passes_kv_scales=config.kv_quant_mode is KVQuantMode.FP8_PER_TENSOR,
                )
            self._calls.update(calls)

        @property
        def cuda_graph_safe(self) -> bool:
            """Whether every backend this layer's calls can run declares itself capturable."""
            return all(call.cuda_graph_safe for call in self._calls.values())

        def fused_output_quant_supported(self, quant_key) -> bool:
            """Static per-tensor fp8 output (stored = attention / output_scale) when dispatch can
            serve it for every query this layer gets; asked by vLLM's fusion pass at compile time."""
            if quant_key != kFp8StaticTensorSym:
                return False
            try:
                for block_size in sorted({key[2] for key in self._calls}):
                    self._prepare(block_size, fp8_output=True)
            except UnsupportedConfigError:
                return False
            self._fp8_output = True
            return True

        def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
            super().process_weights_after_loading(act_dtype)
            # The sinks' values arrive with the weights; a converted copy made earlier would be stale.
            self._head_vectors = (None, None, None)

        def _vectors(self, device: torch.device):
            """alibi_slopes and sinks as fp32 [num_heads] on `device`, converted once per device."""
            cached_device, slopes, sinks = self._head_vectors
            if cached_device != device:
                slopes = self.alibi_slopes.to(device, torch.float32) if self.alibi_slopes is not None else None
                sinks = self.sinks.detach().to(device, torch.float32) if self.sinks is not None else None
                self._head_vectors = (device, slopes, sinks)
            return slopes, sinks

        # -- the call -----------------------------------------------------------------------------

        def forward(
            self,
            layer: torch.nn.Module,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            kv_cache: torch.Tensor,
            attn_metadata,
            output: torch.Tensor,
            output_scale: Optional[torch.Tensor] = None,
            output_block_scale: Optional[torch.Tensor] = None,
        ) -> torch.Tensor:
            """Attention of the batch's query tokens over the paged cache (new keys already written).

            query: [num_tokens, num_heads, head_size], the model dtype or fp8 (quantized by vLLM
                with layer._q_scale); key, value: unused here (do_kv_cache_update wrote them);
            kv_cache: [num_blocks, num_kv_heads, block_size, 2 * content] (see `split_kv_cache`);
            attn_metadata: TritonAttentionMetadata (None in vLLM's profiling run);
            output: [num_tokens, num_heads, head_size], written in place, rows past
                attn_metadata.num_actual_tokens untouched; output_scale: fp32, one element, with an
                fp8 output (fused quantization). Returns output.
            """
            if output_block_scale is not None:
                raise NotImplementedError("output_block_scale: block-scaled output quantization is not "
                                          "supported by the dispatch backend (fused_output_quant_supported "
                                          "accepts only static per-tensor fp8)")
            if attn_metadata is None:  # vLLM's profiling run
                return output.fill_(0)
            if (attn_metadata.causal is not True or attn_metadata.mm_prefix_range_tensor is not None
                    or attn_metadata.rswa_prefix_lens is not None):
                # validate_configuration refused the settings that produce these; reaching here is a bug.
                raise UnsupportedConfigError(
                    "attn_metadata: dispatch runs causal attention only; got causal="
                    f"{type(attn_metadata.causal).__name__}, mm_prefix_range_tensor="
                    f"{attn_metadata.mm_prefix_range_tensor is not None}, "
                    f"rswa_prefix_lens={attn_metadata.rswa_prefix_lens is not None}")
            call_key = (query.dtype, output.dtype, kv_cache.shape[2])
            call = self._calls.get(call_key)
            if call is None:
                # A block size other than the configured one (vLLM may split pages into kernel blocks):
                # prepared once, on this first call, host-side only.
                self._prepare(kv_cache.shape[2])
                if self._fp8_output:
                    self._prepare(kv_cache.shape[2], fp8_output=True)
                call = self._calls.get(call_key)
                if call is None:
                    raise UnsupportedConfigError(
                        f"query/output: dtypes {query.dtype}/{output.dtype} not among those prepared for this "
                        f"layer ({sorted({(str(q), str(o)) for q, o, _ in self._calls})})")
            config = call.config
            key_cache, value_cache, k_scale_cache, v_scale_cache = split_kv_cache(kv_cache, config)
            alibi_slopes, sinks = self._vectors(query.device)
            num_tokens = attn_metadata.num_actual_tokens
            dispatch.attention(
                query[:num_tokens], key_cache, value_cache,
                attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table,
                config=config,
                q_scale=layer._q_scale if call.passes_q_scale else None,
                k_scale=layer._k_scale if call.passes_kv_scales else None,
                v_scale=layer._v_scale if call.passes_kv_scales else None,
                k_scale_cache=k_scale_cache, v_scale_cache=v_scale_cache,
                alibi_slopes=alibi_slopes, sinks=sinks,
                output_scale=output_scale,
                out=output[:num_tokens],
                max_query_len=attn_metadata.max_query_len,
            )
            return output

    class DispatchAttentionMetadataBuilder(TritonAttentionMetadataBuilder):
        """vLLM's Triton metadata, with the CUDA-graph support the chosen dispatch backends declare."""

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
            impls = [getattr(layer, "impl", None)
                     for layer in vllm_config.compilation_config.static_forward_context.values()]
            impls = [impl for impl in impls if isinstance(impl, DispatchAttentionImpl)]
            if impls and all(impl.cuda_graph_safe for impl in impls):
                return AttentionCGSupport.ALWAYS
            return AttentionCGSupport.NEVER

    class DispatchAttentionBackend(TritonAttentionBackend):
        """``--attention-backend CUSTOM``: vLLM's Triton backend with dispatch doing the attention."""

        supported_dtypes = [torch.float16, torch.bfloat16]
        supported_kv_cache_dtypes = list(KV_CACHE_DTYPES)

        @staticmethod
        def get_name() -> str:
            return "CUSTOM"  # vLLM looks the layer's backend up as AttentionBackendEnum[get_name()]

        @staticmethod
        def get_impl_cls():
            return DispatchAttentionImpl

        @staticmethod
        def get_builder_cls():
            return DispatchAttentionMetadataBuilder

        @classmethod
        def supports_head_size(cls, head_size: int) -> bool:
            return True  # dispatch's capabilities decide, with their own reasons (validate_configuration)

        @classmethod
        def supports_attn_type(cls, attn_type: str) -> bool:
            return attn_type == AttentionType.DECODER

        # What one dispatch config per layer cannot express: per-sequence causal flags (non-causal
        # decoders), multimodal bidirectional prefixes, R-SWA, sqrt ALiBi; and no batch invariance
        # (dispatch's tiles and split-KV depend on the batch's shape).
        @classmethod
        def supports_non_causal(cls) -> bool:
            return False

        @classmethod
        def supports_mm_prefix(cls) -> bool:
            return False

        @classmethod
        def supports_rswa(cls) -> bool:
            return False

        @classmethod
        def supports_alibi_sqrt(cls) -> bool:
            return False

        @classmethod
        def supports_batch_invariance(cls) -> bool:
            return False

        @classmethod
        def validate_configuration(
            cls,
            head_size: int,
            dtype: torch.dtype,
            kv_cache_dtype: Optional[str],
            block_size: Optional[int],
            use_mla: bool,
            has_sink: bool,
            use_sparse: bool,
            use_mm_prefix: bool,
            use_per_head_quant_scales: bool,
            device_capability,
            attn_type: str,
            has_sliding_window: bool = False,
            **kwargs: Any,
        ) -> list[str]:
            """vLLM's own checks (with the class attributes above), then dispatch's verdict on every
            config this layer may run (16-bit or fp8 query), on this process's device."""
            reasons = super().validate_configuration(
                head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse, use_mm_prefix,
                use_per_head_quant_scales, device_capability, attn_type, has_sliding_window=has_sliding_window,
                **kwargs)
            if use_mla or use_sparse:
                return reasons  # nothing for dispatch to judge: vLLM's reasons say why
            kv_cache_dtype = kv_cache_dtype or "auto"
            queries = [False, True] if kv_cache_dtype in _QUANTIZED_QUERY_KV_CACHE_DTYPES else [False]
            for quantized_query in queries:
                try:
                    config = config_from_vllm(
                        head_size=head_size, dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=block_size,
                        sliding_window=_PLACEHOLDER_WINDOW if has_sliding_window else None, has_sink=has_sink,
                        quantized_query=quantized_query,
                        fp8_dtype=fp8_storage_dtype(),
                    )
                except ValueError as exc:  # dispatch's config rules (or a cache dtype it cannot read)
                    reasons.append(f"dispatch: {_config_error_text(exc)}")
                    break
                for reason in dispatch_reasons(config, _model_device()):
                    if reason not in reasons:
                        reasons.append(reason)
            return reasons

    classes = {cls.__name__: cls for cls in (DispatchAttentionImpl, DispatchAttentionMetadataBuilder,
                                             DispatchAttentionBackend)}
    for cls in classes.values():
        # Importable, picklable and printable under this module's name (vLLM resolves class paths).
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return classes


def __getattr__(name: str):
    """DispatchAttentionBackend, DispatchAttentionImpl, DispatchAttentionMetadataBuilder: defined on
    first access, which imports vLLM (PEP 562)."""
    if name in ("DispatchAttentionBackend", "DispatchAttentionImpl", "DispatchAttentionMetadataBuilder"):
        return _vllm_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
