"""`dispatch.attention` as a PyTorch custom op, so torch.compile traces through it without breaks.

Inside a compiled region `attention()` calls ``torch.ops.dispatch.attention``: an
opaque op whose fake implementation gives the output's shape and dtype, and
whose real implementation runs the ordinary eager path (checks, selection,
backend) at run time. The config travels as its JSON text, a constant to the
compiler (custom ops take tensors and plain values, not pydantic models).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.utils._pytree as pytree

from dispatch.config import AttentionConfig

__all__ = ["attention_op", "config_key"]

# Registered as a pytree constant, a config is a Python constant to torch.compile, guarded by
# equality (a different config retraces). Without it torch 2.11's dynamo refuses to pass the
# pydantic model to `config_key` below ("AttentionConfig is not a constant"); 2.13 happens to
# accept it. AttentionConfig is frozen, with value equality and a hash, as the registration needs.
if not pytree.is_constant_class(AttentionConfig):
    pytree.register_constant(AttentionConfig)


@torch.compiler.assume_constant_result
def config_key(config: AttentionConfig) -> str:
    """The config as JSON; evaluated once at trace time, a constant in the graph."""
    return config.model_dump_json()


@functools.lru_cache(maxsize=256)
def _config_from_key(key: str) -> AttentionConfig:
    return AttentionConfig.model_validate_json(key)


@torch.library.custom_op("dispatch::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    config_json: str,
    q_scale: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    v_scale_cache: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    output_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from dispatch.api import attention

    return attention(q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table,
                     config=_config_from_key(config_json), q_scale=q_scale, k_scale=k_scale, v_scale=v_scale,
                     k_scale_cache=k_scale_cache, v_scale_cache=v_scale_cache, alibi_slopes=alibi_slopes,
                     sinks=sinks, output_scale=output_scale)


@attention_op.register_fake
def _attention_fake(q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table, config_json, *args):
    config = _config_from_key(config_json)
    return q.new_empty((q.shape[0], config.num_heads, config.head_size), dtype=config.out_torch_dtype)
