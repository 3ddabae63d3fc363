"""varlen_attention: C++ (CPU), Triton (interpreter) and reference backends.

Accuracy follows flash-attn's rule: against a float64 reference, a backend's error must be at
most 2x (3x for gradients) the error of the same computation done by PyTorch in the input
dtype, plus one rounding step of that dtype. The Triton path runs under TRITON_INTERPRET=1
(tests/conftest.py), so its shapes stay small.
"""

from __future__ import annotations

import math

import pytest
import torch

from pyfast_tune.kernels import varlen_attention, varlen_attention_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cu_seqlens(lens: list[int]) -> torch.Tensor:
    """(B+1,) int32 cumulative lengths."""
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def make_inputs(lens_q, lens_k, h, h_kv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(tk, h_kv, d, generator=g, dtype=torch.float64)
    v = torch.randn(tk, h_kv, d, generator=g, dtype=torch.float64)
    dout = torch.randn(tq, h, d, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout)]


def run(fn, q, k, v, dout):
    """(out, dq, dk, dv) of fn(q, k, v) for the given upstream gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_flash_rule(backend, lens_q, lens_k, h, h_kv, d, dtype, causal=True, window=(-1, -1)):
    """Output and q/k/v gradients of `backend` obey flash-attn's tolerance rule."""
    q, k, v, dout = make_inputs(lens_q, lens_k, h, h_kv, d, dtype)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    mq, mk = max(lens_q), max(lens_k)

    def ref(upcast):
        return lambda q, k, v: varlen_attention_ref(
            q, k, v, cq, ck, mq, mk, causal, None, window, upcast=upcast
        )

    gold = run(ref(True), *(t.double() for t in (q, k, v, dout)))
    same_dtype = run(ref(False), q, k, v, dout)
    ours = run(
        lambda q, k, v: varlen_attention(
            q, k, v, cq, ck, mq, mk, causal=causal, window=window, backend=backend
        ),
        q,
        k,
        v,
        dout,
    )
    eps = torch.finfo(dtype).eps
    for name, o, p, g, factor in zip(
        ("out", "dq", "dk", "dv"), ours, same_dtype, gold, (2, 3, 3, 3)
    ):
        assert o.dtype == dtype and o.shape == g.shape, name
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        scale = max(1.0, g.abs().max().item() if g.numel() else 1.0)
        # A floor for when PyTorch's own error is near zero. In fp32 that happens on some CPU
        # code paths (ATEN_CPU_CAPABILITY=default: torch's fp32 reference nearly exact, the
        # Triton interpreter's dq off by 1.8e-6 against a 1.7e-6 bound), so fp32 allows the
        # rounding of a sum of mk * d products, about sqrt(mk * d) ulps (a random walk);
        # half precision keeps one ulp, its reference error dominates anyway.
        ulps = math.sqrt(max(mk, 1) * d) if dtype == torch.float32 else 1.0
        floor = eps * ulps * scale
        tol = factor * max_err(p, g) + floor
        err = max_err(o, g)
        if err > tol:
            bad = ((o.double() - g).abs() > tol).nonzero()[:5].tolist()
            pytest.fail(
                f"{backend} {dtype} {name}: max err {err:.3g} > tol {tol:.3g}; first at {bad}"
            )


# (lens_q, lens_k, H, H_kv, D, causal, window): odd head dims, 1-token, 97-token and empty
# segments, GQA/MQA, q and k lengths that differ (bottom-right causal), sliding windows.
GRID = {
    "d59-gqa-causal": ([1, 97, 0, 33], [1, 97, 0, 33], 4, 2, 59, True, (-1, -1)),
    "d111-noncausal": ([97, 1, 0, 50], [97, 1, 0, 50], 2, 2, 111, False, (-1, -1)),
    "lq!=lk-mqa-causal": ([5, 20, 0, 3], [9, 20, 3, 0], 4, 1, 64, True, (-1, -1)),
    "window-causal": ([97, 40], [97, 40], 2, 1, 32, True, (8, -1)),
    "window-both": ([70, 1, 30], [70, 1, 30], 2, 2, 16, False, (6, 3)),
    "d256": ([17, 5], [17, 5], 2, 1, 256, True, (-1, -1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GRID))
def test_cpp_flash_rule(case, dtype):
    lens_q, lens_k, h, h_kv, d, causal, window = GRID[case]
    assert_flash_rule("cpp", lens_q, lens_k, h, h_kv, d, dtype, causal, window)


@pytest.mark.parametrize("case", ["d59-gqa-causal", "lq!=lk-mqa-causal", "window-both"])
def test_ref_backend_flash_rule(case):
    """The "ref" backend's backward op is a hand-written formula; autograd of the ref checks it."""
    lens_q, lens_k, h, h_kv, d, causal, window = GRID[case]
    assert_flash_rule("ref", lens_q, lens_k, h, h_kv, d, torch.float32, causal, window)


TRITON_GRID = {
    "d59-gqa-causal": ([1, 23, 0, 9], [1, 23, 0, 9], 2, 1, 59, True, (-1, -1)),
    "lq!=lk-noncausal": ([5, 17, 0], [9, 17, 3], 2, 2, 16, False, (-1, -1)),
    "window": ([21, 2], [21, 2], 2, 2, 8, False, (4, 2)),
    # Segments several 16-row blocks long, so every row block has masked runs before and after
    # a run of full (unmasked) key blocks, in the forward and in both backward kernels.
    "long-window": ([70, 40], [70, 40], 2, 1, 32, True, (40, -1)),
    "long-lq<lk-causal": ([20, 50], [60, 50], 2, 1, 16, True, (-1, -1)),
    "long-lq<lk-noncausal": ([50, 33], [70, 33], 2, 2, 16, False, (-1, -1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TRITON_GRID))
def test_triton_flash_rule(case, dtype):
    lens_q, lens_k, h, h_kv, d, causal, window = TRITON_GRID[case]
    assert_flash_rule("triton", lens_q, lens_k, h, h_kv, d, dtype, causal, window)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["d111-noncausal", "window-causal"])
def test_triton_flash_rule_large(case, dtype):
    lens_q, lens_k, h, h_kv, d, causal, window = GRID[case]
    assert_flash_rule("triton", lens_q, lens_k, h, h_kv, d, dtype, causal, window)


@pytest.mark.parametrize(
    "causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (2, -1)), (False, (1, 2))]
)
def test_cpp_gradcheck_float64(causal, window):
    """Analytic gradients of the C++ op against finite differences (GQA, empty segment)."""
    torch.manual_seed(0)
    cu = cu_seqlens([3, 0, 4, 1])
    q = torch.randn(8, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 2, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, 2, 5, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return varlen_attention(q, k, v, cu, cu, 4, 4, causal=causal, window=window, backend="cpp")

    # Full Jacobians for the plain causal case; randomized projections (fast_mode) elsewhere.
    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=window != (-1, -1) or not causal)


@pytest.mark.parametrize("backend", ["cpp", "triton", "ref"])
def test_lse_matches_logsumexp(backend):
    """lse = logsumexp of the scaled visible scores; +inf (and out 0) where a row sees nothing."""
    lens_q, lens_k = [4, 3], [2, 3]  # causal, bottom-right: first 2 rows of segment 0 see nothing
    q, k, v, _ = make_inputs(lens_q, lens_k, 2, 2, 8, torch.float32)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse = varlen_attention(q, k, v, cq, ck, 4, 3, return_lse=True, backend=backend)
    assert lse.shape == (2, 7) and lse.dtype == torch.float32
    scale = 1 / math.sqrt(8)
    s0 = torch.einsum("hd,hd->h", q[2], k[0]) * scale  # row 2 of segment 0 sees key 0 only
    torch.testing.assert_close(lse[:, 2], s0)
    assert torch.isinf(lse[:, :2]).all() and (lse[:, :2] > 0).all()
    assert (out[:2] == 0).all()
    _, ref_lse = varlen_attention_ref(q, k, v, cq, ck, 4, 3, return_lse=True)
    torch.testing.assert_close(lse, ref_lse)


def test_segments_do_not_interact():
    """Changing one sample's keys/values leaves every other sample's output bit-identical."""
    lens = [5, 40, 1, 70]
    q, k, v, _ = make_inputs(lens, lens, 2, 1, 24, torch.float32)
    cu = cu_seqlens(lens)
    out = varlen_attention(q, k, v, cu, cu, 70, 70, causal=False, backend="cpp")
    k2, v2 = k.clone(), v.clone()
    k2[5:45] += 1.0
    v2[5:45] *= -3.0
    out2 = varlen_attention(q, k2, v2, cu, cu, 70, 70, causal=False, backend="cpp")
    assert torch.equal(out[:5], out2[:5]) and torch.equal(out[45:], out2[45:])
    assert not torch.allclose(out[5:45], out2[5:45])


def test_cpp_is_deterministic_and_softmax_scale_is_used():
    lens = [33, 64]
    q, k, v, dout = make_inputs(lens, lens, 4, 2, 16, torch.float32)
    cu = cu_seqlens(lens)

    def f(q, k, v, scale=None):
        return varlen_attention(q, k, v, cu, cu, 64, 64, softmax_scale=scale, backend="cpp")

    a, b = run(f, q, k, v, dout), run(f, q, k, v, dout)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    scaled = f(q, k, v, 0.5)
    torch.testing.assert_close(scaled, varlen_attention_ref(q, k, v, cu, cu, 64, 64, True, 0.5))
    assert not torch.allclose(scaled, a[0])


def test_opcheck_registration():
    """Schema, fake (meta) impl and autograd registration of the custom op."""
    cu = cu_seqlens([3, 5])
    q, k, v, _ = make_inputs([3, 5], [3, 5], 2, 1, 8, torch.float32)
    args = [t.requires_grad_() for t in (q, k, v)] + [cu, cu, 5, 5, 0.3, -1, 0, "cpp"]
    torch.library.opcheck(torch.ops.pyfast_tune.varlen_attention.default, args)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = (
            torch.empty(10, 4, 64, dtype=torch.bfloat16),
            torch.empty(10, 2, 64, dtype=torch.bfloat16),
        )
        cu = torch.tensor([0, 10], dtype=torch.int32)
        out, lse = torch.ops.pyfast_tune.varlen_attention(
            q, k, k, cu, cu, 10, 10, 0.1, -1, 0, "cpp"
        )
    assert out.shape == (10, 4, 64) and out.dtype == torch.bfloat16
    assert lse.shape == (4, 10) and lse.dtype == torch.float32


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(cu=torch.tensor([0, 4, 9], dtype=torch.int64)), "int32"),
        (dict(cu=torch.tensor([0, 4, 8], dtype=torch.int32)), "rise from 0 to total_q=9"),
        (dict(k=torch.randn(9, 3, 16), v=torch.randn(9, 3, 16)), "multiple of k/v heads"),
        (
            dict(q=torch.randn(9, 2, 300), k=torch.randn(9, 1, 300), v=torch.randn(9, 1, 300)),
            "head_dim",
        ),
        (dict(q=torch.randn(9, 2, 16, dtype=torch.float16)), "share one dtype"),
        (dict(q=torch.randn(9, 16)), "expected q (total_q, H, D)"),
        (dict(max_seqlen=4), "max_seqlen_q=4 is below the longest segment (5)"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_input_validation(change, message):
    args = dict(
        q=torch.randn(9, 2, 16),
        k=torch.randn(9, 1, 16),
        v=torch.randn(9, 1, 16),
        cu=cu_seqlens([4, 5]),
        max_seqlen=5,
        backend="cpp",
    )
    args.update(change)
    with pytest.raises(
        (ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        varlen_attention(
            args["q"],
            args["k"],
            args["v"],
            args["cu"],
            args["cu"],
            args["max_seqlen"],
            args["max_seqlen"],
            backend=args["backend"],
        )


def test_missing_compiler_message(monkeypatch):
    """Without a C++ compiler the CPU backend says what is missing and names the fallback."""
    from pyfast_tune.kernels.varlen_attention import cpu as _cpp

    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    _cpp.load_varlen_attention.cache_clear()
    try:
        with pytest.raises(_cpp.ExtensionBuildError, match="no C\\+\\+ compiler.*backend='ref'"):
            _cpp.load_varlen_attention()
    finally:
        monkeypatch.undo()
        _cpp.load_varlen_attention.cache_clear()
