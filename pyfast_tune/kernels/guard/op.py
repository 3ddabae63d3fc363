"""What an op gives the first-use guard: ``Op`` (backends, a random case, the reference) and
the helpers its subclasses share.

Each op's subclass lives in its own package (``pyfast_tune.kernels.<op>.check``); the guard
finds it by name through ``registry``, never by importing it here.
"""

from __future__ import annotations

import abc
import os
from typing import Any

import torch

# flash-attention's test rule, as this project's kernel tests apply it: the forward output's
# error at most 2x the upstream's in the same dtype, gradients' at most 3x (they pass through
# more roundings). Measured on CPU, correct backends sit at 0.2-2x of per-sample SDPA.
FORWARD_RULE, GRADIENT_RULE = 2.0, 3.0


class Op(abc.ABC):
    """One op the guard checks. Subclasses give the backends, a random case, the reference.

    ``shape`` is a JSON-able dict naming the shape class. ``case`` builds random inputs from
    ``generator`` (never the global RNG, so training's dropout masks do not move);
    ``reference`` returns the outputs (forward result, then gradients) in float64; ``run``
    returns the same outputs from one backend. ``timing=True`` asks for the representative
    (bigger) shape the race is timed on.
    """

    name: str = ""
    outputs: tuple[str, ...] = ()  # the forward result first, then gradients

    def rules(self) -> list[float]:
        """Allowed error ratio per output (the forward rule, then the gradient rule)."""
        return [FORWARD_RULE] + [GRADIENT_RULE] * (len(self.outputs) - 1)

    @abc.abstractmethod
    def backends(self, device: torch.device) -> list[str]:
        """Every backend worth checking on ``device``, ours first, the safe one last."""
        raise NotImplementedError

    @abc.abstractmethod
    def upstreams(self, device: torch.device) -> list[str]:
        """Upstream backends in the order they serve as the baseline."""
        raise NotImplementedError

    def raced(self, backend: str, device: torch.device) -> bool:
        """Whether the backend may be chosen by the race here: not Triton off CUDA (the
        interpreter is checked, but far too slow to train with)."""
        return not (backend == "triton" and device.type != "cuda")

    def unavailable(self, backend: str, device: torch.device, shape: dict) -> str | None:
        """Why ``backend`` cannot run this shape class here (not a failure), else None."""
        return None

    @abc.abstractmethod
    def fallback(self, device: torch.device) -> str:
        """Used unchecked when no backend passes (the plainest implementation)."""
        raise NotImplementedError

    def doctor_shapes(self, device_type: str) -> list[dict]:
        """The shape classes ``pyfast-tune doctor`` checks on this device type."""
        return []

    @abc.abstractmethod
    def default(self, device: torch.device) -> str:
        """Used while tracing (torch.compile, fake tensors) when no decision exists yet."""
        raise NotImplementedError

    @abc.abstractmethod
    def case(self, device: torch.device, shape: dict, timing: bool, generator) -> Any:
        raise NotImplementedError

    @abc.abstractmethod
    def reference(self, case: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    @abc.abstractmethod
    def run(self, backend: str, case: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def dtype(self, shape: dict) -> torch.dtype:
        return getattr(torch, shape["dtype"])


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (CPU) in this process."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` here, else None."""
    if device.type != "cuda" and not interpreting():
        return "Triton needs CUDA (or TRITON_INTERPRET=1 to run in the interpreter on CPU)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    return None


def randn(gen, shape, dtype, device, std=1.0):
    """Normal noise from ``gen`` (a CPU generator: the same case on every device)."""
    return (torch.randn(shape, generator=gen) * std).to(dtype=dtype, device=device)
