"""Kernels: varlen flash attention (Triton on CUDA, C++ on CPU, PyTorch reference), fused
linear cross-entropy, fused LoRA.

One package per op (``varlen_attention/``, ``lora/``, ``linear_cross_entropy/``), each holding
its public op, Triton kernels, reference, upstream and how the first-use guard checks it; the
guard (``guard/``) is a leaf that knows ops by name. Imports only torch; Triton and the C++
extension load on first use of their backend.
"""

from pyfast_tune.kernels.guard import declare_ops
from pyfast_tune.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from pyfast_tune.kernels.lora import lora_linear, lora_linear_ref  # noqa: F401 (re-export)
from pyfast_tune.kernels.varlen_attention import varlen_attention, varlen_attention_ref

# Every op the first-use guard checks, in one place: its name and where its ``guard.Op`` lives,
# imported when the guard first needs it (the ops call the guard, so it must not import them).
declare_ops(
    {
        "varlen_attention": "pyfast_tune.kernels.varlen_attention.check:VarlenAttention",
        "lora_linear": "pyfast_tune.kernels.lora.check:LoraLinear",
        "linear_cross_entropy": "pyfast_tune.kernels.linear_cross_entropy.check:LinearCrossEntropy",
    }
)

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "varlen_attention",
    "varlen_attention_ref",
]
