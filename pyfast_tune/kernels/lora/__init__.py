"""Fused LoRA linear: the public op (``op``), its Triton kernels (``triton``), the pure-PyTorch
reference (``ref``), peft's own layer as the upstream (``upstream``), the wiring that routes peft
models through the op (``patch_peft``) and how the first-use guard checks it (``check``,
imported by the guard on first use only)."""

from pyfast_tune.kernels.lora.op import lora_dropout_mask, lora_linear, lora_shape
from pyfast_tune.kernels.lora.patch_peft import guard_shapes, patch_peft_lora, unpatch_peft_lora
from pyfast_tune.kernels.lora.ref import lora_linear_ref

__all__ = [
    "lora_linear",
    "lora_linear_ref",
    "lora_dropout_mask",
    "lora_shape",
    "patch_peft_lora",
    "unpatch_peft_lora",
    "guard_shapes",
]
