"""Named attention cases: the one table the selftest, the parity grid, the tests and the benchmarks draw from.

A `Case` is a name, per-sequence query and KV lengths, config fields, and tags
saying who uses it. A case may hold every config field (a selftest or GPU
test case: `case.config()` builds it) or only some (a parity length set, a
benchmark shape), which its user completes: the parity grid adds one value of
each factor it pairs (tests/parity/grid.py), the benchmarks add a dtype mode
and a block size. Lengths sit around the page (16) and tile (128) edges, with
decode, whole-prompt and chunked-prefill sequences, as the house rules ask.

Tags (a case's users):
  selftest        `python -m dispatch selftest` runs each against every backend
  parity          the parity grid's length sets
  bench           benchmarks/attention.py's serving shapes (CUDA);
  bench-quick     the subset `--quick` times; bench-smoke: the CPU smoke run
  triton          tests/backends/test_triton.py's length sets (CPU interpreter)
  sdpa            tests/backends/test_sdpa.py's length set
  gpu             GPU tests; with flash_attn: the FlashAttention 4 cases, with
                  triton: the Triton GPU tests' length sets

`DTYPE_MODES` names each valid pairing of query dtype, cache dtype and KV
quantization mode once, with the names the benchmark results already use
(`fp8q-fp8kv` is an e4m3 query against an e4m3 per-tensor cache, `-pth`
marks per-token-head scales); `FEATURES` names the feature settings the
parity grid pairs. The scales the inputs use are dispatch.testing's
(Q_SCALE 0.75, K_SCALE 0.5, V_SCALE 0.25, OUTPUT_SCALE 0.05).

This module is data only: it imports the config, never a backend, so an
installed `python -m dispatch selftest` reads it without the tests folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from dispatch.config import AttentionConfig

__all__ = ["Case", "CASES", "DTYPE_MODES", "FEATURES", "PARITY_DTYPE_MODES", "BENCH_DTYPE_MODES",
           "SMOKE_DTYPE_MODES", "BENCH_BLOCK_SIZES", "cases", "case"]

# Each valid (q_dtype, kv_cache_dtype, kv_quant_mode) pairing, by name.
DTYPE_MODES: dict[str, dict[str, str]] = {
    "fp16": dict(q_dtype="float16", kv_cache_dtype="float16", kv_quant_mode="NONE"),
    "bf16": dict(q_dtype="bfloat16", kv_cache_dtype="bfloat16", kv_quant_mode="NONE"),
    "fp8q-fp8kv": dict(q_dtype="float8_e4m3fn", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
    "fp16q-fp8kv": dict(q_dtype="float16", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
    "bf16q-fp8kv": dict(q_dtype="bfloat16", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR"),
    "fp16q-e5m2kv": dict(q_dtype="float16", kv_cache_dtype="float8_e5m2", kv_quant_mode="FP8_PER_TENSOR"),
    "bf16q-e5m2kv": dict(q_dtype="bfloat16", kv_cache_dtype="float8_e5m2", kv_quant_mode="FP8_PER_TENSOR"),
    "bf16q-fp8kv-pth": dict(q_dtype="bfloat16", kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TOKEN_HEAD"),
    "fp16q-e5m2kv-pth": dict(q_dtype="float16", kv_cache_dtype="float8_e5m2", kv_quant_mode="FP8_PER_TOKEN_HEAD"),
    "fp16q-int8kv-pth": dict(q_dtype="float16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD"),
    "bf16q-int8kv-pth": dict(q_dtype="bfloat16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD"),
}
# The parity grid's dtype factor: every query dtype, cache format and mode at least once.
PARITY_DTYPE_MODES = ("fp16", "bf16", "fp8q-fp8kv", "fp16q-fp8kv", "bf16q-e5m2kv", "bf16q-fp8kv-pth",
                      "fp16q-e5m2kv-pth", "fp16q-int8kv-pth", "bf16q-int8kv-pth")
# What serving engines run; the benchmarks time each on every bench shape and block size.
BENCH_DTYPE_MODES = ("bf16", "bf16q-fp8kv", "fp8q-fp8kv", "bf16q-fp8kv-pth", "bf16q-int8kv-pth")
BENCH_BLOCK_SIZES = (16, 128)
# Under the Triton interpreter bf16 dots are wrong upstream (triton issue 11584): the smoke run uses fp16.
SMOKE_DTYPE_MODES = ("fp16", "fp16q-int8kv-pth")

# Feature settings, by name (the parity grid's feature factor).
FEATURES: dict[str, dict[str, Any]] = {
    "causal": dict(causal=True),
    "noncausal": dict(causal=False),
    "window": dict(sliding_window=19),
    "softcap": dict(logits_soft_cap=5.0),
    "alibi": dict(use_alibi=True),
    "sinks": dict(use_sinks=True),
    "fp8out": dict(out_dtype="float8_e4m3fn"),
}


@dataclass(frozen=True)
class Case:
    """One named batch: per-sequence lengths, the config fields it fixes, and who uses it."""

    name: str
    q_lens: tuple[int, ...]  # new query tokens of each sequence
    kv_lens: tuple[int, ...]  # keys of each sequence (context + new tokens); q_len <= kv_len
    fields: Mapping[str, Any] = field(default_factory=dict)  # AttentionConfig fields (may be partial)
    tags: frozenset[str] = frozenset()

    def __hash__(self) -> int:  # fields is a dict; the name is unique in the table
        return hash(self.name)

    @property
    def kind(self) -> str:
        """'decode' (one query token per sequence), 'prefill' (whole prompts) or 'mixed'."""
        if all(q == 1 for q in self.q_lens):
            return "decode"
        if self.q_lens == self.kv_lens:
            return "prefill"
        return "mixed"

    def config(self, **changes: Any) -> AttentionConfig:
        """The case's fields plus `changes` (which win) as a validated AttentionConfig."""
        return AttentionConfig(**{**self.fields, **changes})


def _case(name: str, q_lens, kv_lens, tags: str, **fields: Any) -> Case:
    return Case(name, tuple(q_lens), tuple(kv_lens), dict(fields), frozenset(tags.split()))


_SELFTEST_SHAPE = dict(num_heads=4, num_kv_heads=2, head_size=64)
_SELFTEST_LENS = ([1, 1, 17, 5], [1, 16, 17, 40])
# Decode (q_len 1), whole prompts (q_len == kv_len) and chunked prefill (q_len < kv_len), KV lengths around
# the page edges (16, 64) and the 128-key tile, and one sequence of two query tiles.
_FA_LENS = ([1, 1, 16, 5, 127, 1, 40, 150], [1, 15, 16, 17, 127, 128, 129, 300])
_FA_SHAPE = dict(num_heads=8, num_kv_heads=2, head_size=128, block_size=16)
_BENCH_SHAPE = dict(num_heads=32, num_kv_heads=8, head_size=128, causal=True)
_SMOKE_SHAPE = dict(num_heads=4, num_kv_heads=2, head_size=32, causal=True)

CASES: tuple[Case, ...] = (
    # -- selftest: every mode, every feature, GQA, an fp8 output -----------------------------------
    _case("fp16", *_SELFTEST_LENS, "selftest", **_SELFTEST_SHAPE, **DTYPE_MODES["fp16"]),
    _case("bf16", *_SELFTEST_LENS, "selftest", **_SELFTEST_SHAPE, **DTYPE_MODES["bf16"]),
    _case("fp8q-fp8kv-per-tensor", *_SELFTEST_LENS, "selftest", **_SELFTEST_SHAPE, **DTYPE_MODES["fp8q-fp8kv"]),
    _case("fp8q-fp8kv-per-tensor-fp16-out", *_SELFTEST_LENS, "selftest", **_SELFTEST_SHAPE,
          **DTYPE_MODES["fp8q-fp8kv"], out_dtype="float16"),
    _case("fp16q-e5m2kv-per-tensor", *_SELFTEST_LENS, "selftest", **_SELFTEST_SHAPE, **DTYPE_MODES["fp16q-e5m2kv"]),
    _case("bf16q-fp8kv-per-token-head", *_SELFTEST_LENS, "selftest", **_SELFTEST_SHAPE,
          **DTYPE_MODES["bf16q-fp8kv-pth"]),
    _case("fp16q-int8kv-per-token-head", *_SELFTEST_LENS, "selftest", **_SELFTEST_SHAPE,
          **DTYPE_MODES["fp16q-int8kv-pth"]),
    _case("fp16-window-softcap-alibi-sinks", *_SELFTEST_LENS, "selftest", **_SELFTEST_SHAPE, **DTYPE_MODES["fp16"],
          sliding_window=24, logits_soft_cap=8.0, use_alibi=True, use_sinks=True, causal=False),
    _case("fp16-fp8-output", *_SELFTEST_LENS, "selftest", **_SELFTEST_SHAPE, **DTYPE_MODES["fp16"],
          out_dtype="float8_e4m3fn"),
    # -- parity: length sets at page (16) and tile edges, and a one-token sequence ------------------
    _case("decode", [1, 1, 1, 1], [1, 16, 17, 129], "parity"),
    _case("prefill", [1, 15, 33], [1, 15, 33], "parity"),
    _case("mixed", [1, 5, 16, 1], [128, 17, 16, 31], "parity"),
    # -- the Triton interpreter's length sets (tiny: the interpreter is slow) ----------------------
    # Decode, full prefill and chunked prefill in one batch.
    _case("triton-mixed", [1, 15, 17, 4], [16, 15, 40, 70], "triton"),
    # 1 / 15 / 16 / 17 / 127 / 128 / 129 around page and tile edges, decode and prefill in one batch.
    _case("triton-edges", [1, 15, 16, 17, 1, 127, 3], [1, 15, 16, 129, 128, 127, 129], "triton"),
    # -- the sdpa backend's tests (no interpreter: a bigger batch) ------------------------------------
    # Lengths around page (16) and tile (128) edges, with decode, whole-prompt and chunked-prefill sequences.
    _case("sdpa-edges", [1, 1, 16, 5, 127, 1, 40], [1, 15, 16, 17, 127, 128, 129], "sdpa"),
    # -- GPU tests of the Triton kernel at realistic lengths ---------------------------------------
    # Decode (1 token against 8k, 2k, 1), full prefill (300/300) and chunked prefill (1024 new of 1500).
    _case("gpu-mixed-8k", [1, 1, 300, 1, 1024, 16], [8000, 1, 300, 2048, 1500, 4000], "gpu triton"),
    _case("gpu-decode-8k", [1] * 8, [8000, 1, 17, 129, 2048, 4000, 777, 5000], "gpu triton"),
    # -- FlashAttention 4 on a GPU ------------------------------------------------------------------
    _case("bf16-h128-bs16-causal", *_FA_LENS, "gpu flash_attn", **_FA_SHAPE, **DTYPE_MODES["bf16"]),
    _case("fp16-h128-bs16-causal", *_FA_LENS, "gpu flash_attn", **_FA_SHAPE, **DTYPE_MODES["fp16"]),
    _case("bf16-h128-bs64-noncausal", *_FA_LENS, "gpu flash_attn", **dict(_FA_SHAPE, block_size=64),
          **DTYPE_MODES["bf16"], causal=False),
    _case("bf16-h128-bs16-window", *_FA_LENS, "gpu flash_attn", **_FA_SHAPE, **DTYPE_MODES["bf16"],
          sliding_window=20),
    _case("fp16-h128-bs64-window-noncausal", *_FA_LENS, "gpu flash_attn", **dict(_FA_SHAPE, block_size=64),
          **DTYPE_MODES["fp16"], sliding_window=33, causal=False),
    _case("bf16-h128-bs16-softcap", *_FA_LENS, "gpu flash_attn", **_FA_SHAPE, **DTYPE_MODES["bf16"],
          logits_soft_cap=4.0),
    _case("bf16-h128-bs16-sinks", *_FA_LENS, "gpu flash_attn", **_FA_SHAPE, **DTYPE_MODES["bf16"], use_sinks=True),
    _case("fp16-h64-bs64-window-softcap-sinks", *_FA_LENS, "gpu flash_attn",
          **dict(_FA_SHAPE, head_size=64, block_size=64), **DTYPE_MODES["fp16"], sliding_window=50,
          logits_soft_cap=8.0, use_sinks=True),
    _case("bf16-h192-bs128-causal", *_FA_LENS, "gpu flash_attn", **dict(_FA_SHAPE, head_size=192, block_size=128),
          **DTYPE_MODES["bf16"]),
    _case("bf16-h128-bs16-mqa", *_FA_LENS, "gpu flash_attn", **dict(_FA_SHAPE, num_kv_heads=1), **DTYPE_MODES["bf16"]),
    _case("fp16-h128-bs16-mha-scale0.3", *_FA_LENS, "gpu flash_attn", **dict(_FA_SHAPE, num_heads=4, num_kv_heads=4),
          **DTYPE_MODES["fp16"], softmax_scale=0.3),
    # -- benchmarks: serving shapes, 32 query heads, 8 KV heads, head size 128 ----------------------
    _case("decode-64x8k", [1] * 64, [8192] * 64, "bench bench-quick", **_BENCH_SHAPE),
    _case("decode-8x32k", [1] * 8, [32768] * 8, "bench", **_BENCH_SHAPE),
    _case("decode-256x2k", [1] * 256, [2048] * 256, "bench", **_BENCH_SHAPE),
    _case("decode-1x128k", [1], [131072], "bench", **_BENCH_SHAPE),
    _case("prefill-4x4k", [4096] * 4, [4096] * 4, "bench bench-quick", **_BENCH_SHAPE),
    _case("prefill-1x16k", [16384], [16384], "bench", **_BENCH_SHAPE),
    _case("mixed-2x2k+62", [2048, 2048] + [1] * 62, [8192, 8192] + [4096] * 62, "bench bench-quick", **_BENCH_SHAPE),
    # -- the benchmark's CPU smoke run (Triton interpreter) ----------------------------------------
    _case("smoke-decode", [1, 1], [40, 17], "bench-smoke", **_SMOKE_SHAPE),
    _case("smoke-prefill", [17], [17], "bench-smoke", **_SMOKE_SHAPE),
)


def _check_table(table: tuple[Case, ...]) -> None:
    # Errors, not asserts: a bad row must fail at import even under python -O.
    seen: set[str] = set()
    for c in table:
        if c.name in seen:
            raise ValueError(f"dispatch.cases: case name {c.name!r} appears twice")
        seen.add(c.name)
        if len(c.q_lens) != len(c.kv_lens) or any(q > k for q, k in zip(c.q_lens, c.kv_lens)):
            raise ValueError(f"dispatch.cases: {c.name}: need q_len <= kv_len per sequence, got q_lens={c.q_lens} "
                             f"kv_lens={c.kv_lens}")


_check_table(CASES)
_BY_NAME = {c.name: c for c in CASES}


def cases(*tags: str) -> tuple[Case, ...]:
    """The cases carrying every one of `tags`, in table order."""
    wanted = frozenset(tags)
    return tuple(c for c in CASES if wanted <= c.tags)


def case(name: str) -> Case:
    """The case called `name`."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no case named {name!r}; known: {sorted(_BY_NAME)}") from None
