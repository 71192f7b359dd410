"""The call contract as data: every argument of `dispatch.attention`, in one table.

`ARGUMENTS` has one row per argument that a backend's ``forward`` receives: its
shape as a template over the config's sizes and the call's own sizes, its
dtype rule, when it is required (and, where it is not, that it must be None),
and what its strides may be. Everything that checks, documents or declares
the call reads this table:

- `check()`: the full check behind `attention()`, raising `InputError` that names
  the argument, what was expected and what came;
- `compile_fast_check()`: the per-config predicate on attention()'s hot path,
  generated from the same rows (a fast "yes", or None and then `check()` speaks);
- `argument_docs()`: the Args section of attention()'s docstring;
- `custom_op_schema()`: the schema of the ``dispatch::attention`` custom op
  (dispatch/ops.py), whose fake implementation also reads `ARGUMENTS`;
- tests/test_contract.py: every registered backend's ``forward`` takes exactly
  these keywords, and a backend that ignores a declared scale fails a test.

Adding a scale is one row here (plus a parameter in each ``forward`` signature,
which that test then demands). Call sizes (`CALL_DIMS`) are bound by the first
argument that carries them (`BINDERS`) and must agree everywhere else.

Strides: engines hand attention views into larger buffers (vLLM splits one
packed cache per layer with ``kv_cache.transpose(1, 2).split(head_size, -1)``;
its per-token-head scale caches are ``as_strided`` views; q and out are slices
of step buffers). So only the last dimension of a multi-element tensor must be
contiguous (`Layout.LAST_DIM_CONTIGUOUS`), scale caches and per-head vectors
may have any strides (`Layout.ANY`), and every backend reads the strides it is
given. A backend that needs more says so in its Capability
(``contiguous_arguments``), never by a hidden copy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from dispatch.config import AttentionConfig, KVQuantMode
from dispatch.errors import InputError

__all__ = ["Presence", "Layout", "Argument", "ARGUMENTS", "POSITIONAL", "KEYWORDS", "CALL_DIMS", "BINDERS",
           "by_name", "expected_dtype", "required", "check", "compile_fast_check", "argument_docs",
           "custom_op_schema", "markdown_table", "describe"]


class Presence(str, enum.Enum):
    ALWAYS = "always"  # every call passes it
    WHEN = "when"  # required when the row's rule holds for the config, and None otherwise
    OPTIONAL = "optional"  # may be passed or left None


class Layout(str, enum.Enum):
    LAST_DIM_CONTIGUOUS = "last dimension contiguous (stride 1), other strides free"
    ANY = "any strides"


# Sizes that come from the config, and sizes that each call decides.
CONFIG_DIMS = ("num_heads", "num_kv_heads", "head_size", "block_size")
CALL_DIMS = ("num_tokens", "num_blocks", "num_seqs", "max_blocks_per_seq")
# Which argument's dimension binds each call size (checked first, so the others compare against it).
BINDERS: dict[str, tuple[str, int]] = {
    "num_tokens": ("q", 0),
    "num_blocks": ("key_cache", 0),
    "num_seqs": ("seq_lens", 0),
    "max_blocks_per_seq": ("block_table", 1),
}


@dataclass(frozen=True)
class Argument:
    """One argument of the call.

    shape: one template per dimension: a config size ("num_heads"), a call size ("num_tokens"),
        or a call size plus a constant ("num_seqs + 1"); () for a one-element scale (any shape
        with one element).
    dtype: a config field naming a dtype ("q_dtype", "kv_cache_dtype", "out_dtype") or a dtype name.
    rule: for Presence.WHEN, whether the config needs the argument; `rule_text` names the
        config field behind it as "field=value" (used in both "required for ..." and "must be
        None for ..."); `absent_note` explains a must-be-None.
    min_size: (dimension, smallest size, what it means) beyond the template (a block table needs a column).
    no_overlap: arguments whose memory this one must not share (out).
    per_step: an engine passes the same tensor object to every layer of one step (the batch metadata:
        vLLM's and FlashInfer's per-step metadata are built once and read by all layers), so the fast
        check remembers the per-step tensors it last accepted and, when a call passes those very
        objects again, skips their checks (compile_fast_check).
    """

    name: str
    shape: tuple[str, ...]
    dtype: str
    presence: Presence
    layout: Layout
    doc: str
    positional: bool = False
    rule: Optional[Callable[[AttentionConfig], bool]] = field(default=None, compare=False)
    rule_text: Optional[Callable[[AttentionConfig], str]] = field(default=None, compare=False)
    absent_note: str = ""
    when: str = ""  # Presence.WHEN: the rule in words, for docs ("required for FP8_PER_TENSOR, else None")
    min_size: tuple[tuple[int, int, str], ...] = ()
    no_overlap: tuple[str, ...] = ()
    torch_type: str = "Tensor"  # for the custom op schema
    per_step: bool = False  # the same tensor object for every layer of an engine step (batch metadata)

    @property
    def is_scalar(self) -> bool:
        return self.shape == ()

    def shape_text(self) -> str:
        return "one element" if self.is_scalar else "[" + ", ".join(self.shape) + "]"


def _per_tensor_fp8(c: AttentionConfig) -> bool:
    return c.kv_quant_mode is KVQuantMode.FP8_PER_TENSOR


def _mode_text(c: AttentionConfig) -> str:
    return f"kv_quant_mode={c.kv_quant_mode.value}"


_CACHE_SHAPE = ("num_blocks", "block_size", "num_kv_heads", "head_size")
_SCALE_CACHE_SHAPE = ("num_blocks", "block_size", "num_kv_heads")

ARGUMENTS: tuple[Argument, ...] = (
    Argument("q", ("num_tokens", "num_heads", "head_size"), "q_dtype", Presence.ALWAYS, Layout.LAST_DIM_CONTIGUOUS,
             "the query tokens of all sequences, concatenated", positional=True),
    Argument("key_cache", _CACHE_SHAPE, "kv_cache_dtype", Presence.ALWAYS, Layout.LAST_DIM_CONTIGUOUS,
             "pages of block_size tokens: key j of sequence s lives in page block_table[s, j // block_size], "
             "slot j % block_size", positional=True, min_size=((0, 1, "one page (num_blocks >= 1)"),)),
    Argument("value_cache", _CACHE_SHAPE, "kv_cache_dtype", Presence.ALWAYS, Layout.LAST_DIM_CONTIGUOUS,
             "the values, laid out as key_cache", positional=True),
    Argument("cu_seqlens_q", ("num_seqs + 1",), "int32", Presence.ALWAYS, Layout.LAST_DIM_CONTIGUOUS,
             "query start offsets: sequence s owns query rows cu_seqlens_q[s] : cu_seqlens_q[s + 1]",
             positional=True, per_step=True),
    Argument("seq_lens", ("num_seqs",), "int32", Presence.ALWAYS, Layout.LAST_DIM_CONTIGUOUS,
             "KV length of each sequence (context + new tokens), at least its query length", positional=True,
             per_step=True),
    Argument("block_table", ("num_seqs", "max_blocks_per_seq"), "int32", Presence.ALWAYS,
             Layout.LAST_DIM_CONTIGUOUS, "page ids of each sequence, in order", positional=True,
             min_size=((1, 1, "one page per sequence"),), per_step=True),
    Argument("q_scale", (), "float32", Presence.WHEN, Layout.ANY,
             "dequantization scale of an fp8 query (real q = stored * q_scale)",
             rule=lambda c: c.q_is_fp8, rule_text=lambda c: f"q_dtype={c.q_dtype}",
             absent_note=" (only an fp8 query has a scale)", torch_type="Tensor?",
             when="required when q_dtype is fp8, else None"),
    Argument("k_scale", (), "float32", Presence.WHEN, Layout.ANY,
             "per-tensor dequantization scale of key_cache", rule=_per_tensor_fp8, rule_text=_mode_text,
             torch_type="Tensor?", when="required for FP8_PER_TENSOR, else None"),
    Argument("v_scale", (), "float32", Presence.WHEN, Layout.ANY,
             "per-tensor dequantization scale of value_cache", rule=_per_tensor_fp8, rule_text=_mode_text,
             torch_type="Tensor?", when="required for FP8_PER_TENSOR, else None"),
    Argument("k_scale_cache", _SCALE_CACHE_SHAPE, "float32", Presence.WHEN, Layout.ANY,
             "per-token-head dequantization scales of key_cache (each token's row of each KV head)",
             rule=lambda c: c.kv_quant_mode.is_per_token_head, rule_text=_mode_text, torch_type="Tensor?",
             when="required for FP8_PER_TOKEN_HEAD and INT8_PER_TOKEN_HEAD, else None"),
    Argument("v_scale_cache", _SCALE_CACHE_SHAPE, "float32", Presence.WHEN, Layout.ANY,
             "per-token-head dequantization scales of value_cache",
             rule=lambda c: c.kv_quant_mode.is_per_token_head, rule_text=_mode_text, torch_type="Tensor?",
             when="required for FP8_PER_TOKEN_HEAD and INT8_PER_TOKEN_HEAD, else None"),
    Argument("alibi_slopes", ("num_heads",), "float32", Presence.WHEN, Layout.ANY,
             "ALiBi slope of each query head (adds slope_h * (j - pos) to the score)",
             rule=lambda c: c.use_alibi, rule_text=lambda c: f"use_alibi={c.use_alibi}", torch_type="Tensor?",
             when="required when use_alibi, else None"),
    Argument("sinks", ("num_heads",), "float32", Presence.WHEN, Layout.ANY,
             "sink logit of each query head (adds exp(sink_h - m) to the softmax denominator)",
             rule=lambda c: c.use_sinks, rule_text=lambda c: f"use_sinks={c.use_sinks}", torch_type="Tensor?",
             when="required when use_sinks, else None"),
    Argument("output_scale", (), "float32", Presence.WHEN, Layout.ANY,
             "scale of an fp8 output (stored = attention / output_scale, saturated to the format's range)",
             rule=lambda c: c.out_is_fp8, rule_text=lambda c: f"out_dtype={c.out_dtype}",
             absent_note=" (only fp8 output is scaled)", torch_type="Tensor?",
             when="required when out_dtype is fp8, else None"),
    Argument("out", ("num_tokens", "num_heads", "head_size"), "out_dtype", Presence.OPTIONAL,
             Layout.LAST_DIM_CONTIGUOUS, "preallocated output, written in place and returned",
             no_overlap=("q", "key_cache", "value_cache"), torch_type="Tensor?"),
)

POSITIONAL: tuple[str, ...] = tuple(a.name for a in ARGUMENTS if a.positional)
KEYWORDS: tuple[str, ...] = tuple(a.name for a in ARGUMENTS if not a.positional)
_BY_NAME: dict[str, Argument] = {a.name: a for a in ARGUMENTS}
# Binders first (in BINDERS' order), then the rest in table order: each size is bound before it is compared.
_CHECK_ORDER: tuple[Argument, ...] = tuple(
    [_BY_NAME[name] for name, _ in BINDERS.values()]
    + [a for a in ARGUMENTS if a.name not in {name for name, _ in BINDERS.values()}]
)


# Call sizes that per-step arguments bind; no other argument may use them (their checks are skipped when the
# per-step tensors repeat: compile_fast_check).
_STEP_SYMBOLS = frozenset(symbol for symbol, (binder, _) in BINDERS.items() if _BY_NAME[binder].per_step)


def by_name(name: str) -> Argument:
    return _BY_NAME[name]


def expected_dtype(argument: Argument, config: AttentionConfig) -> torch.dtype:
    if argument.dtype.endswith("_dtype"):
        return getattr(config, argument.dtype.replace("_dtype", "_torch_dtype"))
    return getattr(torch, argument.dtype)


def required(argument: Argument, config: AttentionConfig) -> Optional[bool]:
    """True: must be passed; False: must be None; None: optional."""
    if argument.presence is Presence.ALWAYS:
        return True
    if argument.presence is Presence.OPTIONAL:
        return None
    return bool(argument.rule(config))


def _split_dim(template: str) -> tuple[str, int]:
    symbol, _, offset = template.partition("+")
    return symbol.strip(), int(offset) if offset else 0


def _config_size(config: AttentionConfig, symbol: str) -> int:
    return getattr(config, symbol)


def describe(value: Any) -> str:
    if value is None:
        return "None"
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return f"{value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] that `t` can touch, from its shape and strides."""
    start = t.data_ptr()
    if t.is_contiguous():  # the common case, without a Python loop over dimensions
        return start, start + t.nbytes
    if t.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def check(config: AttentionConfig, values: Mapping[str, Any]) -> None:
    """Raise InputError for the first argument (in `_CHECK_ORDER`) that breaks the contract for `config`.

    `values` maps every name of `ARGUMENTS` to what the caller passed (None when not passed).
    """
    q = values["q"]
    if not isinstance(q, torch.Tensor):
        raise InputError(f"q: expected a tensor [num_tokens, num_heads, head_size], got {describe(q)}")
    device = q.device
    sizes: dict[str, int] = {}
    for argument in _CHECK_ORDER:
        value = values[argument.name]
        need = required(argument, config)
        rule = argument.rule_text(config) if argument.rule_text else ""
        if value is None:
            if need:
                if argument.presence is Presence.WHEN:
                    raise InputError(f"{argument.name}: required for {rule}, got None")
                raise InputError(f"{argument.name}: expected a {expected_dtype(argument, config)} tensor "
                                 f"{argument.shape_text()}, got None")
            continue
        if need is False:
            raise InputError(f"{argument.name}: must be None for {rule}{argument.absent_note}, got {describe(value)}")
        _check_one(argument, value, config, device, sizes, f" for {rule}" if rule else "")
    out = values["out"]
    if out is not None:
        for name in by_name("out").no_overlap:
            if _overlap(out, values[name]):
                raise InputError(f"out: must not share memory with {name}")


def _check_one(argument: Argument, value: Any, config: AttentionConfig, device: torch.device,
               sizes: dict[str, int], why: str) -> None:
    name, dtype = argument.name, expected_dtype(argument, config)
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name}: expected a {dtype} tensor{why}, got {describe(value)}")
    if argument.is_scalar:
        if value.numel() != 1:
            raise InputError(f"{name}: expected one element (a per-tensor scale){why}, got shape {tuple(value.shape)}")
    else:
        expected = []
        for template in argument.shape:
            symbol, offset = _split_dim(template)
            if symbol in CONFIG_DIMS:
                expected.append(_config_size(config, symbol) + offset)
            else:
                expected.append(sizes[symbol] + offset if symbol in sizes else None)
        if value.dim() != len(expected) or any(e is not None and e != g for e, g in zip(expected, value.shape)):
            want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
            raise InputError(f"{name}: expected shape {want} ({argument.shape_text()}), got {tuple(value.shape)}")
        for template, size in zip(argument.shape, value.shape):
            symbol, offset = _split_dim(template)
            if symbol in CALL_DIMS and symbol not in sizes:
                sizes[symbol] = size - offset
        for dim, smallest, meaning in argument.min_size:
            if value.shape[dim] < smallest:
                raise InputError(f"{name}: expected at least {meaning}, got shape {tuple(value.shape)}")
    if value.dtype != dtype:
        raise InputError(f"{name}: expected dtype {dtype}{why}, got {value.dtype}")
    if value.device != device:
        raise InputError(f"{name}: expected a tensor on {device} (the device of q), got one on {value.device}")
    if argument.layout is Layout.LAST_DIM_CONTIGUOUS and value.dim() > 0 and value.stride(-1) != 1:
        raise InputError(f"{name}: expected a contiguous last dimension (stride 1), got strides {value.stride()}")


# ---- the hot path's predicate, generated per config from the rows above ---------------------------------------

def compile_fast_check(config: AttentionConfig, contiguous: frozenset[str] = frozenset()) -> Callable[..., Any]:
    """A function of all arguments (in `ARGUMENTS` order) that returns q's device when the call certainly
    meets the contract for `config`, else None (then `check()` finds and names the problem).

    Generated as Python source specialized to the config: every size the config fixes is a literal, an
    argument the config forbids is one `is not None` test, and a call size is bound once and compared
    after, so a call costs a few attribute reads per tensor (the dispatcher's whole per-call budget is
    microseconds; a loop over the rows would spend it on interpretation). `contiguous` names
    arguments that must be fully contiguous (a backend's ``contiguous_arguments``).

    The per-step arguments (`Argument.per_step`: cu_seqlens_q, seq_lens, block_table) are checked
    together, and the function remembers the last objects it accepted (with q's device): a call passing
    those same objects, as every layer after the first of an engine step does, skips their checks. The
    memory holds references to those tensors until a call with other ones. A tensor object's metadata
    could change in place (``resize_``, ``set_``) between two calls and go unseen; engines do not do
    that to their batch metadata, and debug mode (``validate=True``) still checks every value.
    """
    step_names = [a.name for a in _CHECK_ORDER if a.per_step]
    # The memory: the per-step tensors last accepted, then q's device (nothing accepted yet: all None).
    env: dict[str, Any] = {"_overlap": _overlap, "_memo": [(None,) * (len(step_names) + 1)]}
    bound: set[str] = set()
    per_call: list[str] = []
    per_step: list[str] = []
    for argument in _CHECK_ORDER:
        if required(argument, config) is not False:
            target = per_step if argument.per_step else per_call
            target.extend(_argument_lines(argument, config, contiguous, env, bound))
    lines = ["device = q.device"]
    forbidden = [a.name for a in _CHECK_ORDER if required(a, config) is False]
    if forbidden:
        lines.append(f"if {' or '.join(f'{name} is not None' for name in forbidden)}: return None")
    lines += per_call
    lines.append("_m = _memo[0]")
    lines.append("if " + " or ".join([f"_m[{i}] is not {name}" for i, name in enumerate(step_names)]
                                     + [f"_m[{len(step_names)}] != device"]) + ":")
    lines += ["    " + line for line in per_step]
    lines.append(f"    _memo[0] = ({', '.join(step_names)}, device)")
    lines.append("return device")
    params = ", ".join(a.name for a in ARGUMENTS)
    body = "\n".join("        " + line for line in lines)
    source = (f"def fast_check({params}):\n"
              f"    try:\n{body}\n"
              f"    except (AttributeError, TypeError, IndexError):  # not a tensor where one was expected\n"
              f"        return None\n")
    exec(compile(source, f"<dispatch.contract fast_check {config.summary()}>", "exec"), env)
    function = env["fast_check"]
    function.source = source  # for debugging and tests
    return function


def _argument_lines(argument: Argument, config: AttentionConfig, contiguous: frozenset[str], env: dict[str, Any],
                    bound: set[str]) -> list[str]:
    """The fast check's lines for one argument the config does not forbid (returning None on a mismatch)."""
    name = argument.name
    need = required(argument, config)
    lines: list[str] = []
    emit = lines.append
    if argument.per_step and argument.presence is not Presence.ALWAYS:
        raise ValueError(f"{name}: a per-step argument must be passed on every call (the memory is by identity)")
    indent = ""
    if need is None:
        emit(f"if {name} is not None:")
        indent = "    "
    elif argument.presence is Presence.WHEN:
        emit(f"if {name} is None: return None")
    dtype_var = f"_dtype_{name}"
    env[dtype_var] = expected_dtype(argument, config)
    conditions = [f"{name}.dtype is not {dtype_var}"] + ([] if name == "q" else [f"{name}.device != device"])
    if argument.is_scalar:
        conditions.append(f"{name}.numel() != 1")
        emit(f"{indent}if {' or '.join(conditions)}: return None")
        return lines
    shape_var = f"_s_{name}"
    emit(f"{indent}{shape_var} = {name}.shape")
    # One tuple comparison checks the rank and every size (torch.Size is a tuple): a call size not yet
    # bound is bound first by indexing (an IndexError on too few dimensions returns None), and then
    # compares equal to itself.
    binds, expected = [], []
    for dim, template in enumerate(argument.shape):
        symbol, offset = _split_dim(template)
        if symbol in CONFIG_DIMS:
            expected.append(str(_config_size(config, symbol) + offset))
            continue
        if (symbol in _STEP_SYMBOLS) != argument.per_step:
            raise ValueError(f"{name}: call size {symbol!r} is bound by a per-step argument, and only per-step "
                             "arguments may use it (their checks are skipped on a repeated step)")
        if symbol not in bound:
            binds.append(f"{symbol} = {shape_var}[{dim}]" + (f" - {offset}" if offset else ""))
            bound.add(symbol)
        expected.append(symbol + (f" + {offset}" if offset else ""))
    conditions.append(f"{shape_var} != ({', '.join(expected)},)")
    for dim, smallest, _ in argument.min_size:
        conditions.append(f"{shape_var}[{dim}] < {smallest}")
    if name in contiguous:
        conditions.append(f"not {name}.is_contiguous()")
    elif argument.layout is Layout.LAST_DIM_CONTIGUOUS:
        # is_contiguous() first: a cheaper call, and true for most tensors; stride() then indexing is
        # cheaper than stride(-1).
        conditions.append(f"not ({name}.is_contiguous() or {name}.stride()[-1] == 1)")
    # Binding first: a later condition on this tensor may compare against its own size.
    for bind in binds:
        emit(f"{indent}{bind}")
    emit(f"{indent}if {' or '.join(conditions)}: return None")
    if argument.no_overlap:
        # Distinct allocations cannot overlap: compare the storages' byte ranges (a few cheap calls,
        # whatever the strides); only tensors in one allocation pay for the exact span test.
        emit(f"{indent}_so = {name}.untyped_storage()")
        emit(f"{indent}_so0 = _so.data_ptr()")
        emit(f"{indent}_so1 = _so0 + _so.nbytes()")
        for other in argument.no_overlap:
            emit(f"{indent}_sa = {other}.untyped_storage()")
            emit(f"{indent}_sa0 = _sa.data_ptr()")
            emit(f"{indent}if not (_sa0 + _sa.nbytes() <= _so0 or _so1 <= _sa0) and _overlap({name}, {other}): "
                 "return None")
    return lines


# ---- documentation and schema, from the same rows --------------------------------------------------------------

def _requirement_text(argument: Argument) -> str:
    if argument.presence is Presence.ALWAYS:
        return "always"
    if argument.presence is Presence.OPTIONAL:
        return "optional"
    return argument.when


def _dtype_text(argument: Argument) -> str:
    return {"float32": "fp32", "int32": "int32"}.get(argument.dtype, f"config.{argument.dtype}")


def argument_docs(indent: str = "        ") -> str:
    """The Args entries of attention()'s docstring, one per row."""
    lines = []
    for argument in ARGUMENTS:
        strides = "" if argument.layout is Layout.LAST_DIM_CONTIGUOUS or argument.is_scalar else "; any strides"
        lines.append(f"{indent}{argument.name}: {_dtype_text(argument)} {argument.shape_text()}; "
                     f"{_requirement_text(argument)}{strides}. {argument.doc[0].upper()}{argument.doc[1:]}.")
    return "\n".join(lines)


def markdown_table() -> str:
    """The contract as a markdown table (README, `python -m dispatch contract`)."""
    rows = ["| argument | shape | dtype | when | strides |", "|---|---|---|---|---|"]
    for a in ARGUMENTS:
        rows.append(f"| `{a.name}` | {a.shape_text()} | {_dtype_text(a)} | {_requirement_text(a)} | "
                    f"{'-' if a.is_scalar else a.layout.value} |")
    return "\n".join(rows)


def custom_op_schema(config_argument: str = "config_json") -> str:
    """The schema of ``dispatch::attention``: the positional tensors, the config as JSON text, then the
    keyword tensors (out excluded: a functional op returns a new tensor)."""
    parts = [f"Tensor {name}" for name in POSITIONAL] + [f"str {config_argument}"]
    parts += [f"{by_name(name).torch_type} {name}=None" for name in KEYWORDS if name != "out"]
    return "(" + ", ".join(parts) + ") -> Tensor"


def output_shape(q_shape, config: AttentionConfig) -> tuple[int, int, int]:
    """The output's shape: `out`'s row of the table, with num_tokens taken from q."""
    return (q_shape[0], config.num_heads, config.head_size)
