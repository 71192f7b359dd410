"""Fixtures for the vLLM plugin tests: a vLLM config without weights, and GPU-like fp8 rounding.

These tests run only in the separate vLLM environment (scripts/vllm-tests.sh); in the main
environment test_vllm_plugin.py skips at import (pytest.importorskip), and nothing here imports
vLLM before a fixture is used.
"""

from __future__ import annotations

import json

import pytest

from tests.interpreter_patches import round_fp8_like_the_gpu

# A tiny Llama whose attention matches the tests' layer (4 query heads, 2 KV heads, head size 32).
# No weights: ModelConfig reads only config.json (HF_HUB_OFFLINE=1 keeps it off the network).
NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 4, 2, 32
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": NUM_HEADS * HEAD_SIZE,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_KV_HEADS,
    "head_dim": HEAD_SIZE,
    "intermediate_size": 256,
    "num_hidden_layers": 1,
    "vocab_size": 128,
    "max_position_embeddings": 1024,
    "torch_dtype": "float16",
}


@pytest.fixture(scope="session")
def vllm_config(tmp_path_factory):
    """VllmConfig for the tiny model on the CPU (what TritonAttentionMetadataBuilder reads)."""
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    model_config = ModelConfig(model=str(folder), skip_tokenizer_init=True, dtype="float16")
    return VllmConfig(model_config=model_config, device_config=DeviceConfig(device="cpu"))


@pytest.fixture
def gpu_like_fp8_rounding(monkeypatch):
    """Make the Triton interpreter's fp32/fp16 -> e4m3 cast round like the GPU (test-only patch).

    The interpreter drops the carry when rounding up to the next power of two (1.97 -> 1.0;
    shared/notes/triton-on-cpu.md); the GPU's cvt.rn.satfinite rounds to nearest even and
    saturates at +-448. vLLM's fp8-query kernel rounds P to e4m3 before its P @ V dot, so without
    this its CPU result is wrong where the GPU's is right. Same patch as
    tests/backends/test_triton.py; the kernels are unchanged.
    """
    round_fp8_like_the_gpu(monkeypatch)
