"""Checking backends against a float64 reference and racing the correct ones.

``evaluate`` runs one op's backends on a small random case and compares each with the
reference, with flash-attention's rule: a backend is correct when its error is at most 2x
(forward; 3x for gradients) the error of an upstream implementation in the same dtype. The
correct ones are then timed (``race_ms``) on the op's representative shape. ``Check`` is one
backend's result, ``Decision`` what the guard chose from them.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from pyfast_tune.kernels.guard.op import Op

# The upstream error is floored at one ulp of each output's largest magnitude, so the ratio of
# two rounding-level numbers (an exactly representable case, fp64) is not noise.
FLOOR_ULPS = 1.0
# Beyond this relative error an implementation is wrong whatever the others do: it guards
# the baseline itself (a broken upstream must not excuse ours).
SANITY = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}


@dataclasses.dataclass
class Check:
    """One backend's result: ok None = cannot run here (``error`` says why), not a failure."""

    op: str
    backend: str
    shape: dict
    ok: bool | None
    error_ratio: float | None = None  # the worst output's error over the upstream's
    allowed: float | None = None  # that output's rule
    ms: float | None = None
    error: str | None = None
    upstream: bool = False
    raced: bool = True
    chosen: bool = False

    def as_dict(self) -> dict:
        return {"op": self.op, "backend": self.backend, **self.shape, "ok": self.ok,
                "error_ratio": self.error_ratio, "allowed": self.allowed, "ms": self.ms,
                "chosen": self.chosen,
                "upstream": self.upstream, "raced": self.raced, "error": self.error}  # fmt: skip


@dataclasses.dataclass
class Decision:
    op: str
    device: str
    shape: dict
    chosen: str
    checks: list[Check]
    prefer: str | None = None
    source: str = "checked"  # "checked" | "disk cache" | "unchecked" (the check broke)
    error: str | None = None  # why it is unchecked

    def usable(self, allowed: tuple[str, ...] | None = None) -> list[str]:
        """Backends that passed, fastest first (unraced ones after the raced)."""
        ok = [c for c in self.checks if c.ok and (allowed is None or c.backend in allowed)]
        ok.sort(key=lambda c: (not c.raced, c.ms if c.ms is not None else math.inf))
        return [c.backend for c in ok]

    def as_dict(self) -> dict:
        return {"op": self.op, "device": self.device, "shape": self.shape,
                "chosen": self.chosen, "prefer": self.prefer,
                "checks": [c.as_dict() for c in self.checks]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict, source: str) -> Decision:
        fields = {f.name for f in dataclasses.fields(Check)}
        checks = []
        for c in d["checks"]:
            c = dict(c)
            shape = {k: c.pop(k) for k in list(c) if k not in fields}
            checks.append(Check(shape=shape, **c))
        return cls(d["op"], d["device"], d["shape"], d["chosen"], checks, d["prefer"], source)


def _max_error(out: torch.Tensor | None, ref: torch.Tensor) -> float:
    if out is None or tuple(out.shape) != tuple(ref.shape):
        got = None if out is None else tuple(out.shape)
        raise RuntimeError(f"output of shape {got}, expected {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0
    err = float((out.detach().to(torch.float64) - ref).abs().max())
    return err if math.isfinite(err) else math.inf


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, float(ref.abs().max())) if ref.numel() else 1.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race_ms(fns: dict, device: torch.device, repeat: int | None = None) -> dict:
    """{name: fastest wall time in ms} of each ``fns[name]()``, warmed up once (compiles,
    autotunes), then timed in interleaved rounds so a burst of load on a shared machine hits
    every contender alike. The minimum, not the median: other processes only ever add time.
    A contender that raises gets the exception as its result instead of a time."""
    repeat = repeat or (10 if device.type == "cuda" else 3)
    best: dict = {}
    for name, fn in fns.items():
        try:
            fn()
            _synchronize(device)
            best[name] = math.inf
        except Exception as e:
            best[name] = e
    for _ in range(repeat):
        for name, fn in fns.items():
            if isinstance(best[name], Exception):
                continue
            start = time.perf_counter()
            try:
                fn()
                _synchronize(device)
            except Exception as e:
                best[name] = e
                continue
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def evaluate(
    op: Op,
    device: torch.device,
    shape: dict,
    backends: list[str],
    race: bool = True,
    seed: int = 0,
) -> list[Check]:
    """Check ``backends`` (and, for the baseline, the op's upstreams) on one random case; time
    the correct ones on the representative shape when ``race``. Never raises for a backend's
    failure: it becomes ``ok=False`` with the reason."""
    dtype = op.dtype(shape)
    with _isolated(device):
        gen = torch.Generator().manual_seed(seed)
        with _one_thread(device):
            case = op.case(device, shape, False, gen)
            ref = op.reference(case)
        errors: dict[str, list[float] | str] = {}

        def errors_of(b: str) -> list[float] | str:
            if b not in errors:
                try:
                    with _one_thread(device):
                        outs = op.run(b, case)
                    _synchronize(device)
                    errors[b] = [_max_error(o, r) for o, r in zip(outs, ref)]
                except Exception as e:  # a compile, launch or build failure is a result here
                    errors[b] = short(e)
            return errors[b]

        sanity = [SANITY[dtype] * _scale(r) for r in ref]
        floor = [FLOOR_ULPS * torch.finfo(dtype).eps * _scale(r) for r in ref]
        rules = op.rules()
        baseline = [s / r for s, r in zip(sanity, rules)]  # no sane upstream: the sanity bound
        base_name = None
        for u in op.upstreams(device):
            if op.unavailable(u, device, shape) is None:
                e = errors_of(u)
                if not isinstance(e, str) and all(x <= s for x, s in zip(e, sanity)):
                    baseline, base_name = e, u
                    break
        checks = []
        for b in backends:
            check = Check(op.name, b, dict(shape), None, upstream=b in op.upstreams(device),
                          raced=op.raced(b, device))  # fmt: skip
            why = op.unavailable(b, device, shape)
            if why is not None:
                check.error = why
                checks.append(check)
                continue
            e = errors_of(b)
            if isinstance(e, str):
                check.ok, check.error = False, e
            else:
                ratios = [x / max(y, f) for x, y, f in zip(e, baseline, floor)]
                worst = max(range(len(ratios)), key=lambda i: ratios[i] / rules[i])
                check.error_ratio, check.allowed = round(ratios[worst], 3), rules[worst]
                insane = [i for i, (x, s) in enumerate(zip(e, sanity)) if x > s]
                check.ok = all(r <= a for r, a in zip(ratios, rules)) and not insane
                if insane:
                    i = insane[0]
                    check.error = (
                        f"{op.outputs[i]} error {e[i]:.3g} exceeds the {shape['dtype']} bound "
                        f"{sanity[i]:.3g} ({SANITY[dtype]:g} of the largest |value|)"
                    )
                elif not check.ok:
                    against = f"{base_name}'s" if base_name else "the dtype bound's"
                    check.error = (
                        f"{op.outputs[worst]} error {e[worst]:.3g} is {check.error_ratio:g}x "
                        f"{against} (allowed {rules[worst]:g}x)"
                    )
            checks.append(check)
        if race:
            timed = [c for c in checks if c.ok and c.raced]
            if timed:
                tcase = op.case(device, shape, True, torch.Generator().manual_seed(seed + 1))
                fns = {c.backend: (lambda b=c.backend: op.run(b, tcase)) for c in timed}
                times = race_ms(fns, device)
                for c in timed:
                    if isinstance(times[c.backend], Exception):
                        c.ok = False
                        c.error = f"failed at the timing shape: {short(times[c.backend])}"
                    else:
                        c.ms = round(times[c.backend], 3)
                del tcase, fns
    return checks


class _one_thread:
    """The small case on one CPU thread: its ops are microseconds of work, and a thread pool's
    wake-ups on a loaded machine cost 100x that (0.7 s instead of 10 ms measured)."""

    def __init__(self, device: torch.device):
        self.on = device.type == "cpu"

    def __enter__(self):
        if self.on:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.on:
            torch.set_num_threads(self.threads)


class _isolated:
    """Run a check without touching the caller's RNG, grad mode, autocast or inference mode,
    and outside any saved-tensor hooks of the caller: a first call inside activation
    checkpointing must not add the check's own tensors to the checkpointed region."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        devices = []
        if self.device.type == "cuda":
            devices = [
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            ]
        self.rng = torch.random.fork_rng(devices=devices)
        self.rng.__enter__()
        identity = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        self.modes = [torch.inference_mode(False), torch.enable_grad(), identity]
        if self.device.type in ("cpu", "cuda"):
            self.modes.append(torch.autocast(self.device.type, enabled=False))
        for m in self.modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)
        return self.rng.__exit__(*exc)
