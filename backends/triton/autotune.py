"""Opt-in autotuning of the Triton kernel's tiles, once per (GPU, config, shape bucket).

`choose_tiles` gives defaults measured on one card (benchmarks/RESULTS.md). With
``DISPATCH_TRITON_AUTOTUNE=1`` in the environment, the first launch of each
(GPU name, config, shape bucket) instead times a small set of candidates around
those defaults on the real arguments and keeps the fastest for the life of the
process, so a serving process pays the search once per bucket (a few seconds of
compilation per candidate the first time, none afterwards).

What tuning costs and where it is not done:
- The search compiles and times every candidate, with host synchronizations, on
  the first call of a bucket only; every later call of the bucket is one dict
  lookup. Warm it up before `torch.cuda.set_sync_debug_mode("error")`.
- Never inside CUDA-graph capture (timing cannot run there): an untuned bucket
  then launches with the defaults, and is tuned at its first call outside capture.
- Off by default, because the first calls become slow and tests and benchmarks
  want reproducible tiles.

Buckets round the token count, the sequence count and the block table's bound on
kv_len up to powers of two, and separate decode-shaped launches from the rest.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import threading
from typing import Callable, Hashable, Iterable, Optional

import torch
import triton

from dispatch.config import AttentionConfig

logger = logging.getLogger("dispatch")

ENV_VAR = "DISPATCH_TRITON_AUTOTUNE"
ENABLED = os.environ.get(ENV_VAR, "0") not in ("", "0")
REPEATS = 10

_cache: dict[Hashable, object] = {}
_lock = threading.Lock()  # one search per bucket even when several threads miss at once


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def bucket(config: AttentionConfig, device: torch.device, decode_shaped: bool, num_tokens: int, num_seqs: int,
           max_kv_len_bound: int) -> tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (_device_name(index), config, decode_shaped, triton.next_power_of_2(num_tokens),
            triton.next_power_of_2(num_seqs), triton.next_power_of_2(max(max_kv_len_bound, 1)))


def cached(key: Hashable):
    """The tuned tiles of a bucket, or None when it has not been tuned."""
    return _cache.get(key)


def clear() -> None:
    _cache.clear()


def candidates(default, decode_shaped: bool) -> list:
    """The defaults first, then the variants the sweeps showed competitive somewhere: half the key
    tile, the other pipelining depth, and (decode) the other loop structure or (prefill) 8 warps."""
    tiles_type = type(default)
    seen, result = set(), []
    tile_ns = (default.tile_n, max(16, default.tile_n // 2))
    for tile_n in tile_ns:
        for stages in (default.num_stages, 5 - default.num_stages if default.num_stages in (2, 3) else 2):
            if decode_shaped:
                variants = [(default.block_m, tile_n, default.num_warps, stages, interior)
                            for interior in (default.unmasked_interior, not default.unmasked_interior)]
            else:
                variants = [(default.block_m, tile_n, warps, stages, default.unmasked_interior)
                            for warps in (default.num_warps, 8 if default.num_warps == 4 else 4)]
            for fields in variants:
                if fields not in seen:
                    seen.add(fields)
                    result.append(tiles_type(*fields))
    return result


def _cuda_time_ms(run: Callable[[object], object], tiles) -> float:
    """Median time of REPEATS launches with `tiles` (after one that compiles and warms up), each from
    a cold L2 as in serving, where the KV cache does not stay cached between steps: a warm L2 made
    small inputs favour the wrong candidates."""
    run(tiles)
    device = torch.cuda.current_device()
    flush = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.int8,
                        device="cuda")
    times = []
    for _ in range(REPEATS):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(tiles)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tune(key: Hashable, options: Iterable, run: Callable[[object], object],
         time_ms: Callable[[Callable, object], float] = _cuda_time_ms) -> object:
    """Time each option with `run(tiles)`, cache and return the fastest for `key`.

    An option that fails to compile or launch (e.g. more shared memory than this GPU has) is
    skipped with a warning that names it; if every option fails, the last error is raised.
    """
    with _lock:
        if key in _cache:  # another thread finished the search while this one waited
            return _cache[key]
        timings, error = [], None
        for tiles in options:
            try:
                timings.append((time_ms(run, tiles), tiles))
            except Exception as exc:  # reported, and the candidate dropped; never silently used
                logger.warning("triton autotune: %s failed for %s: %s: %s", tiles, key[0], type(exc).__name__, exc)
                error = exc
        if not timings:
            raise error
        best_ms, best = min(timings, key=lambda item: item[0])
        _cache[key] = best
        logger.info("triton autotune on %s for [%s], bucket %s: %s (%.3f ms; %d candidates, slowest %.3f ms)",
                    key[0], key[1].summary(), key[2:], best, best_ms,
                    len(timings), max(t for t, _ in timings))
        return best


def tiles_for(config: AttentionConfig, device: torch.device, decode_shaped: bool, num_tokens: int, num_seqs: int,
              max_kv_len_bound: int, default, run: Callable[[object], object]) -> Optional[object]:
    """The tuned tiles for this launch, tuning first when the bucket is new; None under CUDA-graph
    capture of an untuned bucket (the caller then uses its defaults)."""
    key = bucket(config, device, decode_shaped, num_tokens, num_seqs, max_kv_len_bound)
    tiles = cached(key)
    if tiles is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        tiles = tune(key, candidates(default, decode_shaped), run)
    return tiles
