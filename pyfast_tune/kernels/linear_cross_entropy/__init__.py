"""Fused linear cross-entropy: the public op (``op``), its Triton row kernel (``triton``), the
pure-PyTorch reference that is also the upstream baseline (``ref``: PyTorch's own
``F.cross_entropy`` over the whole logits) and how the first-use guard checks it (``check``,
imported by the guard on first use only)."""

from pyfast_tune.kernels.linear_cross_entropy.op import default_chunk_bytes, linear_cross_entropy
from pyfast_tune.kernels.linear_cross_entropy.ref import linear_cross_entropy_ref

__all__ = ["default_chunk_bytes", "linear_cross_entropy", "linear_cross_entropy_ref"]
