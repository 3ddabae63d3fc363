"""Pure-PyTorch reference for the linear cross-entropy: the definition the op is tested against.

It builds the whole (T, V) logit matrix — exactly what the op exists to avoid — and lets
autograd differentiate it. Its only job is to be obviously right.

>>> import torch
>>> h, W = torch.randn(6, 8), torch.randn(11, 8)
>>> t = torch.tensor([1, 2, -100, 4, 5, 10])
>>> linear_cross_entropy_ref(h, W, t).shape
torch.Size([])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy_ref(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    weights: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    upcast: bool = True,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)``, optionally soft-capped, by definition.

    hidden (T, H), weight (V, H), bias (V,), targets (T,) integer, weights (T,) float.
    ``softcap`` c maps logits z to ``c * tanh(z / c)`` (Gemma 2). ``reduction``: "none" ->
    (T,) ``weights * ce`` (0 where ignored), "sum" -> their sum, "mean" -> their sum divided
    by the number of targets != ignore_index (0 when there is none). ``upcast``: the logits
    are cast to fp32 (fp64 stays fp64) before the softmax, as training does; with
    ``upcast=False`` they stay in the input dtype (PyTorch's plain same-dtype computation).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = F.linear(hidden, weight, bias)  # (T, V)
    if upcast and logits.dtype != torch.float64:
        logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    targets = targets.long()
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")  # (T,)
    if weights is not None:
        ce = ce * weights.to(ce.dtype)
    if reduction == "none":
        return ce
    total = ce.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)
