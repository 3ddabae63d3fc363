"""The ops the first-use guard checks: varlen attention and the fused LoRA linear.

Each is a ``guard.Op``: its backends on a device (ours first, the plainest last), a small random
case with odd segment lengths (forward and backward), the float64 reference, and a bigger
representative shape for the race. Adding an op is one more subclass and ``register`` call.

Shape classes:

- ``varlen_attention``: dtype, head_dim, gqa (q heads per k/v head), window [left, right]
  (right 0 = causal). The small case clips a window's left bound to 9 so it bites.
- ``lora_linear``: dtype (x, W), adapter_dtype (A, B: peft keeps them in fp32 on a bf16
  model), rank, four_bit (a bitsandbytes NF4 base weight).
- ``linear_cross_entropy``: dtype, softcap (whether logits are soft-capped).

``doctor_shapes`` lists the classes ``pyfast-tune doctor`` checks on a device type.
"""

from __future__ import annotations

import os

import torch

from pyfast_tune.kernels import attention_upstream, faults
from pyfast_tune.kernels.guard import Op, register


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda" and not _interpreting():
        return "Triton needs CUDA (or TRITON_INTERPRET=1 to run in the interpreter on CPU)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    return None


def _randn(gen, shape, dtype, device, std=1.0):
    return (torch.randn(shape, generator=gen) * std).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------
# varlen attention


def attention_shape(q, k, window, causal: bool) -> dict:
    """The shape class of a varlen attention call."""
    left, right = int(window[0]), int(window[1])
    return {
        "dtype": str(q.dtype).removeprefix("torch."),
        "head_dim": int(q.shape[-1]),
        "gqa": int(q.shape[1] // max(1, k.shape[1])),
        "window": [max(left, -1), 0 if causal else max(right, -1)],
    }


class VarlenAttention(Op):
    name = "varlen_attention"
    outputs = ("out", "dq", "dk", "dv")
    OURS = ("triton", "cpp")

    def backends(self, device):
        if device.type == "cuda":
            return ["triton", "torch_varlen", "flash_attn", "sdpa"]
        return ["cpp", *(["triton"] if _interpreting() else []), "sdpa"]

    def upstreams(self, device):
        return ["torch_varlen", "flash_attn", "sdpa"] if device.type == "cuda" else ["sdpa"]

    def raced(self, backend, device):
        return not (backend == "triton" and device.type != "cuda")  # the interpreter: too slow

    def unavailable(self, backend, device, shape):
        dtype = self.dtype(shape)
        if backend in attention_upstream.NAMES:
            return attention_upstream.unavailable(backend, device, dtype, tuple(shape["window"]))
        if backend == "triton":
            if dtype == torch.float64:
                return "the Triton kernels take fp16/bf16/fp32"
            return _triton_unavailable(device)
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
            "q": _randn(generator, (total, h, d), dtype, device),
            "k": _randn(generator, (total, hkv, d), dtype, device),
            "v": _randn(generator, (total, hkv, d), dtype, device),
            "dout": _randn(generator, (total, h, d), dtype, device),
            "cu": cu.to(device),
            "max": max(lens),
            "scale": d**-0.5,
            "window": (left, right),
        }

    def reference(self, case):
        from pyfast_tune.kernels.varlen_attention_ref import varlen_attention_ref

        q, k, v = (case[n].detach().double().requires_grad_() for n in "qkv")
        cu, m, w = case["cu"], case["max"], case["window"]
        out = varlen_attention_ref(q, k, v, cu, cu, m, m, w[1] == 0, case["scale"], w)
        grads = torch.autograd.grad(out, (q, k, v), case["dout"].double())
        return [out.detach(), *grads]

    def run(self, backend, case):
        from pyfast_tune.kernels.varlen_attention import varlen_attention

        q, k, v = (case[n].detach().clone().requires_grad_() for n in "qkv")
        cu, m, w = case["cu"], case["max"], case["window"]
        out = varlen_attention(
            q, k, v, cu, cu, m, m, causal=w[1] == 0, softmax_scale=case["scale"], window=w,
            backend=backend,
        )  # fmt: skip
        return [out, *torch.autograd.grad(out, (q, k, v), case["dout"])]


# ---------------------------------------------------------------------------------------
# fused LoRA linear


def lora_shape(dtype: torch.dtype, A, W_is_4bit: bool) -> dict:
    """The shape class of a LoRA layer call: x's (compute) dtype, the adapter's, rank, 4-bit."""
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "adapter_dtype": str(A.dtype).removeprefix("torch."),
        "rank": int(A.shape[0]),
        "four_bit": bool(W_is_4bit),
    }


def peft_lora_layer(W, A, B, alpha: float, four_bit: bool, compute_dtype=None):
    """A peft LoRA ``Linear`` (or ``Linear4bit`` over a bitsandbytes NF4 base) holding W, A, B.

    Built through ``get_peft_model`` on a one-layer model (the stable public API).
    ``W``: (out, in) dense, quantized here when ``four_bit``. Returns the layer, in train mode.
    """
    from peft import LoraConfig, get_peft_model

    N, K = W.shape
    r = A.shape[0]
    if four_bit:
        import bitsandbytes as bnb

        base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(W.detach().float().cpu(), requires_grad=False,
                                        quant_type="nf4")  # fmt: skip
        base = base.to(W.device)  # quantizes
    else:
        base = torch.nn.Linear(K, N, bias=False, dtype=W.dtype, device=W.device)
        with torch.no_grad():
            base.weight.copy_(W)
    model = get_peft_model(
        torch.nn.Sequential(base),
        LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["0"]),
    )
    layer = model.base_model.model[0]
    layer.lora_A["default"].to(device=A.device, dtype=A.dtype)
    layer.lora_B["default"].to(device=B.device, dtype=B.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer.train()


class LoraLinear(Op):
    name = "lora_linear"
    outputs = ("y", "dx", "dA", "dB")
    OURS = ("triton", "torch")

    def backends(self, device):
        if device.type == "cuda":
            return ["triton", "torch", "peft"]
        return ["torch", *(["triton"] if _interpreting() else []), "peft"]

    def upstreams(self, device):
        return ["peft"]

    def raced(self, backend, device):
        return not (backend == "triton" and device.type != "cuda")

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
            return _triton_unavailable(device)
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
        W = _randn(generator, (N, K), dtype, device, K**-0.5)
        case = {
            "x": _randn(generator, (M, K), dtype, device),
            "A": _randn(generator, (r, K), adt, device, K**-0.5),
            "B": _randn(generator, (N, r), adt, device, 0.1),
            "dy": _randn(generator, (M, N), dtype, device),
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
            from pyfast_tune.kernels.lora import lora_linear

            A, B = (case[n].detach().clone().requires_grad_() for n in "AB")
            y = lora_linear(x, case["W"], A, B, case["scaling"], 0.0, backend=backend)
        return [y, *torch.autograd.grad(y, (x, A, B), case["dy"])]


# ---------------------------------------------------------------------------------------
# fused linear cross-entropy (the LM head's loss without the logits)


class LinearCrossEntropy(Op):
    """Our chunked op (``triton``, ``torch``) against ``ref``: PyTorch's own
    ``F.cross_entropy`` over the whole logits in the same dtype, the upstream baseline (checked,
    not raced). Faults are injected here, around the op, for all three."""

    name = "linear_cross_entropy"
    outputs = ("loss", "dhidden", "dweight")

    def backends(self, device):
        if device.type == "cuda":
            return ["triton", "torch", "ref"]
        return ["torch", *(["triton"] if _interpreting() else []), "ref"]

    def upstreams(self, device):
        return ["ref"]

    def raced(self, backend, device):
        # ref is the baseline, never a choice: it holds the (T, V) logits the op exists to avoid
        return backend != "ref" and not (backend == "triton" and device.type != "cuda")

    def unavailable(self, backend, device, shape):
        if backend == "triton":
            if self.dtype(shape) == torch.float64:
                return "the Triton kernels take fp16/bf16/fp32"
            return _triton_unavailable(device)
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
            "hidden": _randn(generator, (T, H), dtype, device),
            "weight": _randn(generator, (V, H), dtype, device, H**-0.5),
            "targets": targets.to(device),
            "softcap": 30.0 if shape["softcap"] else None,
        }

    def reference(self, case):
        from pyfast_tune.kernels.linear_cross_entropy_ref import linear_cross_entropy_ref

        h, w = (case[n].detach().double().requires_grad_() for n in ("hidden", "weight"))
        loss = linear_cross_entropy_ref(h, w, case["targets"], softcap=case["softcap"])
        return [loss.detach(), *torch.autograd.grad(loss, (h, w))]

    def run(self, backend, case):
        from pyfast_tune.kernels.linear_cross_entropy import linear_cross_entropy

        faults.before(self.name, backend)
        h, w = (case[n].detach().clone().requires_grad_() for n in ("hidden", "weight"))
        loss = linear_cross_entropy(h, w, case["targets"], softcap=case["softcap"], backend=backend)
        grads = torch.autograd.grad(loss, (h, w))
        return list(faults.perturb(self.name, backend, (loss, *grads)))


register(VarlenAttention())
register(LoraLinear())
register(LinearCrossEntropy())
