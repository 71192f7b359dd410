"""sdpa's extra memory is bounded: no step holds more than MAX_SCORE_ELEMENTS score elements.

Measured, not inferred from the code: a TorchDispatchMode sees every tensor each aten op returns during the
call (SDPA's own decomposition included), and the largest must stay within the budget or the size of the call's
own inputs and output. Before chunking, one sequence of n queries built its [num_heads, n, n] mask (and with
ALiBi a float32 bias of that size) at once: one 8-head sequence of 8192 tokens took +5.3 GB (+8.3 GB with ALiBi).
Here the quadratic term is 4 x 1024 x 1024 = 4M elements against a budget of 64K.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from backends import sdpa
from dispatch import AttentionConfig
from tests.cases import make_inputs

BUDGET = 1 << 16


class LargestTensor(TorchDispatchMode):
    """Records the op and size (elements) of the largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), (str(func), tuple(t.shape))
        return result


def _largest_during_call(config, q_lens, kv_lens):
    inputs = make_inputs(config, q_lens, kv_lens, poison=False, extra_blocks=0)
    with LargestTensor() as largest:
        out = sdpa.forward(*inputs.args, config=config, **inputs.kwargs)
    assert torch.isfinite(out.float()).all()
    # Tensors the size of the call's own data are not "extra": q, the output, one sequence's K/V in float32.
    own = max(inputs.q.numel(), max(kv_lens) * config.num_kv_heads * config.head_size)
    return largest, own


@pytest.mark.parametrize("features", [dict(), dict(use_alibi=True), dict(logits_soft_cap=5.0, use_sinks=True),
                                      dict(sliding_window=100, causal=False)],
                         ids=["causal", "alibi", "softcap_sinks", "window"])
@pytest.mark.parametrize("dtypes", [
    dict(q_dtype="float16", kv_cache_dtype="float16"),
    dict(q_dtype="bfloat16", kv_cache_dtype="int8", kv_quant_mode="INT8_PER_TOKEN_HEAD"),
], ids=["fp16", "int8"])
def test_long_prefill_stays_within_the_budget(monkeypatch, dtypes, features):
    monkeypatch.setattr(sdpa, "MAX_SCORE_ELEMENTS", BUDGET)
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=16, backend="sdpa", **dtypes, **features)
    largest, own = _largest_during_call(config, [1024], [1024])
    assert own <= BUDGET < 4 * 1024 * 1024
    assert largest.numel <= BUDGET, f"largest intermediate {largest.op}: {largest.numel} elements > {BUDGET}"


def test_decode_batches_stay_within_the_budget(monkeypatch):
    """64 decode sequences of up to 600 keys: padded into one batch they would hold 64 x 600 x (heads + 2 x
    kv_heads x head_size) elements; split, each batch stays within the budget."""
    monkeypatch.setattr(sdpa, "MAX_SCORE_ELEMENTS", BUDGET)
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_size=16, backend="sdpa", q_dtype="bfloat16",
                             kv_cache_dtype="float8_e4m3fn", kv_quant_mode="FP8_PER_TENSOR", use_alibi=True)
    kv_lens = [600 - 9 * i for i in range(64)]
    largest, own = _largest_during_call(config, [1] * 64, kv_lens)
    assert own <= BUDGET < 64 * 600 * (4 + 2 * 2 * 16)
    assert largest.numel <= BUDGET, f"largest intermediate {largest.op}: {largest.numel} elements > {BUDGET}"
