"""Pure-PyTorch LoRA linear: the definition the fused op is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_ref(
    x: torch.Tensor,
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    bias: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch LoRA linear, composed the way peft's ``lora.Linear.forward`` does it.

    Args:
        x: (..., in); W: (out, in) dense; A: (r, in); B: (out, r); bias: (out,) or None.
        keep_mask: (..., in) bool, required when dropout_p > 0 (e.g. from lora_dropout_mask).
    Returns:
        (..., out) in x's dtype; differentiable in every input.
    """
    xa = x.to(A.dtype)
    if dropout_p > 0.0:
        if keep_mask is None:
            raise ValueError("lora_linear_ref needs keep_mask when dropout_p > 0")
        xa = xa * keep_mask.reshape(xa.shape).to(xa.dtype).div(1.0 - dropout_p)
    y = F.linear(x, W, bias)
    return (y + F.linear(F.linear(xa, A), B) * scaling).to(x.dtype)
