"""peft's own LoRA layer, the upstream the fused op is checked and raced against."""

from __future__ import annotations

import torch


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
