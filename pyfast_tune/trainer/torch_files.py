"""Loading DeepSpeed's ``*.pt`` files without running code in them: the one loader both the
trainer (resume, the weights-only check) and ``export`` (convert) use. A leaf module: it
imports nothing from pyfast_tune, so neither side depends on the other for it."""

from __future__ import annotations

from pathlib import Path

import torch

# Non-tensor objects DeepSpeed pickles into its checkpoint files. weights_only=True refuses
# anything else, so a checkpoint can never run code on load.
_SAFE_GLOBALS_NAMES = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _safe_globals() -> list:
    import importlib

    found = []
    for module, name in _SAFE_GLOBALS_NAMES:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return found


def safe_torch_load(path, map_location="cpu", mmap: bool = False):
    """``torch.load(weights_only=True)`` that also admits DeepSpeed's own plain records (the
    allow-list above): what every load of a DeepSpeed file in pyfast-tune goes through."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)


def load_ds_file(path: Path) -> dict:
    """``torch.load`` a DeepSpeed ``*.pt`` memory-mapped, weights only (no code runs)."""
    return safe_torch_load(path, mmap=True)
