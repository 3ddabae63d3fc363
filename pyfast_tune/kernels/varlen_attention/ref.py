"""Pure-PyTorch reference for varlen attention: the definition the kernels are tested against.

One segment at a time, the full score matrix, an explicit mask. Quadratic memory per segment
and slow; its only job is to be obviously right.

>>> import torch
>>> from pyfast_tune.kernels import varlen_attention_ref
>>> q = k = v = torch.randn(5, 2, 8)
>>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)
>>> varlen_attention_ref(q, k, v, cu, cu, 3, 3).shape
torch.Size([5, 2, 8])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def visible_keys(lq: int, lk: int, causal: bool, window: tuple[int, int], device=None) -> Tensor:
    """(lq, lk) bool mask, True where query i may attend to key j (flash-attn varlen semantics).

    Causal is aligned bottom-right: query i sees key j iff ``j <= i + lk - lq``. A sliding
    window (left, right) additionally requires ``i + lk - lq - left <= j <= i + lk - lq + right``;
    a negative bound is unbounded, and causal forces right = 0.
    """
    left, right = window
    if causal:
        right = 0
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    diag = i + (lk - lq)
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= j <= diag + right
    if left >= 0:
        ok &= j >= diag - left
    return ok


def varlen_attention_ref(
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
    upcast: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention within each segment of a packed batch, by definition.

    q: (total_q, H, D); k, v: (total_k, H_kv, D), H divisible by H_kv (GQA);
    cu_seqlens_q/k: (B+1,) int32 segment starts; max_seqlen_* are unused (kept for the
    signature of ``varlen_attention``). With ``upcast`` fp16/bf16 inputs are computed in
    fp32 (float64 stays float64); without it, in their own dtype — the "same-dtype PyTorch"
    baseline of flash-attn's test rule. Returns out (total_q, H, D) in q's dtype and, with
    ``return_lse``, lse (H, total_q) float32 (float64 for float64 inputs); rows that see no key
    get out 0 and lse +inf, as in flash-attn.
    """
    del max_seqlen_q, max_seqlen_k
    tq, h, d = q.shape
    group = h // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cdt = q.dtype
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        cdt = torch.float32
    lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(q.shape)
    lse = torch.full((h, tq), math.inf, dtype=lse_dt, device=q.device)
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if lq == 0:
            continue
        qb = q[qs].to(cdt).transpose(0, 1)  # (H, lq, D)
        kb = k[ks].to(cdt).repeat_interleave(group, dim=1).transpose(0, 1)  # (H, lk, D)
        vb = v[ks].to(cdt).repeat_interleave(group, dim=1).transpose(0, 1)
        s = (qb * scale) @ kb.transpose(1, 2)  # (H, lq, lk)
        ok = visible_keys(lq, lk, causal, window, q.device)
        s = s.masked_fill(~ok, -math.inf)
        lse_b = torch.logsumexp(s, dim=-1) if lk > 0 else s.new_full((h, lq), -math.inf)
        empty = ~ok.any(dim=-1)  # (lq,) rows that see nothing
        p = torch.softmax(s, dim=-1).masked_fill(empty[None, :, None], 0.0)
        o = (p @ vb).transpose(0, 1)  # (lq, H, D)
        outs.append((qs, o))
        lses.append((qs, lse_b.masked_fill(empty[None, :], math.inf)))
    # Scatter without in-place writes into leaves, so autograd flows to q, k, v.
    if outs:
        index = torch.cat([torch.arange(s.start, s.stop, device=q.device) for s, _ in outs])
        out = out.index_copy(0, index, torch.cat([o.to(q.dtype) for _, o in outs]))
        lse = lse.index_copy(1, index, torch.cat([x.to(lse_dt) for _, x in lses], dim=1))
    return (out, lse) if return_lse else out


def varlen_attention_ref_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``varlen_attention_ref`` w.r.t. q, k, v, written out (no autograd):
    P = softmax(S), dV = Pᵀ dO, dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)), dQ = s·dS K, dK = s·dSᵀ Q.

    The "ref" backend's backward op uses it (custom-op kernels run below autograd).
    Shapes as in ``varlen_attention_ref``; dout (total_q, H, D); returns dq, dk, dv in the
    dtypes of q, k, v, computed in fp32 for fp16/bf16.
    """
    tq, h, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if lq == 0 or lk == 0:
            continue
        qb = q[qs].to(cdt).transpose(0, 1)  # (H, lq, D)
        kb = k[ks].to(cdt).repeat_interleave(group, dim=1).transpose(0, 1)  # (H, lk, D)
        vb = v[ks].to(cdt).repeat_interleave(group, dim=1).transpose(0, 1)
        dob = dout[qs].to(cdt).transpose(0, 1)  # (H, lq, D)
        ok = visible_keys(lq, lk, causal, window, q.device)
        s = ((qb * scale) @ kb.transpose(1, 2)).masked_fill(~ok, -math.inf)
        p = torch.softmax(s, dim=-1).masked_fill(~ok.any(-1)[None, :, None], 0.0)  # (H, lq, lk)
        ob = p @ vb
        dp = dob @ vb.transpose(1, 2)
        ds = p * (dp - (dob * ob).sum(-1, keepdim=True))
        dq[qs] = (scale * ds @ kb).transpose(0, 1)
        dkb = (scale * ds.transpose(1, 2) @ qb).transpose(0, 1)  # (lk, H, D)
        dvb = (p.transpose(1, 2) @ dob).transpose(0, 1)
        dk[ks] = dkb.reshape(lk, hkv, group, d).sum(2)
        dv[ks] = dvb.reshape(lk, hkv, group, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
