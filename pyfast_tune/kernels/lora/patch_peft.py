"""Routing peft's LoRA layers through the fused op: ``patch_peft_lora`` replaces the forward of
every vanilla LoRA ``Linear`` / ``Linear4bit`` with one that calls ``lora_linear`` (with
``backend="auto"``: the first-use guard's choice, peft's own forward among the candidates).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from pyfast_tune.kernels import guard
from pyfast_tune.kernels.lora.op import BACKENDS, OP, is_4bit, lora_linear, lora_shape

_ORIG = "_pyfast_tune_lora_backend"


def _peft_lora_types() -> tuple[type, ...]:
    from peft.tuners.lora import layer

    found: list[type] = [layer.Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        found.append(Linear4bit)
    except ImportError:  # bitsandbytes absent: no QLoRA layers can exist
        pass
    return tuple(found)


def _eligible(module: Any) -> bool:
    """Vanilla LoRA on an nn.Linear / bnb Linear4bit base: no DoRA or other variant, no lora bias."""
    base = module.get_base_layer()
    if getattr(module, "fan_in_fan_out", False) or module.lora_variant:
        return False
    if any(module.lora_bias.values()) or any(getattr(module, "use_dora", {}).values()):
        return False
    return isinstance(base, torch.nn.Linear) or is_4bit(getattr(base, "weight", None))


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft ``lora.Linear`` / ``Linear4bit`` forward through ``lora_linear``.

    Cases the fused op does not cover (adapters disabled or merged, several active adapters,
    mixed-adapter batches, extra arguments, autocast, ZeRO-3 partitioned weights) go to peft's
    own forward.
    """
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    base = self.get_base_layer()
    fallback = (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(adapters) != 1
        or torch.is_autocast_enabled(x.device.type)
    )
    if not fallback:
        A = self.lora_A[adapters[0]].weight
        B = self.lora_B[adapters[0]].weight
        if x.dtype != A.dtype and not getattr(self, "cast_input_dtype_enabled", True):
            fallback = True
        # DeepSpeed ZeRO-3 gathers a partitioned weight only when its own module runs; the
        # fused op reads W, A and B directly, so it leaves those layers to peft.
        if any(getattr(t, "ds_id", None) is not None for t in (A, B, base.weight)):
            fallback = True
    if not fallback and is_4bit(base.weight):
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
        if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
            fallback = True  # bitsandbytes repacked W for CPU inference: its own layout
    elif not fallback and x.dtype != base.weight.dtype:
        fallback = True
    if fallback:
        return type(self).forward(self, x, *args, **kwargs)

    self._check_forward_args(x)
    adapter = adapters[0]
    drop = self.lora_dropout[adapter]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    four_bit = is_4bit(base.weight)
    if four_bit and not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    cdt = (base.compute_dtype or x.dtype) if four_bit else x.dtype
    bias = None if base.bias is None else base.bias.to(cdt)
    backend = getattr(self, _ORIG)
    if backend != "auto":
        y = lora_linear(x.to(cdt), base.weight, A, B, self.scaling[adapter], p, bias, backend)
        return y.to(x.dtype)

    # "auto": the first-use guard's choice for this shape class, peft's own forward included
    def run(backend: str) -> torch.Tensor:
        if backend == "peft":
            return type(self).forward(self, x, *args, **kwargs)
        y = lora_linear(x.to(cdt), base.weight, A, B, self.scaling[adapter], p, bias, backend)
        return y.to(x.dtype)

    return guard.call_guarded(OP, x.device, lora_shape(cdt, A, four_bit), run, tensors=(x, A))


def patch_peft_lora(model: torch.nn.Module, backend: str = "auto") -> int:
    """Route every vanilla peft LoRA ``Linear`` / ``Linear4bit`` forward through ``lora_linear``.

    Only the forward changes (an instance attribute shadows the class method); weights,
    ``merge``/``unmerge`` and saved adapters are untouched. Idempotent.

    Args:
        model: any module tree holding peft LoRA layers (e.g. a ``PeftModel``).
        backend: "auto": per shape class (dtypes, rank, 4-bit), the first-use guard's choice
            among the Triton and torch backends and peft's own forward (checked against a
            float64 reference, then raced; see ``pyfast_tune.kernels.guard``); "torch" or
            "triton": that backend of ``lora_linear``, unchecked.
    Returns:
        the number of layers that run the fused forward after the call.
    Example:
        >>> n = patch_peft_lora(peft_model)          # doctest: +SKIP
        >>> unpatch_peft_lora(peft_model) == n       # doctest: +SKIP
        True
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    lora_types = _peft_lora_types()
    count = 0
    for module in model.modules():
        if isinstance(module, lora_types) and _eligible(module):
            setattr(module, _ORIG, backend)
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def guard_shapes(model: torch.nn.Module) -> list[tuple[torch.device, dict]]:
    """(device, shape class) of every layer ``patch_peft_lora(model, "auto")`` routes through
    the first-use guard, once each, so the guard can decide before the first (maybe traced)
    forward. A 4-bit layer whose compute dtype is not known yet is decided on first use."""
    found: dict[str, tuple[torch.device, dict]] = {}
    for module in model.modules():
        if module.__dict__.get(_ORIG) != "auto":
            continue
        base = module.get_base_layer()
        four_bit = is_4bit(base.weight)
        dtype = base.compute_dtype if four_bit else base.weight.dtype
        for adapter in module.active_adapters:
            if dtype is None or adapter not in module.lora_A:
                continue
            A = module.lora_A[adapter].weight
            shape = lora_shape(dtype, A, four_bit)
            found.setdefault(f"{A.device}{sorted(shape.items())}", (A.device, shape))
    return list(found.values())


def unpatch_peft_lora(model: torch.nn.Module) -> int:
    """Undo ``patch_peft_lora``: peft's own forward again. Returns the number of layers restored."""
    count = 0
    for module in model.modules():
        if _ORIG in module.__dict__:
            del module.__dict__[_ORIG]
            module.__dict__.pop("forward", None)
            count += 1
    return count
