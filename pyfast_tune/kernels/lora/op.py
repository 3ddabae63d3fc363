"""Fused LoRA linear: ``y = x Wᵀ + bias + s · (dropout(x) Aᵀ) Bᵀ``, forward and backward.

One autograd node replaces peft's five (base linear, dropout, lora_A, lora_B, scale-and-add).
W (and bias) are frozen; backward returns dx, dA, dB. Saved for backward: x, ``u = dropout(x)
Aᵀ`` (M × r) and the dropout RNG position (a seed or a generator state) — never the dropout
mask nor the dropped-out copy of x, which backward regenerates.

Backends (``backend=``):

- ``"triton"``: the kernels of ``triton.py`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
  Dropout mask: element (m, k) kept iff ``tl.rand(seed, m*K + k) > p``;
  ``lora_dropout_mask(..., backend="triton")`` reproduces it exactly on any device.
- ``"torch"``: composed PyTorch (BLAS) with in-place epilogues. Dropout mask: the one
  ``torch.nn.functional.dropout`` would draw, i.e. ``bernoulli_(1 - p)`` on a tensor shaped and
  typed like x (cast to the adapter dtype) from a generator: the device's default generator
  when ``seed is None`` (so a patched peft model draws the very masks peft's own ``nn.Dropout``
  draws for the same ``torch.manual_seed``), else ``torch.Generator(device).manual_seed(seed)``.
- ``"auto"``: triton on CUDA (dense or 4-bit W), torch otherwise.

"Same seed" therefore means the same mask *within* a backend; the two backends use different
generators. QLoRA: pass a bitsandbytes ``Params4bit`` (NF4 or FP4, plain or double-quantized)
as W. The Triton kernels dequantize it tile by tile while loading; the torch backend runs the
base product through bitsandbytes' own ``matmul_4bit`` and backward dequantizes W once (as
bitsandbytes' own backward does). Caveat seen with bitsandbytes 0.50 on CPU: its C++ 4-bit
dequantize/gemm mis-index the quantization blocks when in_features is even and not a multiple
of the blocksize (64); the torch backend inherits that (it equals peft there), the Triton
kernels read blocks as the quantizer wrote them (flat over out × in, as bitsandbytes' CUDA and
pure-PyTorch paths do).

>>> import torch
>>> x, W = torch.randn(5, 32), torch.randn(24, 32)
>>> A, B = torch.randn(8, 32, requires_grad=True), torch.zeros(24, 8, requires_grad=True)
>>> y = lora_linear(x, W, A, B, scaling=2.0)
>>> from pyfast_tune.kernels.lora.ref import lora_linear_ref
>>> torch.allclose(y, lora_linear_ref(x, W, A, B, 2.0))
True
"""

from __future__ import annotations

import os
from typing import Any

import torch

from pyfast_tune.kernels.guard import faults

__all__ = ["lora_linear", "lora_dropout_mask", "lora_shape"]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "torch", "triton")
OP = "lora_linear"  # its name for the first-use guard and PYFAST_TUNE_FAULTS


def is_4bit(W: Any) -> bool:
    return getattr(W, "quant_state", None) is not None and not W.dtype.is_floating_point


def _resolve_backend(backend: str, x: torch.Tensor, W: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the environment "
                f"before the first Triton call (got x on {x.device})"
            )
    return backend


def _validate(x, W, A, B, dropout_p, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., in_features)")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be fp32/fp16/bf16, got {x.dtype}")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"A must be (r, in), B (out, r); got {tuple(A.shape)}, {tuple(B.shape)}")
    r, K = A.shape
    N = B.shape[0]
    if x.shape[-1] != K or B.shape[1] != r:
        raise ValueError(
            f"shape mismatch: x (..., {x.shape[-1]}), A {tuple(A.shape)}, B {tuple(B.shape)}; "
            "expected x (..., in), A (r, in), B (out, r)"
        )
    if A.dtype not in _DTYPES or B.dtype != A.dtype:
        raise TypeError(f"A and B must share one float dtype, got {A.dtype} and {B.dtype}")
    if is_4bit(W):
        if tuple(W.quant_state.shape) != (N, K):
            raise ValueError(f"4-bit W holds {tuple(W.quant_state.shape)}, expected ({N}, {K})")
    else:
        if W.dim() != 2 or tuple(W.shape) != (N, K):
            raise ValueError(f"W must be (out, in) = ({N}, {K}), got {tuple(W.shape)}")
        if W.dtype != x.dtype:
            raise TypeError(f"W dtype {W.dtype} must equal x dtype {x.dtype}")
        if W.requires_grad and torch.is_grad_enabled():
            raise ValueError("W must be frozen (requires_grad=False): the op returns no dW")
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
        if bias.requires_grad and torch.is_grad_enabled():
            raise ValueError("bias must be frozen (requires_grad=False): the op returns no dbias")
    devices = {t.device for t in (x, W, A, B) if isinstance(t, torch.Tensor)}
    if len(devices) != 1:
        raise ValueError(f"x, W, A, B must be on one device, got {sorted(map(str, devices))}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


# --- the torch (composed) backend -----------------------------------------------------------


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0]
    if device.type == "cpu":
        return torch.default_generator
    raise NotImplementedError(f"dropout on {device.type} tensors is not supported")


def _torch_noise(
    like: torch.Tensor,
    p: float,
    state: torch.Tensor,
    g: torch.Generator | None = None,
    scaled: bool = True,
) -> torch.Tensor:
    """``bernoulli(1-p)/(1-p)`` shaped like ``like``, drawn from a generator in ``state``.

    The same two calls torch's own (non-fused) CPU dropout makes, so the default generator's
    state yields nn.Dropout's mask. ``g``: draw from this generator (already in ``state``,
    and advanced by the draw) instead of a private copy. ``scaled=False``: the 0/1 mask only.
    """
    if g is None:
        g = torch.Generator(device=like.device)
        g.set_state(state)
    mask = torch.empty_like(like).bernoulli_(1.0 - p, generator=g)
    return mask.div_(1.0 - p) if scaled else mask


def _base_matmul(x2: torch.Tensor, W: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, K) @ Wᵀ (+ bias) -> (M, N) in x's dtype; W dense (N, K) or bitsandbytes 4-bit."""
    if is_4bit(W):
        import bitsandbytes as bnb

        with torch.no_grad():
            return bnb.matmul_4bit(x2, W.t(), bias=bias, quant_state=W.quant_state)
    if bias is not None:
        return torch.addmm(bias, x2, W.t())
    return x2 @ W.t()


def _base_matmul_grad(dy: torch.Tensor, W: Any, quant_state: Any) -> torch.Tensor:
    if quant_state is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dy @ dequantize_4bit(W, quant_state).to(dy.dtype)
    return dy @ W


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, A, B, W, bias, scaling, p, rng, backend):
        """x2: (M, K) -> y: (M, N) x2.dtype. rng: int seed (triton) or (state, generator)."""
        faults.before(OP, backend)
        if backend == "triton":
            from pyfast_tune.kernels.lora import triton as _lora_triton

            qs = W.quant_state if is_4bit(W) else None
            y, u = _lora_triton.lora_fwd(x2, W, A, B, scaling, p, rng, bias, qs)
        else:
            xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
            xd = _torch_noise(xa, p, *rng).mul_(xa) if p > 0.0 else xa
            u = xd @ A.t()  # (M, r)
            del xd
            y = _base_matmul(x2, W, bias)
            if A.dtype == x2.dtype:
                y.addmm_(u, B.t(), alpha=scaling)
            else:  # peft adds the adapter-dtype product to the upcast base output, then casts
                y = torch.addmm(y.to(A.dtype), u, B.t(), alpha=scaling).to(x2.dtype)
        ctx.save_for_backward(x2, u, A, B, W)
        ctx.quant_state = W.quant_state if is_4bit(W) else None
        # backward regenerates the mask from the seed / the generator state, never the generator
        ctx.rng = rng if backend == "triton" or rng is None else rng[0]
        ctx.scaling, ctx.p, ctx.backend = scaling, p, backend
        return faults.perturb(OP, backend, y)

    @staticmethod
    def backward(ctx, dy):
        dx, dA, dB = faults.perturb(OP, ctx.backend, _LoraLinearFn._grads(ctx, dy))
        return dx, dA, dB, None, None, None, None, None, None

    @staticmethod
    def _grads(ctx, dy):
        x2, u, A, B, W = ctx.saved_tensors
        s, p, need_dx = ctx.scaling, ctx.p, ctx.needs_input_grad[0]
        faults.before(OP, ctx.backend)
        if ctx.backend == "triton":
            from pyfast_tune.kernels.lora import triton as _lora_triton

            qs = ctx.quant_state
            return _lora_triton.lora_bwd(dy, x2, W, A, B, u, s, p, ctx.rng, need_dx, qs)
        dya = dy if dy.dtype == A.dtype else dy.to(A.dtype)
        # du = s · dy B, with dropout's 1 / (1 - p) folded in: (M, r) instead of (M, K) work
        du = (dya @ B).mul_(s / (1.0 - p))
        dB = (dya.t() @ u).mul_(s)  # (N, r)
        del dya
        xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
        mask = _torch_noise(xa, p, ctx.rng, scaled=False) if p > 0.0 else None  # 0/1
        dx = None
        if need_dx:
            dx = _base_matmul_grad(dy, W, ctx.quant_state)
            if mask is None and A.dtype == dx.dtype:
                dx.addmm_(du, A)
            elif mask is None:
                dx.add_(du @ A)
            else:
                dx.addcmul_(du @ A, mask)  # dropout's backward, fused into the accumulate
        xd = mask.mul_(xa) if mask is not None else xa  # (x · mask); the mask is done with
        dA = du.t() @ xd  # (r, K)
        return dx, dA, dB


def lora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    seed: int | None = None,
) -> torch.Tensor:
    """Fused LoRA linear ``x Wᵀ + bias + scaling · (dropout(x) Aᵀ) Bᵀ`` with autograd.

    Args:
        x: (..., in) fp32/fp16/bf16.
        W: (out, in) frozen base weight in x's dtype, or a bitsandbytes ``Params4bit``
            (QLoRA) whose ``quant_state.shape`` is (out, in).
        A: (r, in), B: (out, r): adapter weights, one float dtype (may differ from x's, as
            with peft's fp32 adapters on a bf16 model: the low-rank path then runs in A's dtype).
        scaling: lora_alpha / r (peft's ``scaling[adapter]``).
        dropout_p: dropout on the adapter's input; 0 disables it (pass 0 in eval mode).
        bias: (out,) frozen, or None.
        backend: "auto" | "torch" | "triton" (see the module docstring).
        seed: dropout seed; None draws from torch's default generator (see module docstring
            for what a seed means per backend).
    Returns:
        (..., out) in x's dtype. Gradients flow to x, A and B.
    Example:
        >>> x = torch.randn(2, 3, 16); W = torch.randn(8, 16)
        >>> A = torch.randn(4, 16); B = torch.randn(8, 4)
        >>> lora_linear(x, W, A, B, 0.5, dropout_p=0.1, seed=0).shape
        torch.Size([2, 3, 8])
    """
    _validate(x, W, A, B, dropout_p, bias)
    backend = _resolve_backend(backend, x, W)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    p = float(dropout_p)
    rng: Any = 0 if backend == "triton" else None
    if p > 0.0:
        if backend == "triton":
            rng = int(seed) if seed is not None else int(torch.randint(2**31 - 1, ()).item())
        elif seed is None:  # forward draws from (and advances) the default generator
            g = _default_generator(x.device)
            rng = (g.get_state(), g)
        else:
            rng = (torch.Generator(device=x.device).manual_seed(int(seed)).get_state(), None)
    y = _LoraLinearFn.apply(x2, A, B, W, bias, float(scaling), p, rng, backend)
    return y.reshape(*lead, B.shape[0])


def lora_dropout_mask(
    shape: tuple[int, int],
    dropout_p: float,
    seed: int,
    backend: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The keep-mask ``lora_linear(..., dropout_p, seed=seed, backend=backend)`` applies.

    Args:
        shape: (M, in), the flattened x.
        dtype: the adapter dtype (torch backend: the draw is made on a tensor of that dtype).
    Returns:
        (M, in) bool, True where x is kept (then scaled by 1 / (1 - dropout_p)).
    Example:
        >>> lora_dropout_mask((4, 16), 0.1, seed=0, backend="triton").shape
        torch.Size([4, 16])
    """
    if backend == "triton":
        from pyfast_tune.kernels.lora.triton import philox_keep_mask

        return philox_keep_mask(seed, shape[0], shape[1], dropout_p, device)
    if backend == "torch":
        state = torch.Generator(device=device).manual_seed(seed).get_state()
        like = torch.empty(shape, dtype=dtype, device=device)
        return _torch_noise(like, dropout_p, state) != 0
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


def lora_shape(dtype: torch.dtype, A, W_is_4bit: bool) -> dict:
    """The shape class of a LoRA layer call: x's (compute) dtype, the adapter's, rank, 4-bit."""
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "adapter_dtype": str(A.dtype).removeprefix("torch."),
        "rank": int(A.shape[0]),
        "four_bit": bool(W_is_4bit),
    }
