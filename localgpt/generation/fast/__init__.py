"""A GPU decode engine for Llama-2, Falcon and Mamba/FalconMamba, behind the ``Generator`` interface.

gpt-fast's recipe in a few short modules: ``transformer`` (the network with its static KV cache),
``mamba`` (recurrent decode with static conv/SSM state, chunked parallel prefill; ``scan_triton`` is
its CUDA scan), ``quantize`` (weight-only int8/int4 as module swaps; ``int4_triton`` writes an int4
layer out in bf16 for prompts; ``gemv_triton`` holds the one-token GEMV kernels), ``engine`` (prefill, the compiled decode step, sampling, streaming
ids), ``batch`` (continuous batching: many streams in slots, chunked prefill, per-request settings; additive,
not yet behind ``localgpt serve``) and ``generator`` (loading and text streaming).
Selected with ``engine = "fast"``; nothing is imported or loaded until ``load_fast_generator`` runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_fast_generator"]


def load_fast_generator(settings: Any, **options: Any):
    """The fast engine for ``settings`` (see ``generator.load_fast_generator`` for the options)."""
    from localgpt.generation.fast.generator import load_fast_generator as load

    return load(settings, **options)
