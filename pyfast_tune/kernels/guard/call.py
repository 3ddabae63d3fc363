"""Running an op under the guard: the one retry loop every guarded op shares, and the two
questions it asks (is this call being traced? did the backend fail, or the caller?)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from pyfast_tune.kernels.guard.decision import choose, decided, demote
from pyfast_tune.kernels.guard.registry import get_op

T = TypeVar("T")


def call_guarded(
    op_name: str,
    device: torch.device,
    shape: dict,
    run: Callable[[str], T],
    tensors: tuple[torch.Tensor, ...],
    prefer: str | None = None,
    allowed: tuple[str, ...] | None = None,
) -> T:
    """``run(backend)`` with the guard's choice for this device and shape class; a backend that
    passed its check but fails at run time is demoted (warned about, never chosen again in this
    process) and the next correct one runs. While ``tensors`` are traced (torch.compile, fake
    tensors) nothing is checked: the decision made eagerly runs, else the op's default.

    ``allowed``: only these backends (e.g. those that return attention's log-sum-exp).
    """
    if tracing(*tensors):
        backend = decided(op_name, device, shape, prefer)
        if allowed is not None and backend not in allowed:
            backend = get_op(op_name).default(torch.device(device))
        return run(backend)
    tried = set()
    backend = choose(op_name, device, shape, prefer, allowed)
    while True:
        try:
            return run(backend)
        except Exception as e:
            if not backend_failure(e):
                raise
            tried.add(backend)
            demote(op_name, device, shape, prefer, backend, e)
            backend = choose(op_name, device, shape, prefer, allowed)
            if backend in tried:
                raise


def backend_failure(e: BaseException) -> bool:
    """Whether an exception from a backend's call means the backend failed (build, compile,
    launch, a CUDA error) rather than the caller (bad input, out of memory) or autograd's own
    control flow (activation checkpointing stops a recomputation by raising)."""
    if isinstance(e, (ValueError, TypeError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return False
    if type(e).__module__.startswith("torch.utils.checkpoint"):
        return False
    return isinstance(e, (RuntimeError, ImportError, OSError, AssertionError)) or type(
        e
    ).__module__.startswith("triton")


def tracing(*tensors: torch.Tensor) -> bool:
    """True inside torch.compile / export tracing or on fake or meta tensors: no checks run."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and getattr(compiler, "is_compiling", lambda: False)():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(t) or t.device.type == "meta" for t in tensors)
