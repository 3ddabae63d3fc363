"""Fault switch for testing the first-use guard: make one backend wrong or make it fail.

``PYFAST_TUNE_FAULTS`` is a comma-separated list of ``op.backend=kind`` entries, kind being
``wrong`` (the backend returns a visibly perturbed result, forward and gradients) or ``raise``
(it raises ``InjectedFault``)::

    PYFAST_TUNE_FAULTS="varlen_attention.cpp=wrong"
    PYFAST_TUNE_FAULTS="varlen_attention.triton=raise,lora_linear.torch=wrong"

It is a debugging switch: with it set, ``pyfast-tune doctor`` must report the backend as
incorrect (exit status 1) and training must fall back to the next backend with a warning that
names it. The variable is read on every call (cheap), so tests can set it per case.

>>> import os; os.environ["PYFAST_TUNE_FAULTS"] = "varlen_attention.cpp=raise"
>>> active("varlen_attention", "cpp")
'raise'
>>> del os.environ["PYFAST_TUNE_FAULTS"]
"""

from __future__ import annotations

import functools
import os

ENV = "PYFAST_TUNE_FAULTS"
KINDS = ("wrong", "raise")


class InjectedFault(RuntimeError):
    """Raised by a backend that ``PYFAST_TUNE_FAULTS`` set to ``raise``."""


@functools.lru_cache(maxsize=8)
def _parse(spec: str) -> dict[tuple[str, str], str]:
    faults: dict[tuple[str, str], str] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, sep, kind = entry.partition("=")
        op, dot, backend = name.strip().rpartition(".")
        kind = kind.strip()
        if not sep or not dot or not op or not backend or kind not in KINDS:
            raise ValueError(
                f"{ENV}: expected comma-separated 'op.backend=kind' entries with kind in "
                f"{KINDS} (e.g. varlen_attention.cpp=wrong), got {entry!r}"
            )
        faults[(op, backend.strip())] = kind
    return faults


def faults() -> dict[tuple[str, str], str]:
    """{(op, backend): kind} from the environment now."""
    return _parse(os.environ.get(ENV, ""))


def active(op: str, backend: str) -> str | None:
    """The fault set for ``op.backend`` ("wrong" / "raise"), or None."""
    spec = os.environ.get(ENV)
    return _parse(spec).get((op, backend)) if spec else None


def ops_with_faults() -> set[str]:
    """Ops that have any fault set (the guard neither reads nor writes their disk cache)."""
    return {op for op, _ in faults()}


def before(op: str, backend: str) -> None:
    """Raise ``InjectedFault`` if ``op.backend`` is set to ``raise``."""
    if active(op, backend) == "raise":
        raise InjectedFault(f"{op}.{backend}: fault injected by {ENV}")


def perturb(op: str, backend: str, outputs):
    """``outputs`` (a tensor or a tuple of tensors/None), perturbed if ``op.backend`` is ``wrong``.

    Each floating tensor t becomes ``t + (max|t| + 1)``: wrong by more than its own magnitude in
    every dtype, so no tolerance can mistake it for rounding. Out of place and differentiable,
    so gradients still flow through a perturbed forward.
    """
    if active(op, backend) != "wrong":
        return outputs

    def bump(t):
        if t is None or not t.is_floating_point():
            return t
        return t + (t.detach().abs().amax().float() + 1.0).to(t.dtype)

    if isinstance(outputs, tuple):
        return tuple(bump(t) for t in outputs)
    return bump(outputs)
