"""Varlen (packed-sequence) flash attention: one ``torch.library`` custom op, three backends.

``varlen_attention`` takes flash-attn's varlen layout — every sample of a pack concatenated
along the token axis, ``cu_seqlens`` marking where each starts — and attends only within a
sample, so packed training is exact (no token sees another sample) and costs what the samples
cost. The op ``torch.ops.pyfast_tune.varlen_attention`` dispatches on device:

- CUDA: Triton kernels (``triton.py``), flash-attention-2 forward and backward;
- CPU: the C++ kernel (``csrc/varlen_attention.cpp``, loaded by ``cpu.py``), built on first use;
- ``backend="ref"``: ``varlen_attention_ref`` (``ref.py``), pure PyTorch, for tests and as a
  fallback;
- ``backend="sdpa" | "torch_varlen" | "flash_attn"``: upstream implementations
  (``upstream.py``), run directly rather than through the op.

``backend="auto"`` asks the first-use guard (``guard``): the first call for a device and shape
class checks every backend that can run there against a float64 reference and an upstream
implementation, races the correct ones and uses the fastest; a backend that fails to build,
launch or pass is skipped with a warning (``check.py`` says how this op is checked). A named
backend runs as is (what tests and benchmarks use). ``PYFAST_TUNE_FAULTS`` can make any
backend wrong or failing (``guard.faults``).

``backend="triton"`` also runs on CPU tensors under ``TRITON_INTERPRET=1`` (how the Triton
path is tested without a GPU). Autograd, ``torch.compile`` tracing (fake tensors) and
``torch.library.opcheck`` go through the registered op, whose backward is a second op.

>>> import torch
>>> from pyfast_tune.kernels import varlen_attention
>>> q = torch.randn(7, 4, 64); k = v = torch.randn(7, 2, 64)          # GQA: 4 q heads, 2 kv
>>> cu = torch.tensor([0, 3, 7], dtype=torch.int32)                    # samples of 3 and 4
>>> out = varlen_attention(q, k, v, cu, cu, 4, 4)                      # doctest: +SKIP
>>> out.shape
torch.Size([7, 4, 64])
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from pyfast_tune.kernels import guard
from pyfast_tune.kernels.guard import faults
from pyfast_tune.kernels.guard.call import tracing
from pyfast_tune.kernels.varlen_attention import upstream
from pyfast_tune.kernels.varlen_attention.ref import (
    varlen_attention_ref,
    varlen_attention_ref_backward,
)

MAX_HEAD_DIM = 256
OP = "varlen_attention"
_OURS = ("triton", "cpp", "ref")  # run through the custom op; they also return lse
_BACKENDS = ("auto", *_OURS, *upstream.NAMES)
_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPES = {
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cpp": _ALL_DTYPES,
    "ref": _ALL_DTYPES,
    "sdpa": _ALL_DTYPES,
    "torch_varlen": (torch.float16, torch.bfloat16),
    "flash_attn": (torch.float16, torch.bfloat16),
}


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    backend: str = "auto",
    prefer: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention within each segment of a packed batch.

    Args:
        q: (total_q, H, D) fp16/bf16/fp32 (fp64 on the cpp/ref backends), D <= 256, any D.
        k, v: (total_k, H_kv, D), same dtype and device; H % H_kv == 0 (GQA/MQA).
        cu_seqlens_q, cu_seqlens_k: (B+1,) int32, cumulative segment lengths starting at 0
            and ending at total_q / total_k; segments may be empty.
        max_seqlen_q, max_seqlen_k: longest segment (sizes the Triton grid).
        causal: query i of a segment sees key j iff j <= i + L_k - L_q (bottom-right
            alignment, as flash-attn's varlen); forces window right = 0.
        softmax_scale: defaults to 1/sqrt(D).
        window: (left, right) sliding window, flash-attn semantics: key j visible iff
            i + L_k - L_q - left <= j <= i + L_k - L_q + right; -1 is unbounded.
        return_lse: also return lse (H, total_q) float32 (float64 for float64 inputs), the
            natural-log sum of exp(scaled scores); +inf for rows that see no key (their out is
            0). lse is not differentiable.
        backend: "auto" (the guard's choice for this device and shape class; before any
            decision, inside torch.compile tracing: Triton on CUDA, C++ on CPU), or one of
            "triton", "cpp", "ref", "sdpa", "torch_varlen", "flash_attn" to run that one
            unchecked (the upstream ones return no lse).
        prefer: with backend="auto", check this backend and use it if correct, without racing
            it against the others (training's explicit ``attention: triton``).

    Returns:
        out (total_q, H, D) in q's dtype, or (out, lse) with ``return_lse``.

    Example (two packed samples of 3 and 4 tokens, causal):
        >>> out = varlen_attention(q, k, v, cu, cu, 4, 4)            # doctest: +SKIP
    """
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if backend == "auto":
        return _guarded(args, causal, softmax_scale, window, return_lse, prefer)
    backend = _resolve_backend(q, backend)
    _check_inputs(*args, window, backend)
    left, right = (int(window[0]), int(window[1]))
    if causal:
        right = 0
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend in upstream.NAMES:
        if return_lse:
            raise ValueError(f"varlen_attention: backend {backend!r} returns no lse; use {_OURS}")
        faults.before(OP, backend)
        fn = upstream.FUNCTIONS[backend]
        window_ = (max(left, -1), max(right, -1))
        if backend == "sdpa":
            out = fn(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window_)
        else:
            out = fn(
                q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window_, max_seqlen_q, max_seqlen_k
            )
        return faults.perturb(OP, backend, out)
    out, lse = torch.ops.pyfast_tune.varlen_attention(
        q,
        k,
        v,
        cu_seqlens_q.contiguous(),
        cu_seqlens_k.contiguous(),
        int(max_seqlen_q),
        int(max_seqlen_k),
        scale,
        max(left, -1),
        max(right, -1),
        backend,
    )
    return (out, lse) if return_lse else out


def attention_shape(q, k, window, causal: bool) -> dict:
    """The shape class of a varlen attention call (what changes which code runs)."""
    left, right = int(window[0]), int(window[1])
    return {
        "dtype": str(q.dtype).removeprefix("torch."),
        "head_dim": int(q.shape[-1]),
        "gqa": int(q.shape[1] // max(1, k.shape[1])),
        "window": [max(left, -1), 0 if causal else max(right, -1)],
    }


def _guarded(args, causal, softmax_scale, window, return_lse, prefer) -> Tensor | tuple:
    """backend="auto": run the guard's choice; if it fails at run time, the next one."""
    q, k, v = args[:3]
    if prefer is not None and prefer not in _BACKENDS[1:]:
        raise ValueError(f"varlen_attention: prefer must be one of {_BACKENDS[1:]}, got {prefer!r}")
    _check_inputs(*args, window, "ref")  # the caller's mistakes surface as such, not as failures
    kw = dict(causal=causal, softmax_scale=softmax_scale, window=window, return_lse=return_lse)
    return guard.call_guarded(
        OP, q.device, attention_shape(q, k, window, causal),
        lambda backend: varlen_attention(*args, **kw, backend=backend),
        tensors=(q, k, v), prefer=prefer, allowed=_OURS if return_lse else None,
    )  # fmt: skip


def _resolve_backend(q: Tensor, backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"varlen_attention: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda else "cpp"
    if backend == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "varlen_attention: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
            "before Triton is imported to run the kernels in the interpreter on CPU"
        )
    if backend == "cpp" and q.device.type != "cpu":
        raise ValueError(f"varlen_attention: backend='cpp' needs CPU tensors, got {q.device}")
    return backend


def _check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, window, backend) -> None:
    """Shapes, dtypes, devices and (on CPU, where it costs no sync) cu_seqlens contents."""
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"varlen_attention: {name} must be a torch.Tensor, got {type(t)}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "varlen_attention: expected q (total_q, H, D) and k, v (total_k, H_kv, D), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"varlen_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match and share "
            f"head_dim with q {tuple(q.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"varlen_attention: q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})"
        )
    if not 1 <= q.shape[2] <= MAX_HEAD_DIM:
        raise ValueError(
            f"varlen_attention: head_dim must be in [1, {MAX_HEAD_DIM}], got {q.shape[2]}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES[backend]:
        raise TypeError(
            f"varlen_attention: q, k, v must share one dtype of {_DTYPES[backend]} for backend "
            f"{backend!r}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device == cu_q.device == cu_k.device):
        raise ValueError(
            f"varlen_attention: all inputs must be on one device, got q {q.device}, k {k.device}, "
            f"v {v.device}, cu_seqlens_q {cu_q.device}, cu_seqlens_k {cu_k.device}"
        )
    if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32:
        raise TypeError(
            f"varlen_attention: cu_seqlens must be int32, got {cu_q.dtype}, {cu_k.dtype}"
        )
    if cu_q.dim() != 1 or cu_q.shape != cu_k.shape or cu_q.numel() < 1:
        raise ValueError(
            "varlen_attention: cu_seqlens_q and cu_seqlens_k must both be (batch+1,), got "
            f"{tuple(cu_q.shape)} and {tuple(cu_k.shape)}"
        )
    if len(window) != 2:
        raise ValueError(f"varlen_attention: window must be (left, right), got {window!r}")
    if q.device.type == "cpu" and not tracing(q, cu_q, cu_k):  # reads values: not when traced
        for name, cu, total, mx in (("q", cu_q, q.shape[0], max_q), ("k", cu_k, k.shape[0], max_k)):
            lens = cu[1:] - cu[:-1]
            if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lens < 0).any()):
                raise ValueError(
                    f"varlen_attention: cu_seqlens_{name} must rise from 0 to total_{name}={total}, "
                    f"got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}"
                )
            if lens.numel() and int(lens.max()) > mx:
                raise ValueError(
                    f"varlen_attention: max_seqlen_{name}={mx} is below the longest segment "
                    f"({int(lens.max())})"
                )


# ----------------------------------------------------------------------------------------
# Backends: (q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right) -> (out, lse), and
# (dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right) -> (dq, dk, dv).


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _cpp_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    from pyfast_tune.kernels.varlen_attention.cpu import load_varlen_attention

    out, lse = load_varlen_attention().fwd(q, k, v, cu_q, cu_k, scale, left, right)
    return out.to(q.dtype), lse.to(_lse_dtype(q))


def _cpp_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right):
    from pyfast_tune.kernels.varlen_attention.cpu import load_varlen_attention

    dq, dk, dv = load_varlen_attention().bwd(
        dout, q, k, v, out, lse, cu_q, cu_k, scale, left, right
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _triton_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    from pyfast_tune.kernels.varlen_attention.triton import varlen_fwd

    return varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right)


def _triton_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right):
    from pyfast_tune.kernels.varlen_attention.triton import varlen_bwd

    return varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right)


def _ref_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    return varlen_attention_ref(
        q, k, v, cu_q, cu_k, max_q, max_k, False, scale, (left, right), True
    )


def _ref_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right):
    return varlen_attention_ref_backward(dout, q, k, v, cu_q, cu_k, False, scale, (left, right))


_FWD = {"cpp": _cpp_fwd, "triton": _triton_fwd, "ref": _ref_fwd}
_BWD = {"cpp": _cpp_bwd, "triton": _triton_bwd, "ref": _ref_bwd}


# ----------------------------------------------------------------------------------------
# The custom ops. ``causal`` is folded into window right = 0 by the Python front.


@torch.library.custom_op("pyfast_tune::varlen_attention", mutates_args=())
def _varlen_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """out (total_q, H, D) q.dtype, lse (H, total_q) float32 (float64 for float64 q)."""
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    faults.before(OP, backend)
    out, lse = _FWD[backend](q, k, v, *args, softmax_scale, window_left, window_right)
    return faults.perturb(OP, backend, out), lse


@_varlen_attention_op.register_fake
def _(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, wl, wr, backend
):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


@torch.library.custom_op("pyfast_tune::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv with the shapes and dtypes of q, k, v."""
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    faults.before(OP, backend)
    grads = _BWD[backend](dout, q, k, v, out, lse, *args, softmax_scale, window_left, window_right)
    return faults.perturb(OP, backend, tuple(grads))


@_varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, wl, wr, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, wl, wr, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale, wl, wr, backend = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.pyfast_tune.varlen_attention_backward(
        dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, wl, wr, backend
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)
