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

Ops register themselves as ``Op`` subclasses (``guard_ops`` holds attention and LoRA)::

    >>> from pyfast_tune.kernels import guard                                  # doctest: +SKIP
    >>> guard.choose("varlen_attention", torch.device("cpu"),
    ...              {"dtype": "float32", "head_dim": 64, "gqa": 2, "window": [-1, 0]})
    'cpp'
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pyfast_tune.kernels import faults

log = logging.getLogger("pyfast_tune.guard")

CACHE_ENV = "PYFAST_TUNE_CACHE"
# flash-attention's test rule, as this project's kernel tests apply it: the forward output's
# error at most 2x the upstream's in the same dtype, gradients' at most 3x (they pass through
# more roundings). Measured on CPU, correct backends sit at 0.2-2x of per-sample SDPA.
FORWARD_RULE, GRADIENT_RULE = 2.0, 3.0
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
FORMAT = 1  # bump when the cached decision's layout or the check's rule changes


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
        """Whether the backend may be chosen by the race here (not e.g. an interpreter)."""
        return True

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


REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add ``op`` to the guard (replacing one of the same name). Returns it."""
    REGISTRY[op.name] = op
    return op


def get_op(name: str) -> Op:
    if not REGISTRY:
        import pyfast_tune.kernels.guard_ops  # noqa: F401 (registers the built-in ops)
    if name not in REGISTRY:
        raise KeyError(f"guard: unknown op {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


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


# ---------------------------------------------------------------------------------------
# Checking and timing


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


def time_ms(fn, device: torch.device, repeat: int | None = None) -> float:
    """Fastest wall time of ``fn()`` in ms after one warm-up call (which compiles, autotunes)."""
    result = race_ms({"fn": fn}, device, repeat)["fn"]
    if isinstance(result, Exception):
        raise result
    return result


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


def _short(e: BaseException) -> str:
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
                    errors[b] = _short(e)
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
                        c.error = f"failed at the timing shape: {_short(times[c.backend])}"
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


# ---------------------------------------------------------------------------------------
# Decisions: in-process, on disk, logged


_LOCK = threading.RLock()
_DECISIONS: dict[tuple, Decision] = {}


def _key(op: str, device: torch.device, shape: dict, prefer: str | None) -> tuple:
    items = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(shape.items()))
    return (op, str(device), items, prefer)


def _world() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:
        pass
    return int(os.environ.get("WORLD_SIZE", "1"))


def _who() -> str:
    """ "rank N: " when several processes train (each may reject a backend on its own GPU)."""
    return f"rank {rank()}: " if _world() > 1 or rank() > 0 else ""


def rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:
        pass
    return int(os.environ.get("RANK", "0"))


def cache_dir() -> Path:
    """Where decisions are cached: ``$PYFAST_TUNE_CACHE/guard``, else the user cache dir."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "guard"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pyfast_tune" / "guard"


@functools.cache
def _source_hash() -> str:
    """Our kernels' sources: a decision made for other code is not reused."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha1()
    files = sorted(Path(__file__).parent.glob("*.py")) + sorted((root / "csrc").glob("*.cpp"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The CUDA driver version ("12.4"), when a driver is there."""
    try:
        v = int(torch._C._cuda_getDriverVersion())
    except Exception:
        return None
    return f"{v // 1000}.{v % 1000 // 10}" if v else None


@functools.cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    if device.type == "cpu":
        return f"{cpu_name()} ({torch.get_num_threads()} threads)"
    return device.type


def environment(device: torch.device) -> dict:
    """What a decision depends on besides the shape class."""
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "driver": driver_version() if device.type == "cuda" else None,
        "source": _source_hash(),
        "interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "format": FORMAT,
    }


def _disk_path(op: str, device: torch.device, shape: dict, prefer: str | None):
    key = {"op": op, "shape": shape, "prefer": prefer, **environment(device)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{op}-{digest}.json", key


def _read_disk(path: Path, key: dict) -> Decision | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        return Decision.from_dict(data["decision"], "disk cache")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, torn by another writer's crash, or another format: re-check


def _write_disk(path: Path, key: dict, decision: Decision) -> None:
    """tmp + rename in the same directory: a reader sees the old file or the new, whole."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"key": key, "decision": decision.as_dict()}, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("guard: could not cache the decision in %s (%s)", path.parent, e)


def describe(shape: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in shape.items())


def _report(decision: Decision) -> None:
    where = f"{decision.op} on {decision.device} ({describe(decision.shape)})"
    for c in decision.checks:
        asked = c.backend == decision.prefer
        if decision.source == "checked" and (c.ok is False or (c.ok is None and asked)):
            log.warning(
                "%sguard: %s: backend '%s' %s: %s; using '%s'",
                _who(), where, c.backend, "rejected" if c.ok is False else "cannot run here",
                c.error, decision.chosen,
            )  # fmt: skip
    if decision.source == "unchecked":
        log.warning("%sguard: %s: could not be checked (%s); using '%s' unchecked",
                    _who(), where, decision.error, decision.chosen)  # fmt: skip
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
        path, disk_key = _disk_path(op_name, device, shape, prefer) if use_disk else (None, None)
        decision = _read_disk(path, disk_key) if use_disk else None
        if decision is None:
            try:
                decision = _check_and_race(op, device, shape, prefer)
            except Exception as e:  # the check itself broke (its case, the reference): never
                # let that stop training; the op's default runs, and the next process retries
                default = prefer or op.default(device)
                decision = Decision(op_name, str(device), dict(shape), default, [], prefer,
                                    "unchecked", _short(e))  # fmt: skip
            if use_disk and decision.source == "checked":
                _write_disk(path, disk_key, decision)
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
        checks = evaluate(op, device, shape, [prefer], race=False)
        if checks[0].ok:
            chosen = prefer
        candidates = [b for b in candidates if b != prefer]
    if chosen is None:
        checks += evaluate(op, device, shape, candidates, race=True)
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
                c.ok, c.chosen, c.error = False, False, f"failed at run time: {_short(error)}"
        usable = decision.usable()
        decision.chosen = usable[0] if usable else get_op(op_name).fallback(device)
        log.warning(
            "%sguard: %s backend '%s' failed on %s (%s): %s; using '%s'",
            _who(), op_name, backend, device, describe(shape), _short(error), decision.chosen,
        )  # fmt: skip
        return decision.chosen


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


def forget() -> None:
    """Drop this process's decisions (tests; the disk cache stays)."""
    with _LOCK:
        _DECISIONS.clear()
