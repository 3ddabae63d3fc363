"""Triton kernels for varlen flash attention (flash-attention-2 algorithm), forward and backward.

Layout as flash-attn's varlen API: q (total_q, H, D), k/v (total_k, H_kv, D), cu_seqlens int32
(B+1,); lse and the backward's Delta are (H, total_q) float32. One program handles one block
of rows of one (segment, head); programs past a segment's end exit at once, so the grid is
sized by max_seqlen, not by the pack. Row offsets are int64: a 1M-token pack with H·D = 8192
already passes 2^31 elements.

What keeps the kernels inside the register file (``python -m pyfast_tune.kernels.aot`` shows
registers, spills and shared memory per configuration for sm_80/sm_90):
- scores live in base 2: ``log2(e)`` is folded into the softmax scale once, so the inner loop
  runs ``exp2`` (one MUFU op) and the natural-log lse is converted once at the end;
- the causal/window/bounds mask is built only for the key blocks that need it. Each row block
  visits its key blocks in three runs — masked blocks before the band every row sees in full,
  the full blocks (no mask, no bounds, no ``-inf`` guard), masked blocks after it — so a long
  causal segment masks one diagonal block per row block instead of all of them;
- tile sizes, warps and pipeline stages come from one table per (arch, dtype, head dim),
  ``launch_config``, which the launcher and the aot report both read.

Backward strategy (Dao 2023, §3.2; the Triton tutorial's fused-attention backward does the
same): a Delta = rowsum(dO ∘ O) pre-pass, then two kernels —
- ``_varlen_attn_bwd_dkdv_kernel``: one program per key block, loops over the query blocks
  that can see it, accumulating dK and dV in registers;
- ``_varlen_attn_bwd_dq_kernel``: one program per query block, loops over its key blocks,
  accumulating dQ in registers.
The split recomputes QKᵀ and dO·Vᵀ once more (~7 instead of 5 block matmuls per tile) in
exchange for: no fp32 atomics (bf16/fp32 atomic adds are unavailable in the interpreter and
slow under contention on GPU), no zero-initialised fp32 dQ buffer and no conversion pass,
and bitwise-deterministic gradients — which the project's reproducibility promise needs.
For GQA each q head writes its own dK/dV slice into an fp32 (total_k, H, D) buffer that is
summed over the group afterwards, again instead of atomics.

``DOT_FP32``: under TRITON_INTERPRET=1 bf16 ``tl.dot`` returns garbage, so operands are cast
to fp32 there; on GPU fp32 inputs use IEEE fp32 dots (not TF32) so the fp32 path is as
accurate as PyTorch's, and fp16/bf16 use tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pyfast_tune.kernels.triton_launch import Launch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # host side: folded into the scale passed to the kernels
_LOG2E = tl.constexpr(1.4426950408889634)  # kernel side (Triton reads constexpr globals only)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _visible(rows, cols, Lq, Lk, window_left, window_right):
    """(rows, cols) mask of flash-attn varlen semantics; rows/cols are segment positions."""
    diag = rows[:, None] + (Lk - Lq)
    ok = (rows[:, None] < Lq) & (cols[None, :] < Lk)
    ok &= (window_right < 0) | (cols[None, :] <= diag + window_right)
    ok &= (window_left < 0) | (cols[None, :] >= diag - window_left)
    return ok


@triton.jit
def _key_runs(m0, Lq, Lk, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block runs of query rows m0 .. m0+BLOCK_M-1: [lo, fs) masked, [fs, fe) full, [fe, hi)
    masked. A full block lies inside every valid row's visible band and inside the segment;
    padding rows past Lq (q = 0, never stored) need no mask, so the last row block runs
    unmasked too."""
    off = Lk - Lq
    last = tl.minimum(m0 + BLOCK_M, Lq) - 1
    # union of the rows' bands: keys some row of the block may see
    lo = tl.where(window_left >= 0, tl.maximum(m0 + off - window_left, 0), 0)
    hi = tl.where(window_right >= 0, tl.minimum(last + off + window_right + 1, Lk), Lk)
    hi = tl.maximum(hi, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    # intersection: keys every row of the block sees
    in_lo = tl.where(window_left >= 0, tl.maximum(last + off - window_left, 0), 0)
    in_hi = tl.where(window_right >= 0, tl.minimum(m0 + off + window_right + 1, Lk), Lk)
    fs = tl.minimum(tl.maximum(tl.cdiv(in_lo, BLOCK_N) * BLOCK_N, lo), hi)
    fe = tl.minimum(tl.maximum((tl.maximum(in_hi, 0) // BLOCK_N) * BLOCK_N, fs), hi)
    return lo, fs, fe, hi


@triton.jit
def _fwd_run(
    acc, l_i, m_i, q, k_base, v_base, stride_k_tok, stride_v_tok, rows, lo, hi, Lq, Lk,
    qk_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks lo, lo+BLOCK_N, .. < hi (scores in base 2)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kt_ptr = k_base + cols[None, :].to(tl.int64) * stride_k_tok + offs_d[:, None]
        v_ptr = v_base + cols[:, None].to(tl.int64) * stride_v_tok + offs_d[None, :]
        if MASKED:
            kt = tl.load(
                kt_ptr, mask=(cols[None, :] < Lk) & (offs_d[:, None] < HEAD_DIM), other=0.0
            )
        elif HEAD_DIM == BLOCK_D:
            kt = tl.load(kt_ptr)
        else:
            kt = tl.load(kt_ptr, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        s = _dot(q, kt, DOT_FP32) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            s = tl.where(_visible(rows, cols, Lq, Lk, window_left, window_right), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # row saw nothing yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptr, mask=(cols[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif HEAD_DIM == BLOCK_D:
            v = tl.load(v_ptr)
        else:
            v = tl.load(v_ptr, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new
    return acc, l_i, m_i


# Window sizes, the GQA ratio and the token count change between launches: kept out of the
# specialization (Triton would otherwise compile separate binaries for 0, 1 and multiples of
# 16), so one binary per (dtype, head dim) serves every mask and head layout.
_RUNTIME = ["window_left", "window_right", "group"]


@triton.jit(do_not_specialize=_RUNTIME)
def _varlen_attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, LSE_ptr, CU_Q_ptr, CU_K_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head, stride_lse_head,
    qk_scale, window_left, window_right, group,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """One query block of one (segment, head). ``qk_scale`` = softmax scale · log2(e)."""
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(CU_Q_ptr + b)
    k_start = tl.load(CU_K_ptr + b)
    Lq = tl.load(CU_Q_ptr + b + 1) - q_start
    Lk = tl.load(CU_K_ptr + b + 1) - k_start
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:
        return
    hk = h // group
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (rows[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    q_tok = q_start.to(tl.int64) + rows  # int64: global token index
    q = tl.load(
        Q_ptr + q_tok[:, None] * stride_q_tok + h * stride_q_head + offs_d[None, :],
        mask=io_mask,
        other=0.0,
    )
    k_base = K_ptr + k_start.to(tl.int64) * stride_k_tok + hk * stride_k_head
    v_base = V_ptr + k_start.to(tl.int64) * stride_v_tok + hk * stride_v_head
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, fs, fe, hi = _key_runs(m0, Lq, Lk, window_left, window_right, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_run(
        acc, l_i, m_i, q, k_base, v_base, stride_k_tok, stride_v_tok, rows, lo, fs, Lq, Lk,
        qk_scale, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_FP32,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_run(
        acc, l_i, m_i, q, k_base, v_base, stride_k_tok, stride_v_tok, rows, fs, fe, Lq, Lk,
        qk_scale, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_FP32,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_run(
        acc, l_i, m_i, q, k_base, v_base, stride_k_tok, stride_v_tok, rows, fe, hi, Lq, Lk,
        qk_scale, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_FP32,
    )  # fmt: skip
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, float("inf"))
    tl.store(
        O_ptr + q_tok[:, None] * stride_o_tok + h * stride_o_head + offs_d[None, :],
        out.to(O_ptr.dtype.element_ty),
        mask=io_mask,
    )
    tl.store(LSE_ptr + h * stride_lse_head + q_tok, lse, mask=rows < Lq)


@triton.jit(do_not_specialize=["total_q"])
def _varlen_attn_bwd_preprocess_kernel(
    O_ptr, DO_ptr, DELTA_ptr, total_q,
    stride_o_tok, stride_o_head, stride_do_tok, stride_do_head, stride_delta_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (fp32)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    tok = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (tok[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        O_ptr + tok[:, None] * stride_o_tok + h * stride_o_head + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO_ptr + tok[:, None] * stride_do_tok + h * stride_do_head + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA_ptr + h * stride_delta_head + tok, delta, mask=tok < total_q)


@triton.jit
def _dkdv_run(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_q_tok, stride_do_tok,
    cols, lo, hi, Lq, Lk, qk_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block over query blocks lo, lo+BLOCK_M, .. < hi (transposed tiles)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        q_ptr = q_base + rows[:, None].to(tl.int64) * stride_q_tok + offs_d[None, :]
        do_ptr = do_base + rows[:, None].to(tl.int64) * stride_do_tok + offs_d[None, :]
        if MASKED:
            io_mask = (rows[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(q_ptr, mask=io_mask, other=0.0)
            do = tl.load(do_ptr, mask=io_mask, other=0.0)
            lse2 = tl.load(lse_base + rows, mask=rows < Lq, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=rows < Lq, other=0.0)
        else:
            if HEAD_DIM == BLOCK_D:
                q = tl.load(q_ptr)
                do = tl.load(do_ptr)
            else:
                q = tl.load(q_ptr, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                do = tl.load(do_ptr, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            lse2 = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        lse2 = lse2 * _LOG2E
        s_t = _dot(k, tl.trans(q), DOT_FP32) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(
                tl.trans(_visible(rows, cols, Lq, Lk, window_left, window_right)), p_t, 0.0
            )
        dv += _dot(p_t.to(do.dtype), do, DOT_FP32)
        dp_t = _dot(v, tl.trans(do), DOT_FP32)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_FP32)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME)
def _varlen_attn_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DK_ptr, DV_ptr, CU_Q_ptr, CU_K_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dk_tok, stride_dk_head, stride_dv_tok, stride_dv_head,
    stride_lse_head,
    qk_scale, window_left, window_right, group,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """One key block of one q head: dV = Σ Pᵀ dO, dK = scale · Σ dSᵀ Q over visible q blocks."""
    pid_n, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(CU_Q_ptr + b)
    k_start = tl.load(CU_K_ptr + b)
    Lq = tl.load(CU_Q_ptr + b + 1) - q_start
    Lk = tl.load(CU_K_ptr + b + 1) - k_start
    n0 = pid_n * BLOCK_N
    if n0 >= Lk:
        return
    hk = h // group
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_tok = k_start.to(tl.int64) + cols
    kv_mask = (cols[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(
        K_ptr + k_tok[:, None] * stride_k_tok + hk * stride_k_head + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V_ptr + k_tok[:, None] * stride_v_tok + hk * stride_v_head + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # Query rows that may see some key of this block (union), and rows that see all of them
    # (intersection); padding keys past Lk are zero and never stored, so a partial key block
    # needs no bounds mask on the query side.
    off = Lk - Lq
    last = tl.minimum(n0 + BLOCK_N, Lk) - 1
    lo = tl.where(window_right >= 0, tl.maximum(n0 - off - window_right, 0), 0)
    hi = tl.where(window_left >= 0, tl.minimum(last - off + window_left + 1, Lq), Lq)
    hi = tl.maximum(hi, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    in_lo = tl.where(window_right >= 0, tl.maximum(last - off - window_right, 0), 0)
    in_hi = tl.where(window_left >= 0, tl.minimum(n0 - off + window_left + 1, Lq), Lq)
    fs = tl.minimum(tl.maximum(tl.cdiv(in_lo, BLOCK_M) * BLOCK_M, lo), hi)
    fe = tl.minimum(tl.maximum((tl.maximum(in_hi, 0) // BLOCK_M) * BLOCK_M, fs), hi)
    q_tok0 = q_start.to(tl.int64)
    q_base = Q_ptr + q_tok0 * stride_q_tok + h * stride_q_head
    do_base = DO_ptr + q_tok0 * stride_do_tok + h * stride_do_head
    lse_base = LSE_ptr + h * stride_lse_head + q_tok0
    delta_base = DELTA_ptr + h * stride_lse_head + q_tok0
    dk, dv = _dkdv_run(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_q_tok, stride_do_tok, cols,
        lo, fs, Lq, Lk, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, True,
        DOT_FP32,
    )  # fmt: skip
    dk, dv = _dkdv_run(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_q_tok, stride_do_tok, cols,
        fs, fe, Lq, Lk, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, False,
        DOT_FP32,
    )  # fmt: skip
    dk, dv = _dkdv_run(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_q_tok, stride_do_tok, cols,
        fe, hi, Lq, Lk, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, True,
        DOT_FP32,
    )  # fmt: skip
    dk = dk * (qk_scale * _LN2)
    tl.store(
        DK_ptr + k_tok[:, None] * stride_dk_tok + h * stride_dk_head + offs_d[None, :],
        dk.to(DK_ptr.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV_ptr + k_tok[:, None] * stride_dv_tok + h * stride_dv_head + offs_d[None, :],
        dv.to(DV_ptr.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _dq_run(
    dq, q, do, lse2, delta, k_base, v_base, stride_k_tok, stride_v_tok, rows, lo, hi, Lq, Lk,
    qk_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """dQ of one query block over key blocks lo, lo+BLOCK_N, .. < hi."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k_ptr = k_base + cols[:, None].to(tl.int64) * stride_k_tok + offs_d[None, :]
        v_ptr = v_base + cols[:, None].to(tl.int64) * stride_v_tok + offs_d[None, :]
        if MASKED:
            kv_mask = (cols[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptr, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr, mask=kv_mask, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptr)
            v = tl.load(v_ptr)
        else:
            k = tl.load(k_ptr, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptr, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(_visible(rows, cols, Lq, Lk, window_left, window_right), p, 0.0)
        dp = _dot(do, tl.trans(v), DOT_FP32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_FP32)
    return dq


@triton.jit(do_not_specialize=_RUNTIME)
def _varlen_attn_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr, CU_Q_ptr, CU_K_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dq_tok, stride_dq_head, stride_lse_head,
    qk_scale, window_left, window_right, group,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """One query block: dQ = scale · Σ dS K over its visible key blocks."""
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(CU_Q_ptr + b)
    k_start = tl.load(CU_K_ptr + b)
    Lq = tl.load(CU_Q_ptr + b + 1) - q_start
    Lk = tl.load(CU_K_ptr + b + 1) - k_start
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:
        return
    hk = h // group
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_tok = q_start.to(tl.int64) + rows
    q_mask = (rows[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        Q_ptr + q_tok[:, None] * stride_q_tok + h * stride_q_head + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    do = tl.load(
        DO_ptr + q_tok[:, None] * stride_do_tok + h * stride_do_head + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    lse = tl.load(LSE_ptr + h * stride_lse_head + q_tok, mask=rows < Lq, other=float("inf"))
    lse2 = lse * _LOG2E
    delta = tl.load(DELTA_ptr + h * stride_lse_head + q_tok, mask=rows < Lq, other=0.0)
    k_base = K_ptr + k_start.to(tl.int64) * stride_k_tok + hk * stride_k_head
    v_base = V_ptr + k_start.to(tl.int64) * stride_v_tok + hk * stride_v_head
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, fs, fe, hi = _key_runs(m0, Lq, Lk, window_left, window_right, BLOCK_M, BLOCK_N)
    dq = _dq_run(
        dq, q, do, lse2, delta, k_base, v_base, stride_k_tok, stride_v_tok, rows, lo, fs, Lq,
        Lk, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_FP32,
    )  # fmt: skip
    dq = _dq_run(
        dq, q, do, lse2, delta, k_base, v_base, stride_k_tok, stride_v_tok, rows, fs, fe, Lq,
        Lk, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_FP32,
    )  # fmt: skip
    dq = _dq_run(
        dq, q, do, lse2, delta, k_base, v_base, stride_k_tok, stride_v_tok, rows, fe, hi, Lq,
        Lk, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_FP32,
    )  # fmt: skip
    tl.store(
        DQ_ptr + q_tok[:, None] * stride_dq_tok + h * stride_dq_head + offs_d[None, :],
        (dq * (qk_scale * _LN2)).to(DQ_ptr.dtype.element_ty),
        mask=q_mask,
    )


# ----------------------------------------------------------------------------------------
# Launch configurations: one table, read by the launchers below and by the aot report.

HEAD_DIMS = (64, 80, 96, 128, 256)  # what the aot report compiles; any D <= 256 launches


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(kernel: str, dtype: torch.dtype, head_dim: int, arch: int | None) -> dict:
    """Tile sizes, warps and pipeline stages of one kernel for (dtype, head dim, GPU arch).

    ``arch`` is the compute capability as major*10+minor (80 = A100, 90 = H100), or None for
    the interpreter. The figures behind each entry — registers, spills, shared memory on
    sm_80/sm_90 — are what ``python -m pyfast_tune.kernels.aot`` prints; every entry here is
    spill-free and within shared memory there (a default test holds it to that).

    Returns:
        dict(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages).
    """
    block_d = _block_d(head_dim)
    if arch is None:  # the interpreter: each program is simulated with numpy, keep tiles small
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # IEEE fp32 dots run on the FMA units with both operands in registers: only 16 x 16
        # tiles stay spill-free (tf32x3 splits operands and spills more). fp32 attention is a
        # checking path on GPUs; training runs bf16/fp16.
        warps = 8 if (kernel == "bwd_dkdv" and block_d > 64) else 4
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=warps, num_stages=1)
    hopper = arch >= 90
    stages = 3 if hopper else 2
    # sm_90's wgmma reads both operands from shared memory; sm_80's mma.sync holds the A
    # operand and the accumulator in registers, so its query tiles are smaller.
    if kernel == "fwd":  # BLOCK_M queries held (q, acc), BLOCK_N keys streamed
        if block_d <= 64:
            bm, bn, warps = (128, 64, 4) if hopper else (128, 64, 8)
        elif block_d <= 128:
            bm, bn, warps = (128, 64, 8) if hopper else (64, 64, 8)
        else:
            bm, bn, warps = (64, 32, 8) if hopper else (32, 64, 8)
    elif kernel == "bwd_dkdv":  # BLOCK_N keys held (k, v, dk, dv), BLOCK_M queries streamed
        if block_d <= 64:
            bm, bn, warps = 32, 128, 8
        elif block_d <= 128:
            bm, bn, warps = 32, 64, 8
        else:
            bm, bn, warps = 32, 32, 8
    else:  # bwd_dq: BLOCK_M queries held (q, do, dq), BLOCK_N keys streamed
        if block_d <= 64:
            bm, bn, warps = 128, 32, 8
        elif block_d <= 128:
            bm, bn, warps = 64, 32, 4
        else:
            bm, bn, warps = (32, 32, 4) if hopper else (16, 32, 4)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


def _device_arch(t: torch.Tensor) -> int | None:
    if _INTERPRET or t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


def _meta(kernel: str, q: torch.Tensor, arch: int | None) -> dict:
    cfg = launch_config(kernel, q.dtype, q.shape[-1], arch)
    dot_fp32 = arch is None or q.dtype == torch.float32
    return dict(HEAD_DIM=q.shape[-1], DOT_FP32=dot_fp32, **cfg)


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _labels(q: torch.Tensor, k: torch.Tensor) -> dict:
    return dict(dtype=str(q.dtype).removeprefix("torch."), head_dim=q.shape[-1],
                gqa=q.shape[1] // k.shape[1])  # fmt: skip


def fwd_launch(q, k, v, out, lse, cu_q, cu_k, max_q, scale, left, right, arch) -> Launch:
    """The forward launch for contiguous q/k/v and the output buffers (see ``varlen_fwd``)."""
    h = q.shape[1]
    meta = _meta("fwd", q, arch)
    grid = (triton.cdiv(max(max_q, 1), meta["BLOCK_M"]), cu_q.numel() - 1, h)
    args = (
        q, k, v, out, lse, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale * LOG2E, left, right, h // k.shape[1],
    )  # fmt: skip
    return Launch(_varlen_attn_fwd_kernel, grid, args, meta, _labels(q, k))


def varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    """Forward. q (Tq, H, D), k/v (Tk, H_kv, D) -> out (Tq, H, D) q.dtype, lse (H, Tq) fp32."""
    q, k, v = _contig(q), _contig(k), _contig(v)
    tq, h, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((h, tq), dtype=torch.float32, device=q.device)
    if cu_q.numel() - 1 == 0 or tq == 0:
        return out, lse.fill_(float("inf"))
    fwd_launch(q, k, v, out, lse, cu_q, cu_k, max_q, scale, left, right, _device_arch(q))()
    return out, lse


def bwd_buffers(q, k):
    """(dq, dk, dv, delta): GQA writes one dK/dV slice per q head in fp32, summed afterwards."""
    tq, h, d = q.shape
    tk, h_kv, _ = k.shape
    dq = torch.zeros_like(q)
    if h == h_kv:
        dk, dv = torch.zeros_like(k), torch.zeros_like(k)
    else:  # one slice per q head, summed below: no atomics
        dk = torch.zeros((tk, h, d), dtype=torch.float32, device=q.device)
        dv = torch.zeros((tk, h, d), dtype=torch.float32, device=q.device)
    delta = torch.empty((h, tq), dtype=torch.float32, device=q.device)
    return dq, dk, dv, delta


def bwd_launches(dout, q, k, v, out, lse, dq, dk, dv, delta, cu_q, cu_k, max_q, max_k,
                 scale, left, right, arch) -> list[Launch]:  # fmt: skip
    """The Delta pre-pass, dK/dV and dQ launches (see ``varlen_bwd``)."""
    tq, h, d = q.shape
    batch, group = cu_q.numel() - 1, h // k.shape[1]
    common = (scale * LOG2E, left, right, group)
    labels = _labels(q, k)
    pre_m = 64 if d <= 128 else 32
    pre = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=pre_m, num_warps=4, num_stages=1)
    pre_args = (
        out, dout, delta, tq, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        delta.stride(0),
    )  # fmt: skip
    dkdv = _meta("bwd_dkdv", q, arch)
    dkdv_args = (
        q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), *common,
    )  # fmt: skip
    dqm = _meta("bwd_dq", q, arch)
    dq_args = (
        q, k, v, dout, lse, delta, dq, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), *common,
    )  # fmt: skip
    return [
        Launch(_varlen_attn_bwd_preprocess_kernel, (triton.cdiv(tq, pre_m), h), pre_args, pre,
               labels),
        Launch(_varlen_attn_bwd_dkdv_kernel,
               (triton.cdiv(max(max_k, 1), dkdv["BLOCK_N"]), batch, h), dkdv_args, dkdv, labels),
        Launch(_varlen_attn_bwd_dq_kernel,
               (triton.cdiv(max(max_q, 1), dqm["BLOCK_M"]), batch, h), dq_args, dqm, labels),
    ]  # fmt: skip


def varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right):
    """Backward. Returns dq, dk, dv in the dtypes and shapes of q, k, v."""
    dout, q, k, v, out = (_contig(t) for t in (dout, q, k, v, out))
    tk, h_kv, d = k.shape
    group = q.shape[1] // h_kv
    dq, dk, dv, delta = bwd_buffers(q, k)
    if cu_q.numel() - 1 > 0 and q.shape[0] > 0 and tk > 0:
        args = (dout, q, k, v, out, lse, dq, dk, dv, delta, cu_q, cu_k, max_q, max_k)
        for launch in bwd_launches(*args, scale, left, right, _device_arch(q)):
            launch()
    if group > 1:
        dk = dk.view(tk, h_kv, group, d).sum(2).to(k.dtype)
        dv = dv.view(tk, h_kv, group, d).sum(2).to(v.dtype)
    return dq, dk, dv


def aot_launches(arch: int) -> list[Launch]:
    """Every launch configuration the attention kernels can take on ``arch``: each dtype and
    head dim of ``HEAD_DIMS``, MHA and GQA (window sizes and causality are runtime arguments of
    the same binaries). Small CPU tensors stand in for device tensors: only dtypes, strides and
    alignment reach the compiler, exactly as a launch with H 32, H_kv 32 or 8 would pass them."""
    launches = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in HEAD_DIMS:
            for h_kv in (32, 8):
                q = torch.zeros((1, 32, d), dtype=dtype)
                k = torch.zeros((1, h_kv, d), dtype=dtype)
                out, lse = torch.zeros_like(q), torch.zeros((32, 1), dtype=torch.float32)
                cu = torch.zeros(2, dtype=torch.int32)
                shape = (cu, cu, 4096, 0.1, -1, 0, arch)
                launches.append(fwd_launch(q, k, k, out, lse, *shape))
                dq, dk, dv, delta = bwd_buffers(q, k)
                bufs = (q, q, k, k, out, lse, dq, dk, dv, delta, cu, cu, 4096, 4096)
                launches += bwd_launches(*bufs, 0.1, -1, 0, arch)
    return launches
