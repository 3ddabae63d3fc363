"""The fused linear cross-entropy as the first-use guard checks it (``guard.Op``).

Shape class: dtype, softcap (whether logits are soft-capped)."""

from __future__ import annotations

import torch

from pyfast_tune.kernels.guard import faults
from pyfast_tune.kernels.guard.op import Op, interpreting, randn, triton_unavailable
from pyfast_tune.kernels.linear_cross_entropy.op import linear_cross_entropy
from pyfast_tune.kernels.linear_cross_entropy.ref import linear_cross_entropy_ref


class LinearCrossEntropy(Op):
    """Our chunked op (``triton``, ``torch``) against ``ref``: PyTorch's own
    ``F.cross_entropy`` over the whole logits in the same dtype, the upstream baseline (checked,
    not raced). Faults are injected here, around the op, for all three."""

    name = "linear_cross_entropy"
    outputs = ("loss", "dhidden", "dweight")

    def backends(self, device):
        if device.type == "cuda":
            return ["triton", "torch", "ref"]
        return ["torch", *(["triton"] if interpreting() else []), "ref"]

    def upstreams(self, device):
        return ["ref"]

    def raced(self, backend, device):
        # ref is the baseline, never a choice: it holds the (T, V) logits the op exists to avoid
        return backend != "ref" and super().raced(backend, device)

    def unavailable(self, backend, device, shape):
        if backend == "triton":
            if self.dtype(shape) == torch.float64:
                return "the Triton kernels take fp16/bf16/fp32"
            return triton_unavailable(device)
        return None

    def fallback(self, device):
        return "ref"

    def default(self, device):
        return "triton" if device.type == "cuda" else "torch"

    def doctor_shapes(self, device_type):
        dtypes = ("bfloat16", "float32") if device_type == "cuda" else ("float32", "bfloat16")
        return [{"dtype": d, "softcap": False} for d in dtypes] + [
            {"dtype": dtypes[0], "softcap": True}
        ]

    def case(self, device, shape, timing, generator):
        dtype = self.dtype(shape)
        if timing:
            T, H, V = (8192, 4096, 32000) if device.type == "cuda" else (256, 256, 8192)
        else:
            T, H, V = 37, 64, 1000
        targets = torch.randint(0, V, (T,), generator=generator)
        targets[::5] = -100  # ignored tokens (prompt, padding)
        return {
            "hidden": randn(generator, (T, H), dtype, device),
            "weight": randn(generator, (V, H), dtype, device, H**-0.5),
            "targets": targets.to(device),
            "softcap": 30.0 if shape["softcap"] else None,
        }

    def reference(self, case):
        h, w = (case[n].detach().double().requires_grad_() for n in ("hidden", "weight"))
        loss = linear_cross_entropy_ref(h, w, case["targets"], softcap=case["softcap"])
        return [loss.detach(), *torch.autograd.grad(loss, (h, w))]

    def run(self, backend, case):
        faults.before(self.name, backend)
        h, w = (case[n].detach().clone().requires_grad_() for n in ("hidden", "weight"))
        loss = linear_cross_entropy(h, w, case["targets"], softcap=case["softcap"], backend=backend)
        grads = torch.autograd.grad(loss, (h, w))
        return list(faults.perturb(self.name, backend, (loss, *grads)))
