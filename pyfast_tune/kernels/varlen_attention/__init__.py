"""Varlen (packed-sequence) flash attention: the public op (``op``), its Triton kernels
(``triton``), the C++ CPU kernel's loader (``cpu``), the pure-PyTorch reference (``ref``),
upstream implementations behind one signature (``upstream``) and how the first-use guard
checks it (``check``, imported by the guard on first use only)."""

from pyfast_tune.kernels.varlen_attention.op import attention_shape, varlen_attention
from pyfast_tune.kernels.varlen_attention.ref import varlen_attention_ref

__all__ = ["attention_shape", "varlen_attention", "varlen_attention_ref"]
