"""Fused LoRA (Triton) on the GPU: y, dx, dA, dB against a float64 reference, relative to the
peft-style composition (``lora_linear_ref``, what peft's ``lora.Linear.forward`` computes) in
the same dtype; ranks 8-128, bf16 and fp16, fp32 adapters on a bf16 base, dropout; the 4-bit
NF4 base where bitsandbytes is installed."""

import importlib.util

import pytest
import torch
from gpu_helpers import CUDA, DEVICE, assert_within_rule, gpu, gpu_only, sized

from pyfast_tune.kernels import lora_linear, lora_linear_ref

pytestmark = gpu
M, K, N = sized((4096, 4096, 4096), (24, 32, 40))
bf16, fp16 = torch.bfloat16, torch.float16


def _inputs(r, dtype, adapter_dtype, seed=0, k=K):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=DEVICE, dtype=dt)

    x, W = randn(M, k), randn(N, k, std=k**-0.5)
    A, B = randn(r, k, std=k**-0.5, dt=adapter_dtype), randn(N, r, std=0.1, dt=adapter_dtype)
    return x, W, A, B, randn(M, N)


def _grads(fn, x, A, B, dy):
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = fn(x, A, B)
    return [y.detach(), *torch.autograd.grad(y, (x, A, B), dy.to(y.dtype))]


@pytest.mark.parametrize(
    "r, dtype, adapter_dtype, p",
    [pytest.param(sized(16, 4), bf16, bf16, 0.0, id="r16-bf16"),
     gpu_only(8, bf16, bf16, 0.0, id="r8-bf16"),
     gpu_only(64, fp16, fp16, 0.0, id="r64-fp16"),
     gpu_only(128, bf16, bf16, 0.0, id="r128-bf16"),
     gpu_only(16, bf16, torch.float32, 0.0, id="r16-bf16-fp32-adapters"),
     pytest.param(sized(32, 4), bf16, bf16, 0.1, id="r32-bf16-dropout")],
)  # fmt: skip
def test_triton_vs_float64_reference(r, dtype, adapter_dtype, p):
    x, W, A, B, dy = _inputs(r, dtype, adapter_dtype)
    s, seed = 2.0, 1234
    mask = None
    if p:
        from pyfast_tune.kernels.lora import lora_dropout_mask

        mask = lora_dropout_mask((M, K), p, seed, "triton", device=DEVICE)
        assert 0.8 < mask.float().mean().item() < 0.98  # a real draw at p = 0.1
    ours = _grads(lambda x, A, B: lora_linear(x, W, A, B, s, p, backend="triton", seed=seed),
                  x, A, B, dy)  # fmt: skip
    upstream = _grads(
        lambda x, A, B: lora_linear_ref(x, W, A, B, s, p, keep_mask=mask), x, A, B, dy
    )
    ref = _grads(lambda x, A, B: lora_linear_ref(x, W.double(), A, B, s, p, keep_mask=mask),
                 x.double(), A.double(), B.double(), dy.double())  # fmt: skip
    for name, o, u, rf, rule in zip(("y", "dx", "dA", "dB"), ours, upstream, ref, (2, 3, 3, 3)):
        assert o.shape == rf.shape and torch.isfinite(o).all(), name
        assert_within_rule(name, o, u, rf, rule, o.dtype)


@pytest.mark.skipif(
    not (CUDA and importlib.util.find_spec("bitsandbytes")),
    reason="QLoRA's NF4 base is checked on CUDA with bitsandbytes (one is missing here)",
)
def test_triton_nf4_base_vs_dequantized_reference():
    """QLoRA: the fused op over a bitsandbytes NF4 weight equals the composition over the
    same weight dequantized (the base matmul is bitsandbytes' own in both)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    x, W, A, B, dy = _inputs(16, bf16, bf16, seed=3)
    W4 = bnb.nn.Params4bit(W.cpu(), requires_grad=False, quant_type="nf4").to(DEVICE)
    W_deq = bnbf.dequantize_4bit(W4.data, W4.quant_state).to(bf16)
    ours = _grads(lambda x, A, B: lora_linear(x, W4, A, B, 2.0, backend="triton"), x, A, B, dy)
    upstream = _grads(lambda x, A, B: lora_linear_ref(x, W_deq, A, B, 2.0), x, A, B, dy)
    ref = _grads(lambda x, A, B: lora_linear_ref(x, W_deq.double(), A, B, 2.0),
                 x.double(), A.double(), B.double(), dy.double())  # fmt: skip
    for name, o, u, rf, rule in zip(("y", "dx", "dA", "dB"), ours, upstream, ref, (2, 3, 3, 3)):
        assert_within_rule(name, o, u, rf, rule, bf16)
