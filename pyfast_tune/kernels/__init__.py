"""Kernels: varlen flash attention (Triton on CUDA, C++ on CPU, PyTorch reference), fused
linear cross-entropy, fused LoRA.

Imports only torch; Triton and the C++ extension load on first use of their backend.
"""

from pyfast_tune.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from pyfast_tune.kernels.lora import lora_linear, lora_linear_ref  # noqa: F401 (re-export)
from pyfast_tune.kernels.varlen_attention import varlen_attention
from pyfast_tune.kernels.varlen_attention_ref import varlen_attention_ref

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "varlen_attention",
    "varlen_attention_ref",
]
