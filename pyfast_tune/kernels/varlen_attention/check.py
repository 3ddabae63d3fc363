"""Varlen attention as the first-use guard checks it (``guard.Op``).

Backends on a device (ours first, the plainest last), a small random case with odd segment
lengths (forward and backward), the float64 reference, and a bigger representative shape for
the race. Shape class (``op.attention_shape``): dtype, head_dim, gqa (q heads per k/v head),
window [left, right] (right 0 = causal). The small case clips a window's left bound to 9 so it
bites. ``doctor_shapes`` lists the classes ``pyfast-tune doctor`` checks on a device type.
"""

from __future__ import annotations

import torch

from pyfast_tune.kernels.guard.op import Op, interpreting, randn, triton_unavailable
from pyfast_tune.kernels.varlen_attention import upstream
from pyfast_tune.kernels.varlen_attention.op import varlen_attention
from pyfast_tune.kernels.varlen_attention.ref import varlen_attention_ref


class VarlenAttention(Op):
    name = "varlen_attention"
    outputs = ("out", "dq", "dk", "dv")

    def backends(self, device):
        if device.type == "cuda":
            return ["triton", "torch_varlen", "flash_attn", "sdpa"]
        return ["cpp", *(["triton"] if interpreting() else []), "sdpa"]

    def upstreams(self, device):
        return ["torch_varlen", "flash_attn", "sdpa"] if device.type == "cuda" else ["sdpa"]

    def unavailable(self, backend, device, shape):
        dtype = self.dtype(shape)
        if backend in upstream.NAMES:
            return upstream.unavailable(backend, device, dtype, tuple(shape["window"]))
        if backend == "triton":
            if dtype == torch.float64:
                return "the Triton kernels take fp16/bf16/fp32"
            return triton_unavailable(device)
        if backend == "cpp" and device.type != "cpu":
            return "the C++ kernel runs on CPU tensors"
        return None

    def fallback(self, device):
        return "sdpa"

    def doctor_shapes(self, device_type):
        dtypes = (
            ("bfloat16", "float16", "float32") if device_type == "cuda" else ("float32", "bfloat16")
        )
        found = []
        for dtype in dtypes:
            found.append({"dtype": dtype, "head_dim": 128, "gqa": 4, "window": [-1, 0]})
            found.append({"dtype": dtype, "head_dim": 64, "gqa": 1, "window": [-1, 0]})
        found.append({"dtype": dtypes[0], "head_dim": 128, "gqa": 4, "window": [4095, 0]})
        return found

    def default(self, device):
        return "triton" if device.type == "cuda" else "cpp"

    def case(self, device, shape, timing, generator):
        dtype, d, gqa = self.dtype(shape), shape["head_dim"], shape["gqa"]
        left, right = shape["window"]
        if timing:  # on CPU small enough that racing two backends costs a fraction of a second
            n, hkv = (8, 8) if device.type == "cuda" else (2, 1)
            lens = [1024 if device.type == "cuda" else 128] * n
        else:
            lens, hkv = [13, 1, 37, 21], 2
            left = min(left, 9) if left >= 0 else left
            right = min(right, 9) if right >= 0 else right
        total, h = sum(lens), hkv * gqa
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        return {
            "q": randn(generator, (total, h, d), dtype, device),
            "k": randn(generator, (total, hkv, d), dtype, device),
            "v": randn(generator, (total, hkv, d), dtype, device),
            "dout": randn(generator, (total, h, d), dtype, device),
            "cu": cu.to(device),
            "max": max(lens),
            "scale": d**-0.5,
            "window": (left, right),
        }

    def reference(self, case):
        q, k, v = (case[n].detach().double().requires_grad_() for n in "qkv")
        cu, m, w = case["cu"], case["max"], case["window"]
        out = varlen_attention_ref(q, k, v, cu, cu, m, m, w[1] == 0, case["scale"], w)
        grads = torch.autograd.grad(out, (q, k, v), case["dout"].double())
        return [out.detach(), *grads]

    def run(self, backend, case):
        q, k, v = (case[n].detach().clone().requires_grad_() for n in "qkv")
        cu, m, w = case["cu"], case["max"], case["window"]
        out = varlen_attention(
            q, k, v, cu, cu, m, m, causal=w[1] == 0, softmax_scale=case["scale"], window=w,
            backend=backend,
        )  # fmt: skip
        return [out, *torch.autograd.grad(out, (q, k, v), case["dout"])]
