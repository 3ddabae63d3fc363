"""Upstream varlen attention behind one signature, for the first-use guard and benchmarks.

Each function takes our layout — q (total_q, H, D), k/v (total_k, H_kv, D), cu_seqlens (B+1,)
int32 — plus ``scale`` and a (left, right) window (-1 unbounded; causal is right = 0) and
returns out (total_q, H, D), differentiable through the upstream's own autograd:

- ``sdpa``: ``F.scaled_dot_product_attention`` one segment at a time (any device, any dtype);
  what training's ``attention: ref`` runs.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA; torch >= 2.9; the
  signature changed between releases, so arguments are fitted to the installed one).
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (CUDA, when flash-attn is installed).

``unavailable(name, device, dtype, window)`` says why one cannot run here (None when it can).

>>> import torch
>>> q = k = v = torch.randn(7, 2, 16); cu = torch.tensor([0, 3, 7], dtype=torch.int32)
>>> sdpa(q, k, v, cu, cu, 0.25, (-1, 0)).shape
torch.Size([7, 2, 16])
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfast_tune.kernels.varlen_attention.ref import visible_keys

NAMES = ("sdpa", "torch_varlen", "flash_attn")
_HALF = (torch.float16, torch.bfloat16)


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    scale: float | None = None,
    window: tuple[int, int] = (-1, 0),
) -> Tensor:
    """Attention per segment with PyTorch's SDPA; rows that see no key get 0 (as flash-attn).

    window: (left, right), right = 0 for causal. Causal self-attention without a window uses
    ``is_causal`` (SDPA's fused causal kernels); anything else passes the boolean mask of
    ``visible_keys`` (bottom-right aligned, as flash-attn's varlen).
    """
    out = torch.empty(q.shape[:2] + v.shape[2:], dtype=q.dtype, device=q.device)
    gqa = k.shape[1] != q.shape[1]
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        (s, e), (sk, ek) = (bq[b], bq[b + 1]), (bk[b], bk[b + 1])
        if e <= s:
            continue
        qs = q[s:e].transpose(0, 1)  # (H, Lq, D)
        ks, vs = k[sk:ek].transpose(0, 1), v[sk:ek].transpose(0, 1)  # (H_kv, Lk, D)
        mask, empty = None, None
        if tuple(window) != (-1, 0) or e - s != ek - sk:
            mask = visible_keys(e - s, ek - sk, False, tuple(window), q.device)  # right as given
            empty = ~mask.any(-1)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
        )
        if empty is not None and bool(empty.any()):
            o = o.masked_fill(empty[None, :, None], 0.0)
        out[s:e] = o.transpose(0, 1)
    return out


@functools.cache
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    scale: float | None = None,
    window: tuple[int, int] = (-1, 0),
    max_q: int | None = None,
    max_k: int | None = None,
) -> Tensor:
    """torch's ``varlen_attn``, fitted to the installed signature (2.9: ``is_causal``; later:
    ``scale``, ``window_size``, ``enable_gqa``)."""
    fn, params = _varlen_attn()
    if fn is None:
        raise NotImplementedError("torch.nn.attention.varlen is not in this torch")
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if max_q is None else max_q
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if max_k is None else max_k
    kw = {}
    if "window_size" in params:
        kw["window_size"] = tuple(window)
    elif tuple(window) in ((-1, 0), (-1, -1)):
        kw["is_causal"] = window[1] == 0
    else:
        raise NotImplementedError(f"this torch's varlen_attn has no sliding window {window}")
    if scale is not None and "scale" in params:
        kw["scale"] = scale
    elif scale is not None:  # no scale argument: fold ours into q over its default 1/sqrt(D)
        q = q * (scale * math.sqrt(q.shape[-1]))
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def flash_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    scale: float | None = None,
    window: tuple[int, int] = (-1, 0),
    max_q: int | None = None,
    max_k: int | None = None,
) -> Tensor:
    """flash-attn 2's ``flash_attn_varlen_func`` (GQA and windows native)."""
    from flash_attn import flash_attn_varlen_func

    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if max_q is None else max_q
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if max_k is None else max_k
    causal = window[1] == 0
    return flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
        window_size=(window[0], -1 if causal else window[1]),
    )  # fmt: skip


FUNCTIONS = {"sdpa": sdpa, "torch_varlen": torch_varlen, "flash_attn": flash_attn}


def unavailable(
    name: str, device: torch.device, dtype: torch.dtype, window: tuple[int, int]
) -> str | None:
    """Why upstream ``name`` cannot run tensors of ``dtype`` on ``device`` here; None if it can."""
    if name == "sdpa":
        return None
    if device.type != "cuda":
        return f"{name} runs on CUDA only"
    if dtype not in _HALF:
        return f"{name} takes fp16/bf16 only, not {str(dtype).removeprefix('torch.')}"
    if name == "torch_varlen":
        fn, params = _varlen_attn()
        if fn is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (2.9+)"
        if "window_size" not in params and tuple(window) not in ((-1, 0), (-1, -1)):
            return f"torch {torch.__version__}'s varlen_attn has no sliding window"
        return None
    if name == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            return f"flash-attn is not installed ({e})"
        return None
    raise ValueError(f"unknown upstream attention {name!r}; expected one of {NAMES}")
