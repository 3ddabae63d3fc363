"""Triton kernels for varlen flash attention (flash-attention-2 algorithm), forward and backward.

Layout as flash-attn's varlen API: q (total_q, H, D), k/v (total_k, H_kv, D), cu_seqlens int32
(B+1,); lse and the backward's Delta are (H, total_q) float32. One program handles one block
of rows of one (segment, head); programs past a segment's end exit at once, so the grid is
sized by max_seqlen, not by the pack. Token offsets are computed in int64: a 1M-token pack
with H·D = 8192 already passes 2^31 elements.

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

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
def _key_range(m0, rows_in_block, Lq, Lk, window_left, window_right, BLOCK_N: tl.constexpr):
    """[lo, hi) of keys that rows m0 .. m0+rows_in_block-1 may see, lo rounded to a block."""
    off = Lk - Lq
    lo = tl.where(window_left >= 0, tl.maximum(m0 + off - window_left, 0), 0)
    last = m0 + rows_in_block - 1
    hi = tl.where(window_right >= 0, tl.minimum(last + off + window_right + 1, Lk), Lk)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _varlen_attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, LSE_ptr, CU_Q_ptr, CU_K_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head, stride_lse_head,
    scale, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(CU_Q_ptr + b)
    k_start = tl.load(CU_K_ptr + b)
    Lq = tl.load(CU_Q_ptr + b + 1) - q_start
    Lk = tl.load(CU_K_ptr + b + 1) - k_start
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:
        return
    hk = h // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_tok = q_start.to(tl.int64) + rows  # int64: global token index
    q = tl.load(
        Q_ptr + q_tok[:, None] * stride_q_tok + h * stride_q_head + offs_d[None, :],
        mask=(rows[:, None] < Lq) & d_ok[None, :],
        other=0.0,
    )
    k_base = K_ptr + k_start.to(tl.int64) * stride_k_tok + hk * stride_k_head
    v_base = V_ptr + k_start.to(tl.int64) * stride_v_tok + hk * stride_v_head
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, hi = _key_range(
        m0, tl.minimum(BLOCK_M, Lq - m0), Lq, Lk, window_left, window_right, BLOCK_N
    )
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kt = tl.load(
            k_base + cols[None, :].to(tl.int64) * stride_k_tok + offs_d[:, None],
            mask=(cols[None, :] < Lk) & d_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        s = _dot(q, kt, DOT_FP32) * scale
        s = tl.where(_visible(rows, cols, Lq, Lk, window_left, window_right), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row saw nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None].to(tl.int64) * stride_v_tok + offs_d[None, :],
            mask=(cols[:, None] < Lk) & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(
        O_ptr + q_tok[:, None] * stride_o_tok + h * stride_o_head + offs_d[None, :],
        out.to(O_ptr.dtype.element_ty),
        mask=(rows[:, None] < Lq) & d_ok[None, :],
    )
    tl.store(LSE_ptr + h * stride_lse_head + q_tok, lse, mask=rows < Lq)


@triton.jit
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
def _varlen_attn_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DK_ptr, DV_ptr, CU_Q_ptr, CU_K_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dk_tok, stride_dk_head, stride_dv_tok, stride_dv_head,
    stride_lse_head,
    scale, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
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
    hk = h // GROUP
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_tok = k_start.to(tl.int64) + cols
    kv_mask = (cols[:, None] < Lk) & d_ok[None, :]
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
    # Query rows that may see keys n0 .. n0+BLOCK_N-1 (inverse of the key range).
    off = Lk - Lq
    last = tl.minimum(n0 + BLOCK_N, Lk) - 1
    q_lo = tl.where(window_right >= 0, tl.maximum(n0 - off - window_right, 0), 0)
    q_hi = tl.where(window_left >= 0, tl.minimum(last - off + window_left + 1, Lq), Lq)
    q_base = q_start.to(tl.int64)
    for m0 in range((q_lo // BLOCK_M) * BLOCK_M, q_hi, BLOCK_M):
        rows = m0 + offs_m
        q_tok = q_base + rows
        q_mask = (rows[:, None] < Lq) & d_ok[None, :]
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
        delta = tl.load(DELTA_ptr + h * stride_lse_head + q_tok, mask=rows < Lq, other=0.0)
        s_t = _dot(k, tl.trans(q), DOT_FP32) * scale  # (BLOCK_N, BLOCK_M)
        ok_t = tl.trans(_visible(rows, cols, Lq, Lk, window_left, window_right))
        p_t = tl.where(ok_t, tl.exp(s_t - lse[None, :]), 0.0)
        dv += _dot(p_t.to(do.dtype), do, DOT_FP32)
        dp_t = _dot(v, tl.trans(do), DOT_FP32)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_FP32)
    dk = dk * scale
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
def _varlen_attn_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr, CU_Q_ptr, CU_K_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dq_tok, stride_dq_head, stride_lse_head,
    scale, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
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
    hk = h // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_tok = q_start.to(tl.int64) + rows
    q_mask = (rows[:, None] < Lq) & d_ok[None, :]
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
    delta = tl.load(DELTA_ptr + h * stride_lse_head + q_tok, mask=rows < Lq, other=0.0)
    k_base = K_ptr + k_start.to(tl.int64) * stride_k_tok + hk * stride_k_head
    v_base = V_ptr + k_start.to(tl.int64) * stride_v_tok + hk * stride_v_head
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, hi = _key_range(
        m0, tl.minimum(BLOCK_M, Lq - m0), Lq, Lk, window_left, window_right, BLOCK_N
    )
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kv_mask = (cols[:, None] < Lk) & d_ok[None, :]
        k = tl.load(
            k_base + cols[:, None].to(tl.int64) * stride_k_tok + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_base + cols[:, None].to(tl.int64) * stride_v_tok + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        s = _dot(q, tl.trans(k), DOT_FP32) * scale
        ok = _visible(rows, cols, Lq, Lk, window_left, window_right)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_FP32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_FP32)
    tl.store(
        DQ_ptr + q_tok[:, None] * stride_dq_tok + h * stride_dq_head + offs_d[None, :],
        (dq * scale).to(DQ_ptr.dtype.element_ty),
        mask=q_mask,
    )


def _config(q: torch.Tensor) -> dict:
    """Block sizes: tiny in the interpreter (each program is simulated with numpy); on GPU
    64 x 64 tiles, halved for head dims above 64 to stay within shared memory."""
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    if _INTERPRET or q.device.type == "cpu":
        block = 16
    else:
        block = 64 if block_d <= 64 else 32
    return dict(
        HEAD_DIM=q.shape[-1],
        BLOCK_D=block_d,
        BLOCK_M=block,
        BLOCK_N=block,
        DOT_FP32=_INTERPRET or q.dtype == torch.float32,
    )


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    """Forward. q (Tq, H, D), k/v (Tk, H_kv, D) -> out (Tq, H, D) q.dtype, lse (H, Tq) fp32."""
    q, k, v = _contig(q), _contig(k), _contig(v)
    tq, h, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((h, tq), dtype=torch.float32, device=q.device)
    cfg = _config(q)
    batch = cu_q.numel() - 1
    if batch == 0 or tq == 0:
        return out, lse.fill_(float("inf"))
    grid = (triton.cdiv(max(max_q, 1), cfg["BLOCK_M"]), batch, h)
    _varlen_attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale, left, right, GROUP=h // k.shape[1], **cfg,
    )  # fmt: skip
    return out, lse


def varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right):
    """Backward. Returns dq, dk, dv in the dtypes and shapes of q, k, v."""
    dout, q, k, v, out = (_contig(t) for t in (dout, q, k, v, out))
    tq, h, d = q.shape
    tk, h_kv, _ = k.shape
    group = h // h_kv
    cfg = _config(q)
    batch = cu_q.numel() - 1
    dq = torch.zeros_like(q)
    if group == 1:
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    else:  # one slice per q head, summed below: no atomics
        dk = torch.zeros((tk, h, d), dtype=torch.float32, device=q.device)
        dv = torch.zeros((tk, h, d), dtype=torch.float32, device=q.device)
    if batch == 0 or tq == 0 or tk == 0:
        return (
            dq,
            dk.view(tk, h_kv, group, d).sum(2).to(k.dtype),
            dv.view(tk, h_kv, group, d).sum(2).to(v.dtype),
        )
    delta = torch.empty((h, tq), dtype=torch.float32, device=q.device)
    _varlen_attn_bwd_preprocess_kernel[(triton.cdiv(tq, cfg["BLOCK_M"]), h)](
        out, dout, delta, tq, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        delta.stride(0), HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"],
    )  # fmt: skip
    common = (scale, left, right)
    _varlen_attn_bwd_dkdv_kernel[(triton.cdiv(max(max_k, 1), cfg["BLOCK_N"]), batch, h)](
        q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), *common, GROUP=group, **cfg,
    )  # fmt: skip
    _varlen_attn_bwd_dq_kernel[(triton.cdiv(max(max_q, 1), cfg["BLOCK_M"]), batch, h)](
        q, k, v, dout, lse, delta, dq, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        *common, GROUP=group, **cfg,
    )  # fmt: skip
    if group > 1:
        dk = dk.view(tk, h_kv, group, d).sum(2).to(k.dtype)
        dv = dv.view(tk, h_kv, group, d).sum(2).to(v.dtype)
    return dq, dk, dv
