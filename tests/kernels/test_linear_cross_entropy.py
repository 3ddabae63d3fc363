"""Fused linear cross-entropy: loss and gradients against a float64 reference.

Tolerance rule (flash-attention's): our error against the fp64 reference may be at most twice
the error of plain PyTorch in the same dtype — ``F.cross_entropy((h @ W.T).float(), t)``, the
path training takes without the op — plus the rounding granularity of the result (see
``_check``). Shapes are odd on purpose: T is no multiple of the
chunk, V none of the vocabulary block. The Triton kernel runs in the interpreter (conftest sets
TRITON_INTERPRET=1) at small shapes.
"""

import zlib

import pytest
import torch

from pyfast_tune.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from pyfast_tune.kernels.linear_cross_entropy import triton as _lce_triton
from pyfast_tune.kernels.linear_cross_entropy.op import _plan

T, H, V = 67, 32, 101
ROWS_CHUNK = 10 * V * 4  # fp32: 10 tokens per chunk -> 6 chunks of 10 and one of 7
VOCAB_BLOCKS = 32 * 30 * 4  # fp32: 32 tokens per chunk, vocabulary in blocks of 30 (3 + 11)


def _inputs(dtype, *, bias=False, weights=False, ignore=False, seed=0, t=T, v=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, H, generator=g, dtype=torch.float64)
    W = torch.randn(v, H, generator=g, dtype=torch.float64) / H**0.5 * 3
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    tgt = torch.randint(0, v, (t,), generator=g)
    if ignore:
        tgt[torch.rand(t, generator=g) < 0.3] = -100
    w = torch.rand(t, generator=g, dtype=torch.float64) + 0.5 if weights else None
    grad_out = torch.randn((), generator=g, dtype=torch.float64)
    return h, W, b, tgt, w, grad_out


def _run(fn, dtype, h, W, b, tgt, w, grad_out, reduction, **kw):
    """fn's loss and gradients (hidden, weight, bias, weights) for leaf copies in ``dtype``."""
    leaves = [x.to(dtype if x is not w else torch.float32).requires_grad_() if x is not None
              else None for x in (h, W, b, w)]  # fmt: skip
    if dtype == torch.float64 and leaves[3] is not None:
        leaves[3] = w.clone().requires_grad_()
    hh, WW, bb, ww = leaves
    loss = fn(hh, WW, tgt, bb, weights=ww, reduction=reduction, **kw)
    g = grad_out.to(loss.dtype)
    if reduction == "none":
        g = torch.linspace(-1, 2, loss.shape[0], dtype=loss.dtype)  # per-token, uneven
    wrt = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, wrt, g, allow_unused=True) if loss.requires_grad else []
    return [loss.detach(), *grads]


def _check(ours, torch_same, ref, what):
    for i, (o, p, r) in enumerate(zip(ours, torch_same, ref)):
        r = r.double()
        ours_err = (o.double() - r).abs().max().item()
        torch_err = (p.double() - r).abs().max().item()
        # Rounding granularity (as flash-attention's tests add): one rounding of the largest
        # element in the output's dtype, and in fp32 a few ulps of summation-order noise
        # (sums over T and H in another order than PyTorch's). Below that, who wins is luck.
        ulps = max(torch.finfo(o.dtype).eps / 2, 8 * torch.finfo(torch.float32).eps)
        floor = ulps * r.abs().max().item()
        assert ours_err <= 2 * torch_err + floor, (
            f"{what} output {i}: error {ours_err:.3g} vs PyTorch's {torch_err:.3g} (+{floor:.2g})"
        )


CASES = {
    "plain": {},
    "weights+ignore": dict(weights=True, ignore=True),
    "bias": dict(bias=True),
    "softcap": dict(softcap=4.0),
    "all": dict(bias=True, weights=True, ignore=True, softcap=4.0),
}


@pytest.mark.parametrize(
    "chunk_bytes", [ROWS_CHUNK, VOCAB_BLOCKS, None], ids=["rows", "vblocks", "one"]
)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_backend_matches_fp64_reference(dtype, reduction, case, chunk_bytes):
    kw = dict(CASES[case])
    softcap = kw.pop("softcap", None)
    args = _inputs(dtype, **kw, seed=zlib.crc32(f"{case}{reduction}".encode()) % 1000)
    scale = 1 if dtype == torch.float32 else 2  # bf16 chunk budgets count a bf16 copy too
    cb = None if chunk_bytes is None else chunk_bytes * scale * (2 if softcap else 1)
    ours = _run(linear_cross_entropy, dtype, *args, reduction, softcap=softcap,
                backend="torch", chunk_bytes=cb)  # fmt: skip
    plain = _run(linear_cross_entropy_ref, dtype, *args, reduction, softcap=softcap)
    ref = _run(linear_cross_entropy_ref, torch.float64, *args, reduction, softcap=softcap)
    assert len(ours) == len(ref) == 1 + 2 + kw.get("bias", False) + kw.get("weights", False)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    _check(ours, plain, ref, f"{dtype} {reduction} {case}")


@pytest.mark.parametrize(
    "dtype,reduction,case,chunk_bytes",
    [(torch.float32, "mean", "all", ROWS_CHUNK), (torch.float32, "none", "weights+ignore", VOCAB_BLOCKS),
     (torch.bfloat16, "sum", "softcap", 2 * ROWS_CHUNK), (torch.float32, "sum", "bias", None)],
)  # fmt: skip
def test_triton_backend_matches_fp64_reference(monkeypatch, dtype, reduction, case, chunk_bytes):
    """Interpreter: column blocks of 16 so every row loops over several (and a ragged last)."""
    monkeypatch.setattr(_lce_triton, "MAX_BLOCK_V", 16)
    kw = dict(CASES[case])
    softcap = kw.pop("softcap", None)
    args = _inputs(dtype, **kw, t=41, seed=3)
    cb = None if chunk_bytes is None else chunk_bytes * (2 if softcap else 1)
    ours = _run(linear_cross_entropy, dtype, *args, reduction, softcap=softcap,
                backend="triton", chunk_bytes=cb)  # fmt: skip
    plain = _run(linear_cross_entropy_ref, dtype, *args, reduction, softcap=softcap)
    ref = _run(linear_cross_entropy_ref, torch.float64, *args, reduction, softcap=softcap)
    _check(ours, plain, ref, f"triton {dtype} {reduction} {case}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_gives_zero_loss_and_zero_gradients(backend, reduction):
    h, W, b, tgt, w, _ = _inputs(torch.float32, bias=True, weights=True, t=9)
    tgt[:] = -100
    h, W, b = (x.float().requires_grad_() for x in (h, W, b))
    loss = linear_cross_entropy(h, W, tgt, b, weights=w.float(), reduction=reduction,
                                backend=backend)  # fmt: skip
    assert torch.equal(loss, torch.zeros_like(loss)) and loss.shape == (
        () if reduction != "none" else (9,)
    )
    loss.sum().backward()
    for x in (h, W, b):
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_ignore_index_is_configurable_and_not_counted_by_mean():
    h, W, _, tgt, _, _ = _inputs(torch.float64, t=12)
    tgt[:5] = 7
    ours = linear_cross_entropy(h, W, tgt, ignore_index=7)
    kept = tgt != 7
    expect = torch.nn.functional.cross_entropy(h[kept] @ W.T, tgt[kept])
    torch.testing.assert_close(ours, expect, rtol=1e-12, atol=1e-12)


def test_frozen_weight_computes_no_weight_gradient_and_no_grad_mode_none():
    h, W, _, tgt, _, _ = _inputs(torch.float32)
    h = h.float().requires_grad_()
    W = W.float()  # frozen, as a LoRA run's lm_head
    linear_cross_entropy(h, W, tgt, reduction="sum").backward()
    ref_h = h.detach().clone().requires_grad_()
    linear_cross_entropy_ref(ref_h, W, tgt, reduction="sum").backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        loss = linear_cross_entropy(h, W, tgt)
    assert not loss.requires_grad


def _frozen_head_none(fn, dtype, h, W, tgt, w, **kw):
    """reduction "none" with only hidden (and the token weights) trainable, per-token grads:
    a LoRA run's head under a preference loss (the op computes hidden's rows eagerly)."""
    hh = h.to(dtype).requires_grad_()
    ww = w.to(torch.float32 if dtype != torch.float64 else w.dtype).requires_grad_()
    loss = fn(hh, W.to(dtype), tgt, weights=ww, reduction="none", **kw)
    g = torch.linspace(-1, 2, loss.shape[0], dtype=loss.dtype)
    return [loss.detach(), *torch.autograd.grad(loss, [hh, ww], g)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_head_reduction_none_gradient_rows(monkeypatch, backend, dtype):
    monkeypatch.setattr(_lce_triton, "MAX_BLOCK_V", 16)
    h, W, _, tgt, w, _ = _inputs(dtype, weights=True, ignore=True, t=41, seed=11)
    ours = _frozen_head_none(linear_cross_entropy, dtype, h, W, tgt, w, backend=backend,
                             chunk_bytes=VOCAB_BLOCKS * (1 if dtype == torch.float32 else 2))  # fmt: skip
    plain = _frozen_head_none(linear_cross_entropy_ref, dtype, h, W, tgt, w)
    ref = _frozen_head_none(linear_cross_entropy_ref, torch.float64, h, W, tgt, w)
    _check(ours, plain, ref, f"{backend} {dtype} none, frozen head")


def test_retained_graph_second_backward_fails_instead_of_rescaling():
    h, W, _, tgt, _, _ = _inputs(torch.float32)
    h = h.float().requires_grad_()
    loss = linear_cross_entropy(h, W.float(), tgt)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_chunk_plan_stays_within_budget():
    budget = 64 * 2**20
    chunk, block, _ = _plan(8192, 151_646, 3584, torch.bfloat16, 0.0, budget)
    assert block == 151_646 and chunk * block * (4 + 2) <= budget and chunk >= 32
    chunk, block, _ = _plan(8192, 4_000_000, 1024, torch.float32, 0.0, budget)
    assert chunk == 32 and block < 4_000_000 and chunk * block * 4 <= budget


def test_opcheck():
    """Schema, fake (meta) implementation and autograd registration. Not the AOT-dispatch
    checks: the backward scales the forward's own gradient outputs in place (outside
    torch.compile), a mutation AOT autograd's partitioner refuses."""
    h, W, b, tgt, w, _ = _inputs(torch.float32, bias=True, weights=True, ignore=True, t=13)
    h, W, b, w = (x.float().requires_grad_() for x in (h, W, b, w))
    for reduction, flags in (("mean", (True,) * 3), ("none", (True,) * 3),
                             ("none", (True, False, False))):  # fmt: skip
        args = (h, W, tgt, b, w, -100, reduction, 0.0, *flags, 4096, "torch")
        torch.library.opcheck(
            torch.ops.pyfast_tune.linear_cross_entropy.default,
            args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


def test_bad_inputs_are_rejected_with_what_was_expected():
    h, W, _, tgt, _, _ = _inputs(torch.float32)
    h, W = h.float(), W.float()
    with pytest.raises(ValueError, match=r"targets must be in \[0, 101\)"):
        linear_cross_entropy(h, W, torch.full_like(tgt, 101))
    with pytest.raises(TypeError, match="share one dtype"):
        linear_cross_entropy(h, W.double(), tgt)
    with pytest.raises(ValueError, match=r"hidden \(T, H\) and weight \(V, H\)"):
        linear_cross_entropy(h, W[:, :5], tgt)
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(h, W, tgt, reduction="avg")
    with pytest.raises(ValueError, match="weights must be"):
        linear_cross_entropy(h, W, tgt, weights=torch.ones(3))
    with pytest.raises(ValueError, match="softcap must be > 0"):
        linear_cross_entropy(h, W, tgt, softcap=0.0)
