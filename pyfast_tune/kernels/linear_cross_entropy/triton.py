"""Triton row kernel of the fused linear cross-entropy (``linear_cross_entropy``, backend triton).

The chunk loop (``op._chunked``) forms each slab of logits z (rows ×
vocabulary block, the input dtype) with a torch matmul and hands it here. One program per row:

1. unless the row's log-sum-exp is given (a later vocabulary block), an online max / sum-exp
   over BLOCK_V-wide column blocks (Milakov & Gimelshein 2018) gives lse, and the row's target
   logit is read (0 when the target lies outside this slab);
2. if asked, a second sweep overwrites z with ``g * (softmax(z) - onehot(target)) * cap'`` in
   z's dtype — the gradient of ``g * ce`` w.r.t. the raw logits — so grad_hidden = dz @ W and
   grad_weight += dzᵀ @ h stay torch matmuls (as Liger-Kernel does).

All arithmetic is fp32 whatever z's dtype. ``cap'`` is the derivative of Gemma 2's soft cap
``c * tanh(z / c)``, ``1 - tanh²``. There is no ``tl.dot`` here, so the interpreter runs the
same code as the GPU (bf16 dots are what the interpreter gets wrong). Row offsets are int64:
a 152k vocabulary passes 2^31 elements after 14k rows.

``aot_launches(arch)`` lists every launch configuration for the
ahead-of-time compile report (``python -m pyfast_tune.kernels.aot``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest column block: 2048 over 8 warps, 8 values per thread. At 4096 (over 8 or 16 warps)
# ptxas spills one register of the soft-capped bf16/fp16 variants on sm_90; 2048 compiles
# spill-free for every configuration on sm_80 and sm_90 (cuobjdump: STACK 0, no STL/LDL).
MAX_BLOCK_V = 2048
NUM_WARPS = 8
NUM_STAGES = 1  # a streaming loop with no dot: nothing to pipeline
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _tanh(x):
    """tanh accurate near 0 too, from exp/log only (the interpreter has no libdevice.tanh).

    tanh|x| = -m / (2 + m) with m = expm1(-2|x|), and expm1 by Kahan's trick
    (e - 1) * u / log(e), exact where e = exp(u) rounds to 1. |x| is clamped at 20, where
    tanh is 1 in fp32, so e never underflows to 0.
    """
    a = tl.minimum(tl.abs(x), 20.0)
    u = -2.0 * a
    e = tl.exp(u)
    one = e == 1.0
    m = tl.where(one, u, (e - 1.0) * u / tl.where(one, -1.0, tl.log(e)))
    t = -m / (2.0 + m)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        return softcap * _tanh(x / softcap)
    return x


@triton.jit
def _lce_rows_kernel(
    Z_ptr, Tgt_ptr, G_ptr, LSE_ptr, ZT_ptr,
    stride_z_row, n_cols, softcap,
    HAS_SOFTCAP: tl.constexpr, LSE_GIVEN: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = Z_ptr + row * stride_z_row
    tgt = tl.load(Tgt_ptr + row)
    in_slab = (tgt >= 0) & (tgt < n_cols)
    cols = tl.arange(0, BLOCK_V)
    if LSE_GIVEN:
        lse = tl.load(LSE_ptr + row)
    else:
        zt = tl.load(z_row + tl.where(in_slab, tgt, 0)).to(tl.float32)
        zt = tl.where(in_slab, _capped(zt, softcap, HAS_SOFTCAP), 0.0)
        m = -float("inf")
        d = 0.0
        for v0 in range(0, n_cols, BLOCK_V):
            offs = v0 + cols
            mask = offs < n_cols
            x = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.where(mask, _capped(x, softcap, HAS_SOFTCAP), -float("inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(d)
        tl.store(LSE_ptr + row, lse)
        tl.store(ZT_ptr + row, zt)
    if WRITE_GRAD:
        g = tl.load(G_ptr + row)
        for v0 in range(0, n_cols, BLOCK_V):
            offs = v0 + cols
            mask = offs < n_cols
            y = _capped(tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32), softcap,
                        HAS_SOFTCAP)  # fmt: skip
            dz = g * (tl.exp(y - lse) - tl.where(offs == tgt, 1.0, 0.0))
            if HAS_SOFTCAP:
                t = y / softcap
                dz = dz * (1.0 - t * t)
            tl.store(z_row + offs, dz.to(Z_ptr.dtype.element_ty), mask=mask)


def _block_v(n_cols: int) -> int:
    return min(MAX_BLOCK_V, max(16, triton.next_power_of_2(n_cols)))


def rows_launch(z, tgt, g, lse, out_lse, out_zt, softcap: float):
    """(kernel, grid, args, meta, labels) of one row-kernel launch; ``lce_rows`` runs it and
    ``aot_launches`` hands the same tuple to the compile report."""
    rows, n = z.shape
    lse_given = lse is not None
    args = (
        z, tgt, g if g is not None else out_lse, out_lse, out_zt,
        z.stride(0), n, float(softcap),
    )  # fmt: skip
    meta = dict(
        HAS_SOFTCAP=bool(softcap), LSE_GIVEN=lse_given, WRITE_GRAD=g is not None,
        BLOCK_V=_block_v(n), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    labels = dict(dtype=str(z.dtype).removeprefix("torch."), shape=f"rows x {n}")
    return _lce_rows_kernel, (rows,), args, meta, labels


def lce_rows(z, tgt, g, lse, softcap: float):
    """The row step of ``_chunked`` on one slab (see ``linear_cross_entropy._chunked``).

    z: (rows, n) fp32/fp16/bf16, unit column stride; tgt: (rows,) int64 (outside [0, n):
    not in this slab); g: (rows,) fp32 or None; lse: (rows,) fp32 or None.
    Returns (lse, zt) fp32 (zt is None when lse was given).
    """
    rows, n = z.shape
    if z.stride(1) != 1:
        raise ValueError("lce_rows: z must have unit column stride")
    if rows == 0:
        return z.new_zeros(0, dtype=torch.float32), z.new_zeros(0, dtype=torch.float32)
    lse_given = lse is not None
    out_lse = lse if lse_given else z.new_empty(rows, dtype=torch.float32)
    out_zt = out_lse if lse_given else z.new_empty(rows, dtype=torch.float32)
    if g is not None:
        g = g.to(torch.float32).contiguous()
    kernel, grid, args, meta, _ = rows_launch(z, tgt.contiguous(), g, lse, out_lse, out_zt, softcap)
    kernel[grid](*args, **meta)
    return out_lse, (None if lse_given else out_zt)


def aot_launches(arch: int) -> list:
    """Every launch configuration of the row kernel, as ``pyfast_tune.kernels.triton_launch.Launch``
    objects for the compile report (``python -m pyfast_tune.kernels.aot --only lce``).

    The three variants (lse and gradient in one launch: the whole vocabulary in one slab;
    lse only / gradient given lse: vocabulary blocks), with and without soft cap, for each
    input dtype, on a slab of a Qwen-sized vocabulary (151,936 columns: the widest column
    block; vocabularies under 2048 get narrower blocks with fewer registers live). The
    configuration does not depend on ``arch``. Small CPU tensors stand in for device ones.
    """
    from pyfast_tune.kernels.triton_launch import Launch

    rows, n = 4, 151_936
    launches = []
    for dtype in _DTYPES:
        z = torch.empty((rows, n), dtype=dtype)
        tgt = torch.zeros(rows, dtype=torch.int64)
        f32 = [torch.zeros(rows, dtype=torch.float32) for _ in range(3)]
        for lse_given, write_grad in ((False, True), (False, False), (True, True)):
            for softcap in (0.0, 30.0):
                lse = f32[0] if lse_given else None
                g = f32[1] if write_grad else None
                launch = rows_launch(z, tgt, g, lse, f32[0], f32[2], softcap)
                launches.append(Launch(*launch))
    return launches
