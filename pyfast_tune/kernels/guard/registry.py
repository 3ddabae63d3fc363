"""The guard's op registry, a leaf: ops are known by name and the module path of their
``guard.Op`` subclass, imported on first use.

The ops call the guard, so the guard must not import them: ``pyfast_tune.kernels`` declares
where each op's check lives (``declare_ops``), and ``get_op`` imports it when the guard first
needs it. ``register`` adds an instance directly (tests, plugins).
"""

from __future__ import annotations

import importlib
import threading

from pyfast_tune.kernels.guard.op import Op

REGISTRY: dict[str, Op] = {}
LOCATIONS: dict[str, str] = {}  # op name -> "package.module:OpSubclass"
_LOCK = threading.Lock()


def declare_ops(locations: dict[str, str]) -> None:
    """Say where ops live: ``{"varlen_attention": "pyfast_tune.kernels.varlen_attention.check:
    VarlenAttention"}``; nothing is imported until ``get_op`` asks for one."""
    for name, where in locations.items():
        module, sep, attr = where.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"guard: op {name!r}: expected 'module:Class', got {where!r}")
        LOCATIONS[name] = where


def register(op: Op) -> Op:
    """Add ``op`` to the guard (replacing one of the same name). Returns it."""
    REGISTRY[op.name] = op
    return op


def get_op(name: str) -> Op:
    """The op called ``name``, its check module imported on first use."""
    with _LOCK:
        if name not in REGISTRY and name in LOCATIONS:
            module, _, attr = LOCATIONS[name].partition(":")
            op = getattr(importlib.import_module(module), attr)()
            if op.name != name:
                raise RuntimeError(f"guard: {LOCATIONS[name]} is op {op.name!r}, not {name!r}")
            REGISTRY[name] = op
    if name not in REGISTRY:
        raise KeyError(f"guard: unknown op {name!r}; known: {op_names()}")
    return REGISTRY[name]


def op_names() -> list[str]:
    """Every op the guard knows, declared or registered, sorted."""
    return sorted(set(REGISTRY) | set(LOCATIONS))
