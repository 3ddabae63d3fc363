"""First-use guard: an op proves itself on this device before it trains.

The first time an op runs on a device for a *shape class* (what changes which code runs: dtype,
head dim, GQA ratio and window for attention; dtypes, rank and 4-bit for LoRA), every backend
that can run here is checked on a small random case, forward and backward, against a float64
reference, with flash-attention's rule: a backend is correct when its error is at most 2x
(forward; 3x for gradients) the error of an upstream implementation in the same dtype (torch's
``varlen_attn``, flash-attn, per-sample SDPA, peft). The correct ones are then timed on a
representative shape and the fastest runs. A backend that fails to compile, launch or pass
never trains: the next one takes over with a warning naming it and saying why.

The decision is cached in-process and on disk, one file per (op, shape class, device name,
torch/Triton/CUDA/driver versions, hash of our kernel sources), written atomically under
``$PYFAST_TUNE_CACHE`` (default ``~/.cache/pyfast_tune/guard``). Ops with a fault set by
``PYFAST_TUNE_FAULTS`` (see ``faults``) skip the disk cache both ways. Only rank 0 logs the
decision; every rank warns about a backend it rejected.

Each op is a ``guard.Op`` subclass in its own package, found by name (``registry``)::

    >>> from pyfast_tune.kernels import guard                                  # doctest: +SKIP
    >>> guard.choose("varlen_attention", torch.device("cpu"),
    ...              {"dtype": "float32", "head_dim": 64, "gqa": 2, "window": [-1, 0]})
    'cpp'
"""

from __future__ import annotations

import logging
import threading

import torch

from pyfast_tune.kernels.guard import cache, check, faults
from pyfast_tune.kernels.guard.check import Check, Decision, short
from pyfast_tune.kernels.guard.environment import rank, who
from pyfast_tune.kernels.guard.op import Op
from pyfast_tune.kernels.guard.registry import get_op

log = logging.getLogger("pyfast_tune.guard")

_LOCK = threading.RLock()
_DECISIONS: dict[tuple, Decision] = {}


def _key(op: str, device: torch.device, shape: dict, prefer: str | None) -> tuple:
    items = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(shape.items()))
    return (op, str(device), items, prefer)


def describe(shape: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in shape.items())


def _report(decision: Decision) -> None:
    where = f"{decision.op} on {decision.device} ({describe(decision.shape)})"
    for c in decision.checks:
        asked = c.backend == decision.prefer
        if decision.source == "checked" and (c.ok is False or (c.ok is None and asked)):
            log.warning(
                "%sguard: %s: backend '%s' %s: %s; using '%s'",
                who(), where, c.backend, "rejected" if c.ok is False else "cannot run here",
                c.error, decision.chosen,
            )  # fmt: skip
    if decision.source == "unchecked":
        log.warning("%sguard: %s: could not be checked (%s); using '%s' unchecked",
                    who(), where, decision.error, decision.chosen)  # fmt: skip
    if rank() != 0:
        return
    parts = []
    for c in decision.checks:
        if c.ok is None:
            continue
        state = "ok" if c.ok else "FAILED"
        extra = f" {c.error_ratio:g}x" if c.error_ratio is not None else ""
        extra += f" {c.ms:g} ms" if c.ms is not None else ""
        parts.append(f"{c.backend} {state}{extra}")
    rejected = [c.backend for c in decision.checks if c.ok is False]
    level = logging.WARNING if rejected and decision.source != "checked" else logging.INFO
    log.log(level, "guard: %s: %s -> %s (%s)", where, ", ".join(parts), decision.chosen,
            decision.source)  # fmt: skip


def decide(op_name: str, device: torch.device, shape: dict, prefer: str | None = None) -> Decision:
    """The decision for this op, device and shape class: from memory, disk, or checked now.

    ``prefer``: an explicit backend; it is checked but not raced, and used when correct.
    """
    device = torch.device(device)
    key = _key(op_name, device, shape, prefer)
    with _LOCK:
        if key in _DECISIONS:
            return _DECISIONS[key]
        op = get_op(op_name)
        use_disk = op_name not in faults.ops_with_faults()
        path, disk_key = (
            cache.disk_path(op_name, device, shape, prefer) if use_disk else (None, None)
        )
        decision = cache.read(path, disk_key) if use_disk else None
        if decision is None:
            try:
                decision = _check_and_race(op, device, shape, prefer)
            except Exception as e:  # the check itself broke (its case, the reference): never
                # let that stop training; the op's default runs, and the next process retries
                default = prefer or op.default(device)
                decision = Decision(op_name, str(device), dict(shape), default, [], prefer,
                                    "unchecked", short(e))  # fmt: skip
            if use_disk and decision.source == "checked":
                cache.write(path, disk_key, decision)
        _DECISIONS[key] = decision
        _report(decision)
        return decision


def check_now(op_name: str, device: torch.device, shape: dict) -> Decision:
    """Check every backend (those the race skips here too, e.g. Triton in the interpreter) and
    race the raced ones, bypassing and leaving alone every cache; logs nothing. For doctor."""
    return _check_and_race(get_op(op_name), torch.device(device), shape, None, unraced=True)


def _check_and_race(
    op: Op, device: torch.device, shape: dict, prefer: str | None, unraced: bool = False
) -> Decision:
    candidates = [b for b in op.backends(device) if unraced or op.raced(b, device)]
    checks: list[Check] = []
    chosen = None
    if prefer is not None:
        checks = check.evaluate(op, device, shape, [prefer], race=False)
        if checks[0].ok:
            chosen = prefer
        candidates = [b for b in candidates if b != prefer]
    if chosen is None:
        checks += check.evaluate(op, device, shape, candidates, race=True)
        ok = [c for c in checks if c.ok and c.raced and c.ms is not None]
        if ok:
            chosen = min(ok, key=lambda c: c.ms).backend
    fallback_ok = any(c.backend == op.fallback(device) and c.ok for c in checks)
    if chosen is None and fallback_ok:  # checked, correct, just not in the race (e.g. ref)
        chosen = op.fallback(device)
    elif chosen is None:
        chosen = op.fallback(device)
        log.warning(
            "guard: no backend of %s passed on %s (%s); using '%s' unchecked",
            op.name, device, describe(shape), chosen,
        )  # fmt: skip
    for c in checks:
        c.chosen = c.backend == chosen
    return Decision(op.name, str(device), dict(shape), chosen, checks, prefer)


def choose(
    op_name: str,
    device: torch.device,
    shape: dict,
    prefer: str | None = None,
    allowed: tuple[str, ...] | None = None,
) -> str:
    """The backend to run: the decision's choice, or the fastest correct one in ``allowed``
    (e.g. only backends that return attention's log-sum-exp; the last one is the plainest,
    used when none of them passed)."""
    decision = decide(op_name, device, shape, prefer)
    if allowed is None or decision.chosen in allowed:
        return decision.chosen
    usable = decision.usable(allowed)
    return usable[0] if usable else allowed[-1]


def decided(op_name: str, device: torch.device, shape: dict, prefer: str | None = None) -> str:
    """For traced code (torch.compile, fake tensors), where nothing may run: the decision if
    one was made in this process, else the op's default backend."""
    decision = _DECISIONS.get(_key(op_name, torch.device(device), shape, prefer))
    return decision.chosen if decision else get_op(op_name).default(torch.device(device))


def demote(
    op_name: str, device: torch.device, shape: dict, prefer: str | None, backend: str, error
) -> str:
    """A backend that passed its check failed at run time: mark it failed for the rest of the
    process, warn, and return the next correct backend (the op's fallback if none)."""
    device = torch.device(device)
    with _LOCK:
        decision = decide(op_name, device, shape, prefer)
        for c in decision.checks:
            if c.backend == backend:
                c.ok, c.chosen, c.error = False, False, f"failed at run time: {short(error)}"
        usable = decision.usable()
        decision.chosen = usable[0] if usable else get_op(op_name).fallback(device)
        log.warning(
            "%sguard: %s backend '%s' failed on %s (%s): %s; using '%s'",
            who(), op_name, backend, device, describe(shape), short(error), decision.chosen,
        )  # fmt: skip
        return decision.chosen


def forget() -> None:
    """Drop this process's decisions (tests; the disk cache stays)."""
    with _LOCK:
        _DECISIONS.clear()
