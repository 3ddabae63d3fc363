"""``pyfast-tune doctor``: what runs on this machine, and is it right?

Versions (torch, CUDA, driver, Triton, DeepSpeed, transformers, peft, bitsandbytes,
flash-attn), devices, whether the C++ attention op builds, then every op x backend x dtype the
first-use guard knows, checked on the present device (CUDA if there is one, else CPU, where
the Triton kernels run in the interpreter at the guard's small shapes), timed, and the
decision the guard takes. Nothing is cached or changed: it is the guard's check, run fresh.

    pyfast-tune doctor                # a table
    pyfast-tune doctor --json         # {"device": ..., "checks": [{"op", "backend", ...}]}
    pyfast-tune doctor --op lora_linear

Exit status 1 when any backend checked is incorrect or fails (build, compile, launch); a
backend that cannot run here (flash-attn not installed, Triton without CUDA) is listed as
skipped with the reason and does not fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

PACKAGES = ("torch", "triton", "deepspeed", "transformers", "peft", "bitsandbytes", "flash-attn")


def shape_classes(op: str, device_type: str) -> list[dict]:
    """The shape classes doctor checks for ``op``: common model shapes per dtype."""
    from pyfast_tune.kernels import guard

    return guard.get_op(op).doctor_shapes(device_type)


def versions() -> dict:
    from pyfast_tune import __version__
    from pyfast_tune.kernels import guard

    found = {"python": platform.python_version(), "pyfast-tune": __version__}
    for name in PACKAGES:
        found[name] = guard.package_version(name)
    import torch

    found["cuda"] = torch.version.cuda
    found["driver"] = guard.driver_version()
    return found


def devices() -> list[dict]:
    import torch

    from pyfast_tune.kernels import guard

    found = [{"device": "cpu", "name": guard.cpu_name(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            found.append({"device": f"cuda:{i}", "name": p.name,
                          "capability": f"sm_{p.major}{p.minor}",
                          "memory_gib": round(p.total_memory / 2**30, 1)})  # fmt: skip
    return found


def cpp_build() -> dict:
    """Build (or load the cached build of) the C++ attention op; how long it took."""
    from pyfast_tune.kernels.varlen_attention.cpu import load_varlen_attention

    start = time.perf_counter()
    try:
        load_varlen_attention()
    except Exception as e:
        return {"ok": False, "seconds": round(time.perf_counter() - start, 2), "error": str(e)}
    return {"ok": True, "seconds": round(time.perf_counter() - start, 2), "error": None}


def run(ops: list[str] | None = None, progress=None) -> dict:
    """Everything doctor reports, as a JSON-able dict; ``report["ok"]`` is the verdict."""
    import torch

    from pyfast_tune.kernels import guard

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {
        "device": guard.device_name(device),
        "device_type": device.type,
        "versions": versions(),
        "devices": devices(),
        "cpp_build": cpp_build(),
        "interpreter": device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1",
        "checks": [],
        "decisions": [],
    }
    known = guard.op_names()
    names = ops or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"doctor: unknown op(s) {unknown}; known: {known}")
    for name in names:
        for shape in shape_classes(name, device.type):
            if progress:
                progress(f"{name} ({guard.describe(shape)})")
            decision = guard.check_now(name, device, shape)
            report["checks"] += [c.as_dict() for c in decision.checks]
            report["decisions"].append({"op": name, **shape, "chosen": decision.chosen})
    report["ok"] = all(c["ok"] is not False for c in report["checks"])
    return report


def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}", "versions:"]
    lines += [f"  {k:13} {v or '-'}" for k, v in report["versions"].items()]
    lines.append("devices:")
    for d in report["devices"]:
        extra = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("device", "name"))
        lines.append(f"  {d['device']:7} {d['name']} ({extra})")
    b = report["cpp_build"]
    built = f"ok ({b['seconds']} s)" if b["ok"] else f"FAILED: {b['error']}"
    lines.append(f"C++ attention op build: {built}")
    if report["interpreter"]:
        lines.append("Triton: no CUDA, kernels checked in the interpreter (small shapes, untimed)")
    lines.append("")
    shapes = [", ".join(f"{k}={c[k]}" for k in _shape_keys(c)) for c in report["checks"]]
    w_op = max([2] + [len(c["op"]) for c in report["checks"]])
    w_be = max([7] + [len(c["backend"]) for c in report["checks"]])
    w_sh = max([11] + [len(x) for x in shapes])
    lines.append(f"{'op':{w_op}} {'backend':{w_be}} {'shape class':{w_sh}} {'result':>7} "
                 f"{'err/up':>7} {'ms':>9}  chosen")  # fmt: skip
    for c, shape in zip(report["checks"], shapes):
        state = {True: "ok", False: "FAILED", None: "skipped"}[c["ok"]]
        ratio = f"{c['error_ratio']:.3g}" if c["error_ratio"] is not None else "-"
        ms = f"{c['ms']:.3f}" if c["ms"] is not None else "-"
        lines.append(f"{c['op']:{w_op}} {c['backend']:{w_be}} {shape:{w_sh}} {state:>7} "
                     f"{ratio:>7} {ms:>9}  {'<-' if c['chosen'] else ''}".rstrip())  # fmt: skip
        if c["ok"] is not True and c["error"]:
            why = "why: " if c["ok"] is False else "skipped: "
            lines.append(f"{'':{w_op + w_be + 2}}{why}{c['error']}")
    verdict = "every backend checked is correct" if report["ok"] else "SOME BACKENDS FAILED"
    lines += ["", f"verdict: {verdict}"]
    return "\n".join(lines)


_CHECK_KEYS = {"op", "backend", "ok", "error_ratio", "allowed", "ms", "chosen", "upstream",
               "raced", "error"}  # fmt: skip


def _shape_keys(check: dict) -> list[str]:
    return [k for k in check if k not in _CHECK_KEYS]


def add_parser(sub) -> None:
    """Register ``doctor`` on the CLI's subparsers."""
    p = sub.add_parser(
        "doctor",
        help="check every kernel backend on this machine against upstream, time them, "
        "show the guard's choice",
        description=__doc__.split("\n\n")[1],
        epilog="examples:\n  pyfast-tune doctor\n  pyfast-tune doctor --json > doctor.json\n"
        "  pyfast-tune doctor --op varlen_attention\n"
        "  PYFAST_TUNE_FAULTS=varlen_attention.cpp=wrong pyfast-tune doctor   # exits 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--op", action="append", default=None, metavar="OP",
                   help="check only this op (repeatable; default: all the guard knows)")  # fmt: skip
    p.set_defaults(func=main_args)


def main_args(args) -> int:
    try:
        import torch
    except ImportError as e:
        print(f"pyfast-tune doctor: torch is not installed ({e}); pip install "
              "'pyfast-tune[train]'", file=sys.stderr)  # fmt: skip
        return 2
    if not torch.cuda.is_available():  # before any Triton kernel is defined
        os.environ.setdefault("TRITON_INTERPRET", "1")

    def progress(what: str) -> None:
        print(f"doctor: checking {what}", file=sys.stderr, flush=True)

    report = run(args.op, progress=None if args.json else progress)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyfast-tune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return main_args(parser.parse_args(["doctor", *(argv or [])]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
