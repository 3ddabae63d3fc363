"""Triton varlen attention on the GPU: forward and the gradients of q, k, v against a float64
reference, relative to torch's ``varlen_attn`` (per-sample SDPA where it cannot run) in the
same dtype; head dims 64/128/256, GQA, sliding windows, bf16 and fp16, 1-token and odd
segments; packs up to 32k tokens against an fp32 SDPA reference."""

import pytest
import torch
from gpu_helpers import CUDA, DEVICE, assert_within_rule, gpu, gpu_only, sized

from pyfast_tune.kernels import varlen_attention, varlen_attention_ref

pytestmark = gpu
HEADS = 8
bf16, fp16 = torch.bfloat16, torch.float16


def _upstream() -> str:
    """torch's varlen_attn on CUDA when it runs; per-sample SDPA otherwise (and on CPU)."""
    if not CUDA:
        return "sdpa"
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return "sdpa"
    return "torch_varlen"


def _inputs(lens, head_dim, gqa, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total, hkv = sum(lens), HEADS // gqa
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    q, k, v = (
        randn(total, HEADS, head_dim),
        randn(total, hkv, head_dim),
        randn(total, hkv, head_dim),
    )
    return q, k, v, randn(total, HEADS, head_dim), cu.to(DEVICE), max(lens)


def _run(backend, q, k, v, dout, cu, m, window, dtype=None):
    """out, dq, dk, dv of one backend (inputs cast to ``dtype`` first when given)."""
    q, k, v = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v))
    causal = window[1] == 0
    if backend == "ref64":
        out = varlen_attention_ref(q, k, v, cu, cu, m, m, causal, q.shape[-1] ** -0.5, window)
    else:
        out = varlen_attention(q, k, v, cu, cu, m, m, causal=causal, window=window,
                               backend=backend)  # fmt: skip
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return [out.detach(), *grads]


# fmt: off
CASES = [  # head dim, dtype, GQA, window (left, right; right 0 = causal), segment lengths
    pytest.param(64, bf16, 1, (-1, 0), sized([2048, 1, 97, 1025], [13, 1, 9]), id="d64-bf16"),
    gpu_only(64, fp16, 4, sized((127, 0), (5, 0)), sized([3000, 1, 1025], [20, 1, 7]),
             id="d64-fp16-gqa4-window127"),
    gpu_only(128, bf16, 4, (-1, 0), sized([4096, 1, 97, 2000], [9, 1, 4]), id="d128-bf16-gqa4"),
    gpu_only(128, fp16, 1, (-1, -1), sized([1025, 513, 1], [11, 5, 1]), id="d128-fp16-noncausal"),
    gpu_only(128, bf16, 4, sized((255, 0), (4, 0)), sized([4096, 17, 2048], [12, 3, 6]),
             id="d128-bf16-gqa4-window255"),
    gpu_only(256, bf16, 2, (-1, 0), sized([2048, 1, 333], [6, 1, 3]), id="d256-bf16-gqa2"),
    gpu_only(256, fp16, 1, (-1, 0), sized([1025, 97, 1], [5, 3, 1]), id="d256-fp16"),
]
# fmt: on


@pytest.mark.parametrize("head_dim, dtype, gqa, window, lens", CASES)
def test_triton_vs_float64_reference(head_dim, dtype, gqa, window, lens):
    q, k, v, dout, cu, m = _inputs(lens, head_dim, gqa, dtype)
    ref = _run("ref64", q, k, v, dout, cu, m, window, torch.float64)
    ours = _run("triton", q, k, v, dout, cu, m, window)
    upstream_name = _upstream() if window == (-1, 0) or window[1] == -1 else "sdpa"
    up = _run(upstream_name, q, k, v, dout, cu, m, window)
    for name, o, u, r, rule in zip(("out", "dq", "dk", "dv"), ours, up, ref, (2, 3, 3, 3)):
        assert o.dtype == dtype and o.shape == r.shape, (name, o.dtype, o.shape)
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        assert_within_rule(f"{name} vs {upstream_name}", o, u, r, rule, dtype)


@pytest.mark.parametrize(
    "lens",
    [pytest.param(sized([16384, 8192, 8192], [40, 8, 16]), id="32k-tokens-long-segments"),
     gpu_only(sized([512] * 64, [4] * 6), id="32k-tokens-512-token-segments")],
)  # fmt: skip
def test_long_packs_vs_fp32_sdpa(lens):
    """Packs of 32k tokens: the float64 reference would need the whole score matrix of a 16k
    segment (GBs per head), so the reference is SDPA per segment in fp32 (its memory-efficient
    kernel), and ours (bf16) must stay within 2x/3x of torch's varlen_attn's error in bf16."""
    head_dim, gqa, window = 128 if CUDA else 16, 4, (-1, 0)
    q, k, v, dout, cu, m = _inputs(lens, head_dim, gqa, bf16, seed=1)
    ref = _run("sdpa", q, k, v, dout, cu, m, window, torch.float32)
    ours = _run("triton", q, k, v, dout, cu, m, window)
    up = _run(_upstream(), q, k, v, dout, cu, m, window)
    for name, o, u, r, rule in zip(("out", "dq", "dk", "dv"), ours, up, ref, (2, 3, 3, 3)):
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        assert_within_rule(name, o, u, r, rule, bf16)


def test_lse_matches_reference():
    """The log-sum-exp output (what ring/Ulysses merges and the backward read)."""
    lens = sized([1025, 1, 3000], [9, 1, 5])
    q, k, v, _, cu, m = _inputs(lens, 64, 2, bf16, seed=2)
    scale = 64**-0.5
    _, lse = varlen_attention(q, k, v, cu, cu, m, m, causal=True, return_lse=True,
                              backend="triton")  # fmt: skip
    _, lse_ref = varlen_attention_ref(q.double(), k.double(), v.double(), cu, cu, m, m, True,
                                      scale, (-1, 0), return_lse=True)  # fmt: skip
    assert lse.shape == lse_ref.shape
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=2e-2)
