"""`dispatch.attention` as a PyTorch custom op, so torch.compile traces through it without breaks.

Inside a compiled region `attention()` calls ``torch.ops.dispatch.attention``: an
opaque op whose fake implementation gives the output's shape and dtype, and
whose real implementation runs the ordinary eager path (checks, selection,
backend) at run time. The config travels as its JSON text, a constant to the
compiler (custom ops take tensors and plain values, not pydantic models).
"""

from __future__ import annotations

import functools
import torch
import torch.utils._pytree as pytree

from dispatch import contract
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


# The schema is the contract table's (dispatch/contract.py): the positional tensors, the config as JSON,
# then every keyword tensor but `out` (a functional op returns a new tensor; attention() copies into out).
_KEYWORDS = tuple(name for name in contract.KEYWORDS if name != "out")


def _attention_impl(*args) -> torch.Tensor:
    from dispatch.api import attention

    positional = args[:len(contract.POSITIONAL)]
    config = _config_from_key(args[len(contract.POSITIONAL)])
    keywords = dict(zip(_KEYWORDS, args[len(contract.POSITIONAL) + 1:]))
    return attention(*positional, config=config, **keywords)


attention_op = torch.library.custom_op("dispatch::attention", _attention_impl, mutates_args=(),
                                       schema=contract.custom_op_schema())


@attention_op.register_fake
def _attention_fake(*args):
    q = args[0]
    config = _config_from_key(args[len(contract.POSITIONAL)])
    return q.new_empty(contract.output_shape(q.shape, config), dtype=config.out_torch_dtype)
