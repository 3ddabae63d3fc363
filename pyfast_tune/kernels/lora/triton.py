"""Triton kernels for the fused LoRA linear ``y = x Wᵀ + bias + s · (dropout(x) Aᵀ) Bᵀ``.

Three launches per training step, each one pass over its big operand:

- ``_lora_fwd_kernel`` (grid M-tiles × N-tiles): the base matmul ``x Wᵀ`` and the low-rank
  ``u = dropout(x) Aᵀ`` share the K loop, so x is read once; the epilogue adds ``s · u Bᵀ`` and
  the bias. ``u`` is recomputed per N-tile (extra work ≈ r / BLOCK_N of the base matmul) instead
  of costing a second pass over x; the first N-tile stores it for backward.
- ``_lora_bwd_dx_kernel`` (grid M-tiles × K-tiles): ``dx = dy W + dropout(s · (dy B) A)``; the
  ``dy B`` product shares the N loop with ``dy W``; the first K-tile stores ``du = s · dy B``.
- ``_lora_bwd_dadb_kernel`` (grid K-tiles + N-tiles): ``dA = duᵀ dropout(x)`` and
  ``dB = s · dyᵀ u``, reduced over M inside one program each (deterministic, no atomics).

Dropout: element (m, k) is kept iff ``tl.rand(seed, m * K + k) > p`` (Philox-4x32, 10 rounds);
the mask is regenerated in backward, never stored. ``philox_keep_mask`` reproduces that mask
bit for bit in plain PyTorch on any device (tests use it to build the reference).

Under ``TRITON_INTERPRET=1`` (no GPU) the tiles are cast to fp32 before ``tl.dot`` (the
interpreter's bf16 dot is wrong) and fp32 -> bf16 stores round to nearest even by hand (the
interpreter truncates).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pyfast_tune.kernels.triton_launch import Launch

__all__ = ["lora_fwd", "lora_bwd", "philox_keep_mask", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The token count, the rank and the dropout seed vary between launches: kept out of the
# specialization so they never cause a recompile (or a binary the aot report did not see).
_RUNTIME = ["M", "R", "seed"]


@triton.jit
def _keep(seed, offs_m, offs_k, K, p):
    # (BM, BK) bool; offsets are int64, so M * K may exceed 2**31.
    return tl.rand(seed, offs_m[:, None] * K + offs_k[None, :]) > p


@triton.jit
def _cast(x, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    # The interpreter converts fp32 -> bf16 by truncation; GPUs round to nearest even. Round
    # explicitly there so interpreter results carry the same rounding as the compiled kernel.
    if INTERPRETED and DTYPE == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _load_w(
    W_ptr, CODE_ptr, ABSMAX_ptr, n_idx, k_idx, stride_w_n, stride_w_k, K, mask,
    W_4BIT: tl.constexpr, QBLOCK: tl.constexpr,
):  # fmt: skip
    """Tile W[n_idx, k_idx] (index tensors broadcast to the tile's shape).

    4-bit (bitsandbytes NF4/FP4): element e = n*K + k sits in byte e // 2 of the packed
    weight (high nibble first); value = code[nibble] * absmax[e // QBLOCK], in fp32.
    """
    if W_4BIT:  # constexpr: only one branch is compiled (the two return different dtypes)
        e = n_idx * K + k_idx
        byte = tl.load(W_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
        nibble = tl.where((e & 1) == 0, byte >> 4, byte & 15)
        code = tl.load(CODE_ptr + nibble, mask=mask, other=0.0)
        w = code * tl.load(ABSMAX_ptr + e // QBLOCK, mask=mask, other=0.0)
    else:
        w = tl.load(W_ptr + n_idx * stride_w_n + k_idx * stride_w_k, mask=mask, other=0.0)
    return w


@triton.jit(do_not_specialize=_RUNTIME)
def _lora_fwd_kernel(
    X_ptr, W_ptr, CODE_ptr, ABSMAX_ptr, A_ptr, B_ptr, BIAS_ptr, Y_ptr, U_ptr,
    M, N, K, R,
    stride_x_tok, stride_x_k, stride_w_n, stride_w_k, stride_a_r, stride_a_k,
    stride_b_n, stride_b_r, stride_y_tok, stride_y_n, stride_u_tok, stride_u_r,
    scaling, p, seed,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, W_4BIT: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            X_ptr + offs_m[:, None] * stride_x_tok + offs_k[None, :] * stride_x_k,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )  # fmt: skip
        w = _load_w(
            W_ptr, CODE_ptr, ABSMAX_ptr, offs_n[None, :], offs_k[:, None], stride_w_n,
            stride_w_k, K, mask_k[:, None] & mask_n[None, :], W_4BIT, QBLOCK,
        )  # fmt: skip
        w = _cast(w, X_ptr.dtype.element_ty, FP32_DOT)  # 4-bit: dequantized to x's dtype
        a = tl.load(
            A_ptr + offs_k[:, None] * stride_a_k + offs_r[None, :] * stride_a_r,
            mask=mask_k[:, None] & mask_r[None, :], other=0.0,
        )  # fmt: skip
        if FP32_DOT:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            a = a.to(tl.float32)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, offs_m, offs_k, K, p), x, 0.0)
        acc_u += tl.dot(x.to(a.dtype), a, input_precision=DOT_PRECISION)

    if HAS_DROPOUT:
        acc_u = acc_u * (1.0 / (1.0 - p))
    # u is rounded to the adapter dtype exactly as the composed computation rounds it.
    u = _cast(acc_u, U_ptr.dtype.element_ty, FP32_DOT)
    b = tl.load(
        B_ptr + offs_r[:, None] * stride_b_r + offs_n[None, :] * stride_b_n,
        mask=mask_r[:, None] & mask_n[None, :], other=0.0,
    )  # fmt: skip
    if FP32_DOT:
        u_dot = u.to(tl.float32)
        b = b.to(tl.float32)
    else:
        u_dot = u
    acc += scaling * tl.dot(u_dot, b, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        Y_ptr + offs_m[:, None] * stride_y_tok + offs_n[None, :] * stride_y_n,
        _cast(acc, Y_ptr.dtype.element_ty, FP32_DOT), mask=mask_m[:, None] & mask_n[None, :],
    )  # fmt: skip
    if pid_n == 0:
        tl.store(
            U_ptr + offs_m[:, None] * stride_u_tok + offs_r[None, :] * stride_u_r,
            u, mask=mask_m[:, None] & mask_r[None, :],
        )  # fmt: skip


@triton.jit(do_not_specialize=_RUNTIME)
def _lora_bwd_dx_kernel(
    DY_ptr, W_ptr, CODE_ptr, ABSMAX_ptr, A_ptr, B_ptr, DX_ptr, DU_ptr,
    M, N, K, R,
    stride_dy_tok, stride_dy_n, stride_w_n, stride_w_k, stride_a_r, stride_a_k,
    stride_b_n, stride_b_r, stride_dx_tok, stride_dx_k, stride_du_tok, stride_du_r,
    scaling, p, seed,
    HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    W_4BIT: tl.constexpr, QBLOCK: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask_r = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(
            DY_ptr + offs_m[:, None] * stride_dy_tok + offs_n[None, :] * stride_dy_n,
            mask=mask_m[:, None] & mask_n[None, :], other=0.0,
        )  # fmt: skip
        if NEED_DX:
            w = _load_w(
                W_ptr, CODE_ptr, ABSMAX_ptr, offs_n[:, None], offs_k[None, :], stride_w_n,
                stride_w_k, K, mask_n[:, None] & mask_k[None, :], W_4BIT, QBLOCK,
            )  # fmt: skip
            w = _cast(w, DY_ptr.dtype.element_ty, FP32_DOT)
        b = tl.load(
            B_ptr + offs_n[:, None] * stride_b_n + offs_r[None, :] * stride_b_r,
            mask=mask_n[:, None] & mask_r[None, :], other=0.0,
        )  # fmt: skip
        if FP32_DOT:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        if NEED_DX:
            acc += tl.dot(dy, w.to(dy.dtype), input_precision=DOT_PRECISION)
        acc_du += tl.dot(dy.to(b.dtype), b, input_precision=DOT_PRECISION)

    du = acc_du * scaling
    if NEED_DX:
        a = tl.load(
            A_ptr + offs_r[:, None] * stride_a_r + offs_k[None, :] * stride_a_k,
            mask=mask_r[:, None] & mask_k[None, :], other=0.0,
        )  # fmt: skip
        if DOT_PRECISION == "ieee":  # fp32 (and the interpreter): exact fp32 products
            dxl = tl.dot(du, a.to(tl.float32), input_precision="ieee")
        else:  # tensor cores, du rounded to the adapter dtype as peft's autograd rounds it
            dxl = tl.dot(du.to(a.dtype), a, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            dxl = tl.where(_keep(seed, offs_m, offs_k, K, p), dxl * (1.0 / (1.0 - p)), 0.0)
        acc += dxl
        tl.store(
            DX_ptr + offs_m[:, None] * stride_dx_tok + offs_k[None, :] * stride_dx_k,
            _cast(acc, DX_ptr.dtype.element_ty, FP32_DOT), mask=mask_m[:, None] & mask_k[None, :],
        )  # fmt: skip

    if pid_k == 0:
        tl.store(
            DU_ptr + offs_m[:, None] * stride_du_tok + offs_r[None, :] * stride_du_r,
            du, mask=mask_m[:, None] & mask_r[None, :],
        )  # fmt: skip


@triton.jit(do_not_specialize=_RUNTIME)
def _lora_bwd_dadb_kernel(
    X_ptr, DY_ptr, U_ptr, DU_ptr, DA_ptr, DB_ptr,
    M, N, K, R,
    stride_x_tok, stride_x_k, stride_dy_tok, stride_dy_n, stride_u_tok, stride_u_r,
    stride_du_tok, stride_du_r, stride_da_r, stride_da_k, stride_db_n, stride_db_r,
    scaling, p, seed,
    HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # fp32 inputs (and the interpreter) reduce in exact fp32 (DOT_PRECISION "ieee": FMA units,
    # small tiles); 16-bit inputs run on tensor cores with du and u rounded to x's dtype, the
    # rounding peft's autograd applies to the same products.
    # The two branches name their values apart: Triton types every name bound in both.
    pid = tl.program_id(0)
    n_k_tiles = tl.cdiv(K, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if pid < n_k_tiles:
        # dA[:, k-tile] = duᵀ · dropout(x)[:, k-tile]
        offs_k = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        acc_da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            mask_m = offs_m < M
            du = tl.load(
                DU_ptr + offs_m[:, None] * stride_du_tok + offs_r[None, :] * stride_du_r,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0,
            )  # fmt: skip
            x = tl.load(
                X_ptr + offs_m[:, None] * stride_x_tok + offs_k[None, :] * stride_x_k,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )  # fmt: skip
            if HAS_DROPOUT:
                x = tl.where(_keep(seed, offs_m, offs_k, K, p), x, 0.0)
            if DOT_PRECISION == "ieee":
                acc_da += tl.dot(tl.trans(du), x.to(tl.float32), input_precision="ieee")
            else:
                acc_da += tl.dot(tl.trans(du.to(x.dtype)), x, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            acc_da = acc_da * (1.0 / (1.0 - p))
        tl.store(
            DA_ptr + offs_r[:, None] * stride_da_r + offs_k[None, :] * stride_da_k,
            _cast(acc_da, DA_ptr.dtype.element_ty, FP32_DOT), mask=mask_r[:, None] & mask_k[None, :],
        )  # fmt: skip
    else:
        # dB[n-tile, :] = s · dy[:, n-tile]ᵀ · u
        offs_n = (pid - n_k_tiles).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc_db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            mask_m = offs_m < M
            dy = tl.load(
                DY_ptr + offs_m[:, None] * stride_dy_tok + offs_n[None, :] * stride_dy_n,
                mask=mask_m[:, None] & mask_n[None, :], other=0.0,
            )  # fmt: skip
            u = tl.load(
                U_ptr + offs_m[:, None] * stride_u_tok + offs_r[None, :] * stride_u_r,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0,
            )  # fmt: skip
            if DOT_PRECISION == "ieee":
                acc_db += tl.dot(
                    tl.trans(dy.to(tl.float32)), u.to(tl.float32), input_precision="ieee"
                )
            else:
                acc_db += tl.dot(tl.trans(dy), u.to(dy.dtype), input_precision=DOT_PRECISION)
        tl.store(
            DB_ptr + offs_n[:, None] * stride_db_n + offs_r[None, :] * stride_db_r,
            _cast(acc_db * scaling, DB_ptr.dtype.element_ty, FP32_DOT), mask=mask_n[:, None] & mask_r[None, :],
        )  # fmt: skip


def launch_config(kernel: str, dtype: torch.dtype, rank: int, arch: int | None) -> dict:
    """Tiles, warps and stages of one LoRA kernel for (dtype, rank, GPU arch).

    ``arch``: compute capability as major*10+minor (80, 90), None for the interpreter. Every
    entry is spill-free and within shared memory on sm_80/sm_90
    (``python -m pyfast_tune.kernels.aot --only lora``; a default test holds it to that).
    tl.dot needs every tile dim >= 16, so BLOCK_R is the rank rounded up to a power of two.

    Returns:
        dict(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, num_warps, num_stages).
    """
    block_r = max(16, triton.next_power_of_2(rank))
    if arch is None:
        # The interpreter's cost is per op, not per element: tall M tiles mean fewer programs
        # (and fewer Philox evaluations); N and K tiles stay small so tests cross tile edges.
        return dict(BLOCK_M=256, BLOCK_N=32, BLOCK_K=32, BLOCK_R=block_r, num_warps=4,
                    num_stages=1)  # fmt: skip
    if dtype == torch.float32:
        # IEEE fp32 products run on the FMA units with operands in registers: small tiles.
        bm, bn, bk, warps = {
            "fwd": (16, 16, 32, 8),
            "bwd_dx": (32, 32, 16, 4),
            "bwd_dadb": (32, 32, 32, 8),
        }[kernel]
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, num_warps=warps,
                    num_stages=1)  # fmt: skip
    # A rank of 64+ makes the (BLOCK_M, BLOCK_R) fp32 accumulator as large as the output
    # tile's: twice the warps share it.
    wide = block_r >= 64
    bm, bn = 64, 64
    if kernel == "bwd_dx":  # dy, W (or its 4-bit codes), B tiles and two accumulators live
        bm, bn = (32, 64) if wide else (64, 32)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, BLOCK_R=block_r,
                num_warps=8 if wide else 4, num_stages=3)  # fmt: skip


MAX_RANK = 128  # larger ranks run the torch backend (BLOCK_R tiles would not fit registers)


def _arch(t: torch.Tensor) -> int | None:
    if INTERPRET or t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


def _dot_precision(dtype: torch.dtype, arch: int | None) -> str:
    # fp32 inputs would otherwise run as tf32 on GPU and lose to torch's fp32 matmul.
    return "ieee" if (arch is None or dtype == torch.float32) else "tf32"


def _weight_args(W: torch.Tensor, quant_state) -> tuple:
    """(W, code, absmax, stride_n, stride_k, W_4BIT, QBLOCK) kernel arguments.

    4-bit: W is bitsandbytes' packed uint8 weight; code (16,) fp32 is the NF4/FP4 table and
    absmax (ceil(N*K / blocksize),) fp32 the per-block scales, double-quantized ones expanded
    here (a tiny tensor) exactly as ``bitsandbytes.functional.dequantize_4bit`` does.
    """
    if quant_state is None:
        return W, W, W, W.stride(0), W.stride(1), False, 1
    absmax = quant_state.absmax
    if quant_state.nested:
        from bitsandbytes.functional import dequantize_blockwise

        absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2)
        absmax += quant_state.offset
    packed = W.reshape(-1)
    code = quant_state.code.to(device=W.device, dtype=torch.float32)
    absmax = absmax.to(device=W.device, dtype=torch.float32)
    return packed, code, absmax, 0, 0, True, quant_state.blocksize


def _labels(x, A, R, w_4bit, p, bias=None) -> dict:
    return dict(dtype=str(x.dtype).removeprefix("torch."),
                shape=dict(rank=R, adapter=str(A.dtype).removeprefix("torch."), w_4bit=w_4bit,
                           dropout=p > 0.0, bias=bias is not None))  # fmt: skip


def fwd_launch(x, wargs, A, B, bias, y, u, scaling, p, seed, arch) -> Launch:
    """The forward launch (``lora_fwd``); ``wargs`` from ``_weight_args``."""
    M, K = x.shape
    N, R = B.shape
    W, code, absmax, stride_w_n, stride_w_k, w_4bit, qblock = wargs
    cfg = launch_config("fwd", x.dtype, R, arch)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    args = (
        x, W, code, absmax, A, B, bias if bias is not None else y, y, u,
        M, N, K, R,
        x.stride(0), x.stride(1), stride_w_n, stride_w_k, A.stride(0), A.stride(1),
        B.stride(0), B.stride(1), y.stride(0), y.stride(1), u.stride(0), u.stride(1),
        float(scaling), float(p), int(seed),
    )  # fmt: skip
    meta = dict(
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, FP32_DOT=arch is None,
        DOT_PRECISION=_dot_precision(x.dtype, arch), W_4BIT=w_4bit, QBLOCK=qblock, **cfg,
    )  # fmt: skip
    return Launch(_lora_fwd_kernel, grid, args, meta, _labels(x, A, R, w_4bit, p, bias))


def bwd_launches(dy, x, wargs, A, B, u, du, dx, dA, dB, scaling, p, seed, arch) -> list[Launch]:
    """The two backward launches (``lora_bwd``); ``dx`` None when not needed."""
    M, K = x.shape
    N, R = B.shape
    W, code, absmax, stride_w_n, stride_w_k, w_4bit, qblock = wargs
    cfg = launch_config("bwd_dx", x.dtype, R, arch)
    need_dx = dx is not None
    # The dx kernel also produces du; without dx it only computes du (grid of one K-tile).
    dx_buf = dx if need_dx else du
    labels = _labels(x, A, R, w_4bit, p)
    dx_args = (
        dy, W, code, absmax, A, B, dx_buf, du,
        M, N, K, R,
        dy.stride(0), dy.stride(1), stride_w_n, stride_w_k, A.stride(0), A.stride(1),
        B.stride(0), B.stride(1), dx_buf.stride(0), dx_buf.stride(1), du.stride(0), du.stride(1),
        float(scaling), float(p), int(seed),
    )  # fmt: skip
    dx_meta = dict(
        HAS_DROPOUT=p > 0.0, FP32_DOT=arch is None, DOT_PRECISION=_dot_precision(x.dtype, arch),
        W_4BIT=w_4bit, QBLOCK=qblock, NEED_DX=need_dx, **cfg,
    )  # fmt: skip
    dx_grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]) if need_dx else 1)
    cfg = launch_config("bwd_dadb", x.dtype, R, arch)
    ab_args = (
        x, dy, u, du, dA, dB,
        M, N, K, R,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), u.stride(0), u.stride(1),
        du.stride(0), du.stride(1), dA.stride(0), dA.stride(1), dB.stride(0), dB.stride(1),
        float(scaling), float(p), int(seed),
    )  # fmt: skip
    ab_meta = dict(HAS_DROPOUT=p > 0.0, FP32_DOT=arch is None,
                   DOT_PRECISION=_dot_precision(x.dtype, arch), **cfg)  # fmt: skip
    ab_grid = (triton.cdiv(K, cfg["BLOCK_K"]) + triton.cdiv(N, cfg["BLOCK_N"]),)
    return [
        Launch(
            _lora_bwd_dx_kernel,
            dx_grid,
            dx_args,
            dx_meta,
            {**labels, "shape": {**labels["shape"], "need_dx": need_dx}},
        ),  # fmt: skip
        Launch(_lora_bwd_dadb_kernel, ab_grid, ab_args, ab_meta, labels),
    ]


def lora_fwd(
    x: torch.Tensor,
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    bias: torch.Tensor | None,
    quant_state=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        x: (M, K) fp32/fp16/bf16, any strides.
        W: (N, K) same dtype as x; or, with ``quant_state`` (bitsandbytes QuantState of shape
            (N, K)), the packed 4-bit weight ((N*K+1)//2 uint8).
        A: (r, K), B: (N, r): the adapter dtype (may differ from x's); r <= MAX_RANK.
        bias: (N,) or None.
    Returns:
        y: (M, N) x.dtype; u: (M, r) A.dtype, ``dropout(x) Aᵀ`` (saved for backward).
    """
    M, _ = x.shape
    N, R = B.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    u = torch.empty((M, R), device=x.device, dtype=A.dtype)
    if M == 0:
        return y, u
    wargs = _weight_args(W, quant_state)
    fwd_launch(x, wargs, A, B, bias, y, u, scaling, dropout_p, seed, _arch(x))()
    return y, u


def lora_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    need_dx: bool,
    quant_state=None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels.

    Args:
        dy: (M, N) x.dtype; x: (M, K); W: (N, K) or packed 4-bit with ``quant_state`` (see
            ``lora_fwd``); A: (r, K); B: (N, r); u: (M, r) from forward.
    Returns:
        dx: (M, K) x.dtype or None when not needed; dA: (r, K) and dB: (N, r) in A.dtype.
    """
    M, _ = x.shape
    _, R = B.shape
    du = torch.empty((M, R), device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if need_dx else None
    dA = torch.empty_like(A)
    dB = torch.empty_like(B)
    if M == 0:
        return dx, dA.zero_(), dB.zero_()
    wargs = _weight_args(W, quant_state)
    args = (dy, x, wargs, A, B, u, du, dx, dA, dB, scaling, dropout_p, seed, _arch(x))
    for launch in bwd_launches(*args):
        launch()
    return dx, dA, dB


class _Nf4State:
    """Just what ``_weight_args`` reads of a bitsandbytes QuantState (blocksize 64, not nested)."""

    def __init__(self, n_blocks: int):
        self.absmax = torch.zeros(n_blocks, dtype=torch.float32)
        self.code = torch.zeros(16, dtype=torch.float32)
        self.nested, self.blocksize = False, 64


def aot_launches(arch: int) -> list[Launch]:
    """Every launch configuration of the LoRA kernels on ``arch``: x dtype bf16/fp16/fp32,
    rank classes 8/16/32/64/128 (BLOCK_R 16..128), dropout on and off, a float or an NF4 base
    weight, bias on (the superset of the epilogue), dx needed or not (frozen first layer).
    Small CPU tensors stand in for device tensors: dtypes, strides and alignment are what a
    (4096 x 4096) projection passes."""
    launches = []
    M, N, K = 64, 4096, 4096
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rank in (8, 16, 32, 64, 128):
            for w_4bit in (False, True):
                if w_4bit and dtype == torch.float32:
                    continue  # QLoRA computes in bf16/fp16
                for p in (0.0, 0.1):
                    x = torch.empty_strided((M, K), (K, 1), dtype=dtype)
                    W = torch.empty_strided((N, K), (K, 1), dtype=dtype)
                    if w_4bit:
                        W = torch.zeros(N * K // 2, dtype=torch.uint8)
                        wargs = _weight_args(W, _Nf4State(N * K // 64))
                    else:
                        wargs = _weight_args(W, None)
                    A = torch.zeros((rank, K), dtype=dtype)
                    B = torch.zeros((N, rank), dtype=dtype)
                    bias = torch.zeros(N, dtype=dtype)
                    y = torch.empty((M, N), dtype=dtype)
                    u = torch.empty((M, rank), dtype=dtype)
                    launches.append(fwd_launch(x, wargs, A, B, bias, y, u, 2.0, p, 0, arch))
                    du = torch.empty((M, rank), dtype=torch.float32)
                    for dx in (torch.empty_like(x), None):
                        bufs = (y, x, wargs, A, B, u, du, dx, A.clone(), B.clone())
                        found = bwd_launches(*bufs, 2.0, p, 0, arch)
                        launches += found if dx is not None else found[:1]
    return launches


# --- Philox in plain PyTorch: the mask tl.rand(seed, m * K + k) > p, bit for bit -----------

_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for uint32 values held in int64 (no int64 overflow)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi, p_lo = a_hi * b, a_lo * b  # each < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox_keep_mask(
    seed: int, M: int, K: int, p: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The dropout keep-mask the Triton kernels use, computed with PyTorch integer ops.

    Element (m, k) is kept iff Triton's ``tl.rand(seed, m * K + k) > p`` (Philox-4x32-10 on the
    counter (offset_lo, offset_hi, 0, 0) with key (seed_lo, seed_hi); uniform = the first word
    as int32, folded to non-negative and scaled by 4.6566127342e-10 in fp32).

    Returns:
        (M, K) bool, True where the element is kept.
    Example:
        >>> philox_keep_mask(0, 2, 3, 0.5).shape
        torch.Size([2, 3])
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    off = torch.arange(M * K, device=device, dtype=torch.int64)
    c0, c1 = off & _M32, (off >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    folded = torch.where(signed < 0, -signed - 1, signed)
    uniform = folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    return (uniform > torch.tensor(p, dtype=torch.float32)).reshape(M, K)
