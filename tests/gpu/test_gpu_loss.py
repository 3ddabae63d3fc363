"""Fused linear cross-entropy (Triton) on the GPU: the loss and the gradients of hidden and
weight against a float64 reference, relative to PyTorch's plain cross-entropy over the whole
logits in the same dtype; vocabularies of 32k to 152k (Llama 2, Llama 3, Qwen 2), ignored
targets, soft-capping."""

import pytest
import torch
from gpu_helpers import DEVICE, assert_within_rule, gpu, gpu_only, sized

from pyfast_tune.kernels import linear_cross_entropy, linear_cross_entropy_ref

pytestmark = gpu
T, H = sized((4096, 1024), (37, 32))
bf16, fp16 = torch.bfloat16, torch.float16


def _inputs(V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(device=DEVICE, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(device=DEVICE, dtype=dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    targets[::7] = -100  # prompt tokens: no loss
    return hidden, weight, targets.to(DEVICE)


def _grads(fn, hidden, weight):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w)
    return [loss.detach(), *torch.autograd.grad(loss, (h, w))]


@pytest.mark.parametrize(
    "V, dtype, softcap",
    [pytest.param(sized(151936, 500), bf16, None, id="V152k-bf16"),
     gpu_only(32000, bf16, None, id="V32k-bf16"),
     gpu_only(128256, bf16, None, id="V128k-bf16"),
     gpu_only(32000, fp16, None, id="V32k-fp16"),
     gpu_only(128256, bf16, 30.0, id="V128k-bf16-softcap30")],
)  # fmt: skip
def test_triton_vs_float64_reference(V, dtype, softcap):
    hidden, weight, targets = _inputs(V, dtype)
    ours = _grads(lambda h, w: linear_cross_entropy(h, w, targets, softcap=softcap,
                                                     backend="triton"), hidden, weight)  # fmt: skip
    plain = _grads(lambda h, w: linear_cross_entropy_ref(h, w, targets, softcap=softcap,
                                                          upcast=False), hidden, weight)  # fmt: skip
    ref = _grads(lambda h, w: linear_cross_entropy_ref(h, w, targets, softcap=softcap),
                 hidden.double(), weight.double())  # fmt: skip
    for name, o, u, r, rule in zip(("loss", "dhidden", "dweight"), ours, plain, ref, (2, 3, 3)):
        assert o.shape == r.shape and torch.isfinite(o).all(), name
        assert_within_rule(name, o, u, r, rule, dtype)
