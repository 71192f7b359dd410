"""Adapters that let frameworks call dispatch (transformers, vLLM); each imports its framework lazily
and only calls the public API."""
