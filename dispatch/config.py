"""What one attention call is: dtypes, KV-cache quantization, features.

`AttentionConfig` is a frozen, hashable pydantic model, so it can key the
selection cache. Dtype fields accept `torch.dtype` objects or names (with the
usual aliases: "bf16", "fp16", "fp8"/"e4m3", "e5m2") and always hold the
canonical name, so a config serializes to plain JSON / TOML.

The cross-field rules below hold for every backend: a config that breaks one
describes no well-defined computation, so it is refused at construction
(pydantic ``ValidationError``, a ``ValueError``) with every broken rule named.
Whether a particular backend can run a valid config is a separate question,
answered by `dispatch.capabilities`.
"""

from __future__ import annotations

import enum
import math
import numbers
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

__all__ = [
    "AttentionConfig",
    "ConfigRuleError",
    "KVQuantMode",
    "DTYPE_NAMES",
    "Q_DTYPES",
    "KV_CACHE_DTYPES",
    "OUT_DTYPES",
    "FP8_DTYPES",
    "SIXTEEN_BIT_DTYPES",
    "canonical_dtype_name",
    "torch_dtype",
]


class KVQuantMode(str, enum.Enum):
    """How the KV cache is quantized and where its dequantization scales live.

    NONE                 cache holds the query's 16-bit dtype, no scales.
    FP8_PER_TENSOR       fp8 cache; one fp32 ``k_scale`` and one ``v_scale``.
    FP8_PER_TOKEN_HEAD   fp8 cache; fp32 ``k_scale_cache`` / ``v_scale_cache``
                         of shape [num_blocks, block_size, num_kv_heads].
    INT8_PER_TOKEN_HEAD  int8 cache; scales as for FP8_PER_TOKEN_HEAD.
    """

    NONE = "NONE"
    FP8_PER_TENSOR = "FP8_PER_TENSOR"
    FP8_PER_TOKEN_HEAD = "FP8_PER_TOKEN_HEAD"
    INT8_PER_TOKEN_HEAD = "INT8_PER_TOKEN_HEAD"

    @classmethod
    def _missing_(cls, value: object) -> "KVQuantMode | None":
        # Accept member names in any case ("fp8_per_tensor"), as users write them in files.
        if isinstance(value, str):
            return cls.__members__.get(value.strip().upper())
        return None

    @property
    def is_per_token_head(self) -> bool:
        return self in (KVQuantMode.FP8_PER_TOKEN_HEAD, KVQuantMode.INT8_PER_TOKEN_HEAD)

    def __str__(self) -> str:
        return self.value


# Canonical names are torch's attribute names, so torch_dtype() is a getattr.
DTYPE_NAMES: tuple[str, ...] = (
    "float16",
    "bfloat16",
    "float32",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
)
SIXTEEN_BIT_DTYPES = frozenset({"float16", "bfloat16"})
FP8_DTYPES = frozenset({"float8_e4m3fn", "float8_e5m2"})
Q_DTYPES = frozenset({"float16", "bfloat16", "float8_e4m3fn"})
KV_CACHE_DTYPES = frozenset({"float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8"})
OUT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float8_e4m3fn"})

_DTYPE_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "fp8": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "e5m2": "float8_e5m2",
    "fp8_e5m2": "float8_e5m2",
    "i8": "int8",
}


def canonical_dtype_name(value: Any) -> str:
    """'bf16', torch.bfloat16 or 'torch.bfloat16' -> 'bfloat16'. Raises ValueError otherwise."""
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
    else:
        raise ValueError(f"expected a dtype name or torch.dtype, got {type(value).__name__} {value!r}")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {value!r}; known: {sorted(DTYPE_NAMES)} and aliases {sorted(_DTYPE_ALIASES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, canonical_dtype_name(name))


class ConfigRuleError(ValueError):
    """The cross-field rules a config breaks, one message each in ``problems`` (pydantic keeps this
    error as the cause of its ValidationError, so file loaders can report each rule on its own line)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# Fields that must hold exactly what they say. pydantic's lax mode would take True as 1 (a bool is
# an int in Python, so `sliding_window: true` in YAML meant a window of one token), 16.0 or "16" as
# 16, and "yes" or 1 as True: each a value the user did not write, so each is refused instead.
_INT_FIELDS = ("num_heads", "num_kv_heads", "head_size", "block_size", "sliding_window")
_FLOAT_FIELDS = ("logits_soft_cap", "softmax_scale")
_BOOL_FIELDS = ("causal", "use_alibi", "use_sinks")
_OPTIONAL_FIELDS = frozenset({"sliding_window", "logits_soft_cap", "softmax_scale"})
_EXPECTED = {"sliding_window": "an integer number of tokens or None (off)"}


def _check_int(field: str, value: Any) -> Optional[int]:
    if value is None and field in _OPTIONAL_FIELDS:
        return None
    # numbers.Integral admits numpy integers; bool is an Integral too and is refused by name.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"expected {_EXPECTED.get(field, 'an integer')}, got {_describe(value)}")
    return int(value)


def _check_float(field: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"expected a number or None (off), got {_describe(value)}")
    return float(value)


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _check_allowed(field: str, name: str, allowed: frozenset[str]) -> str:
    if name not in allowed:
        raise ValueError(f"{field}={name} not in {sorted(allowed)}")
    return name


class AttentionConfig(BaseModel):
    """One paged, variable-length attention call, described fully.

    Semantics (shared by every backend; see docs/DESIGN.md): query token i of a
    sequence with q_len queries and kv_len keys sits at position
    kv_len - q_len + i (causal mask aligned bottom-right). For q_len=2,
    kv_len=5 the visible keys are::

        key   0 1 2 3 4
        q0    1 1 1 1 0
        q1    1 1 1 1 1

    ``sliding_window`` W makes key j visible only when pos - j < W;
    ``logits_soft_cap`` c maps a score s to c * tanh(s / c); ALiBi adds
    slope_h * (j - pos); a sink adds exp(sink_h - m) to the softmax denominator.
    ``None`` means "off" for every optional feature.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    num_heads: int
    num_kv_heads: int
    head_size: int
    q_dtype: str = "bfloat16"
    kv_cache_dtype: str = "bfloat16"
    kv_quant_mode: KVQuantMode = KVQuantMode.NONE
    out_dtype: Optional[str] = None  # None: q_dtype, or bfloat16 when q is fp8
    block_size: int = 16  # tokens per KV-cache page
    causal: bool = True
    sliding_window: Optional[int] = None  # None: unlimited
    logits_soft_cap: Optional[float] = None  # None: no soft cap
    softmax_scale: Optional[float] = None  # None: 1 / sqrt(head_size)
    use_alibi: bool = False
    use_sinks: bool = False
    backend: str = "auto"

    # ---- per-field normalization -------------------------------------------------

    @field_validator(*_INT_FIELDS, mode="before")
    @classmethod
    def _int_fields(cls, value: Any, info: ValidationInfo) -> Optional[int]:
        return _check_int(info.field_name, value)

    @field_validator(*_FLOAT_FIELDS, mode="before")
    @classmethod
    def _float_fields(cls, value: Any, info: ValidationInfo) -> Optional[float]:
        return _check_float(info.field_name, value)

    @field_validator(*_BOOL_FIELDS, mode="before")
    @classmethod
    def _bool_fields(cls, value: Any) -> bool:
        return _check_bool(value)

    @field_validator("q_dtype", mode="before")
    @classmethod
    def _q_dtype(cls, value: Any) -> str:
        return _check_allowed("q_dtype", canonical_dtype_name(value), Q_DTYPES)

    @field_validator("kv_cache_dtype", mode="before")
    @classmethod
    def _kv_cache_dtype(cls, value: Any) -> str:
        return _check_allowed("kv_cache_dtype", canonical_dtype_name(value), KV_CACHE_DTYPES)

    @field_validator("out_dtype", mode="before")
    @classmethod
    def _out_dtype(cls, value: Any) -> Optional[str]:
        if value is None:
            return None
        return _check_allowed("out_dtype", canonical_dtype_name(value), OUT_DTYPES)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"backend must be a non-empty backend name or 'auto', got {value!r}")
        return value.strip().lower()

    # ---- rules across fields -----------------------------------------------------

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "AttentionConfig":
        problems = config_rule_violations(self)
        if problems:
            raise ConfigRuleError(problems)
        if self.out_dtype is None:
            # Resolve the default once so every consumer sees the real output dtype.
            default = "bfloat16" if self.q_dtype in FP8_DTYPES else self.q_dtype
            object.__setattr__(self, "out_dtype", default)
        return self

    # ---- derived values ----------------------------------------------------------

    @property
    def scale(self) -> float:
        """The softmax scale actually used (``softmax_scale`` or 1/sqrt(head_size))."""
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.head_size)

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_is_fp8(self) -> bool:
        return self.q_dtype in FP8_DTYPES

    @property
    def out_is_fp8(self) -> bool:
        return self.out_dtype in FP8_DTYPES

    @property
    def q_torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.q_dtype)

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.kv_cache_dtype)

    @property
    def out_torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.out_dtype)

    def summary(self) -> str:
        """One line naming what matters for backend choice, for logs and errors."""
        feats = [("causal" if self.causal else "non-causal")]
        if self.sliding_window is not None:
            feats.append(f"sliding_window={self.sliding_window}")
        if self.logits_soft_cap is not None:
            feats.append(f"logits_soft_cap={self.logits_soft_cap}")
        if self.use_alibi:
            feats.append("alibi")
        if self.use_sinks:
            feats.append("sinks")
        return (
            f"heads={self.num_heads}/{self.num_kv_heads} head_size={self.head_size} "
            f"q={self.q_dtype} kv_cache={self.kv_cache_dtype} kv_quant_mode={self.kv_quant_mode.value} "
            f"out={self.out_dtype} block_size={self.block_size} {' '.join(feats)}"
        )


def config_rule_violations(cfg: AttentionConfig) -> list[str]:
    """Every cross-field rule the config breaks, each naming the fields and values."""
    problems: list[str] = []
    mode = cfg.kv_quant_mode
    for field in ("num_heads", "num_kv_heads", "head_size", "block_size"):
        value = getattr(cfg, field)
        if value <= 0:
            problems.append(f"{field} must be positive, got {value}")
    if cfg.num_heads > 0 and cfg.num_kv_heads > 0 and cfg.num_heads % cfg.num_kv_heads:
        problems.append(
            f"num_heads={cfg.num_heads} must be a multiple of num_kv_heads={cfg.num_kv_heads} "
            "(each KV head serves a whole group of query heads)"
        )
    if cfg.sliding_window is not None and cfg.sliding_window <= 0:
        problems.append(f"sliding_window must be positive or None (off), got {cfg.sliding_window}")
    if cfg.logits_soft_cap is not None and not (cfg.logits_soft_cap > 0 and math.isfinite(cfg.logits_soft_cap)):
        problems.append(f"logits_soft_cap must be positive and finite or None (off), got {cfg.logits_soft_cap}")
    if cfg.softmax_scale is not None and not (cfg.softmax_scale > 0 and math.isfinite(cfg.softmax_scale)):
        problems.append(f"softmax_scale must be positive and finite or None (1/sqrt(head_size)), got {cfg.softmax_scale}")

    if cfg.q_dtype in FP8_DTYPES:
        if mode is not KVQuantMode.FP8_PER_TENSOR:
            problems.append(
                f"q_dtype={cfg.q_dtype} requires kv_quant_mode=FP8_PER_TENSOR (got {mode.value}): an FP8 query "
                "is only defined against a per-tensor FP8 KV cache, whose scales fold into the softmax scale"
            )
        if cfg.kv_cache_dtype != cfg.q_dtype:
            problems.append(
                f"q_dtype={cfg.q_dtype} requires kv_cache_dtype={cfg.q_dtype} (got {cfg.kv_cache_dtype}): "
                "both QK and PV dots run in one FP8 format"
            )
    if mode is KVQuantMode.NONE:
        if cfg.q_dtype in SIXTEEN_BIT_DTYPES and cfg.kv_cache_dtype != cfg.q_dtype:
            problems.append(
                f"kv_quant_mode=NONE requires kv_cache_dtype equal to q_dtype={cfg.q_dtype} "
                f"(got kv_cache_dtype={cfg.kv_cache_dtype}); a quantized cache needs a KVQuantMode with scales"
            )
    elif mode in (KVQuantMode.FP8_PER_TENSOR, KVQuantMode.FP8_PER_TOKEN_HEAD):
        if cfg.kv_cache_dtype not in FP8_DTYPES:
            problems.append(
                f"kv_quant_mode={mode.value} requires kv_cache_dtype in {sorted(FP8_DTYPES)} "
                f"(got {cfg.kv_cache_dtype})"
            )
    elif mode is KVQuantMode.INT8_PER_TOKEN_HEAD:
        if cfg.kv_cache_dtype != "int8":
            problems.append(f"kv_quant_mode=INT8_PER_TOKEN_HEAD requires kv_cache_dtype=int8 (got {cfg.kv_cache_dtype})")
    return problems
