"""The fused LoRA linear as the first-use guard checks it (``guard.Op``), against peft's own
layer. Shape class (``op.lora_shape``): dtype (x, W), adapter_dtype (A, B: peft keeps them in
fp32 on a bf16 model), rank, four_bit (a bitsandbytes NF4 base weight)."""

from __future__ import annotations

import torch

from pyfast_tune.kernels.guard import faults
from pyfast_tune.kernels.guard.op import Op, interpreting, randn, triton_unavailable
from pyfast_tune.kernels.lora.op import lora_linear
from pyfast_tune.kernels.lora.upstream import peft_lora_layer


class LoraLinear(Op):
    name = "lora_linear"
    outputs = ("y", "dx", "dA", "dB")

    def backends(self, device):
        if device.type == "cuda":
            return ["triton", "torch", "peft"]
        return ["torch", *(["triton"] if interpreting() else []), "peft"]

    def upstreams(self, device):
        return ["peft"]

    def unavailable(self, backend, device, shape):
        if shape["four_bit"]:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as e:
                return f"a 4-bit base needs bitsandbytes ({e})"
        if backend == "peft":
            try:
                import peft  # noqa: F401
            except ImportError as e:
                return f"peft is not installed ({e})"
        if backend == "triton":
            return triton_unavailable(device)
        return None

    def fallback(self, device):
        return "peft"

    def doctor_shapes(self, device_type):
        half = ("bfloat16", "float16") if device_type == "cuda" else ("bfloat16",)
        found = [{"dtype": "float32", "adapter_dtype": "float32", "rank": 16, "four_bit": False}]
        for dtype in half:  # peft keeps adapters in fp32 on a half-precision model
            found.append(
                {"dtype": dtype, "adapter_dtype": "float32", "rank": 16, "four_bit": False}
            )
        found.append({"dtype": half[0], "adapter_dtype": half[0], "rank": 64, "four_bit": False})
        found.append({"dtype": half[0], "adapter_dtype": "float32", "rank": 16, "four_bit": True})
        return found

    def default(self, device):
        return "triton" if device.type == "cuda" else "torch"

    def case(self, device, shape, timing, generator):
        dtype, adt, r = self.dtype(shape), getattr(torch, shape["adapter_dtype"]), shape["rank"]
        if timing:
            M, K, N = (8192, 4096, 4096) if device.type == "cuda" else (256, 256, 256)
        else:
            # K a multiple of 64: bitsandbytes' CPU 4-bit path mis-indexes other even sizes
            M, K, N = 37, max(128, -(-2 * r // 64) * 64), 96
        W = randn(generator, (N, K), dtype, device, K**-0.5)
        case = {
            "x": randn(generator, (M, K), dtype, device),
            "A": randn(generator, (r, K), adt, device, K**-0.5),
            "B": randn(generator, (N, r), adt, device, 0.1),
            "dy": randn(generator, (M, N), dtype, device),
            "scaling": 2.0,
            "W": W,
            "W_ref": W,
        }
        if shape["four_bit"]:
            from bitsandbytes.functional import dequantize_4bit

            case["peft"] = peft_lora_layer(W, case["A"], case["B"], 2.0 * r, True, dtype)
            case["W"] = case["peft"].get_base_layer().weight
            case["W_ref"] = dequantize_4bit(case["W"].data, case["W"].quant_state)
        return case

    def reference(self, case):
        x, A, B = (case[n].detach().double().requires_grad_() for n in "xAB")
        y = x @ case["W_ref"].double().t() + case["scaling"] * ((x @ A.t()) @ B.t())
        return [y.detach(), *torch.autograd.grad(y, (x, A, B), case["dy"].double())]

    def run(self, backend, case):
        x = case["x"].detach().clone().requires_grad_()
        if backend == "peft":
            faults.before(self.name, backend)
            if "peft" not in case:
                r = case["A"].shape[0]
                case["peft"] = peft_lora_layer(case["W"], case["A"], case["B"], 2.0 * r, False)
            layer = case["peft"]
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            y = faults.perturb(self.name, backend, layer(x))
        else:
            A, B = (case[n].detach().clone().requires_grad_() for n in "AB")
            y = lora_linear(x, case["W"], A, B, case["scaling"], 0.0, backend=backend)
        return [y, *torch.autograd.grad(y, (x, A, B), case["dy"])]
