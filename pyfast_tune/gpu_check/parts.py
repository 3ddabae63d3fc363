"""The kit's parts; ``python -m pyfast_tune.gpu_check.parts --part NAME ...`` runs one.

Each part is a function ``(ctx) -> results`` (a JSON-able dict). It raises ``PartFailed``
(with what it measured) when its verdict is negative — a backend wrong, a test failed, the
loss not falling — and ``PartSkipped`` when it cannot run here; any other exception is a
failure with its traceback. ``ctx.save(results)`` writes results so far, which the runner
keeps if the part is killed for time. Shapes come in pairs: the GPU's (real models, the
issue's targets) and the dry mode's (tiny, for the Triton interpreter on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

FAIL_ENV = "PYFAST_TUNE_GPU_CHECK_FAIL"
# What the kit's own code paths import, beyond the image's torch and Triton.
REQUIRED = ("numpy", "tokenizers", "transformers", "peft", "accelerate", "safetensors", "pytest")
OPTIONAL = ("flash_attn", "bitsandbytes", "liger_kernel", "deepspeed")


class PartFailed(Exception):
    def __init__(self, message: str, results: dict | None = None):
        super().__init__(message)
        self.results = results


class PartSkipped(Exception):
    pass


@dataclasses.dataclass
class Context:
    mode: str  # "gpu" | "dry"
    root: Path
    work: Path
    result_path: Path
    budget_s: float

    @property
    def dry(self) -> bool:
        return self.mode == "dry"

    def save(self, results: dict) -> None:
        """Results so far (kept if the part is killed for time)."""
        _write(self.result_path, {"status": None, "partial": True, "results": results})


def _write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ensure_packer(root: Path, work: Path) -> str:
    """Make ``pyfast_tune._packer`` importable; say where it came from.

    A working tree copied to a GPU machine carries no compiled extension (``*.so`` is
    ignored); ``make gpu-wheel`` puts our abi3 wheel in ``dist-gpu/``, and the extension is
    taken from it into a scratch folder that joins the package's search path — the tree's
    Python still runs, so a fix made after the wheel was built is what gets checked.
    """
    import pyfast_tune

    try:
        mod = importlib.import_module("pyfast_tune._packer")
        return f"tree: {mod.__file__}"
    except ImportError as e:
        missing = e
    wheels = sorted((root / "dist-gpu").glob("pyfast_tune-*.whl"))
    if not wheels:
        raise ImportError(f"the data engine's extension is not built ({missing}) and "
                          f"{root / 'dist-gpu'} holds no wheel: run `make gpu-wheel`")  # fmt: skip
    dest = work / "packer"
    with zipfile.ZipFile(wheels[-1]) as whl:
        members = [n for n in whl.namelist() if n.startswith("pyfast_tune/_packer")
                   and n.endswith(".so")]  # fmt: skip
        if not members:
            raise ImportError(f"{wheels[-1]} holds no pyfast_tune/_packer*.so")
        whl.extract(members[0], dest)
    pyfast_tune.__path__.append(str(dest / "pyfast_tune"))
    mod = importlib.import_module("pyfast_tune._packer")
    return f"wheel: {wheels[-1].name} (extracted to {mod.__file__})"


# ---------------------------------------------------------------------------------------


def _installed_version(module: str) -> str | None:
    """The version of the distribution that provides ``module``, None when absent."""
    import importlib.metadata as md

    if importlib.util.find_spec(module) is None:
        return None
    for dist in md.packages_distributions().get(module, [module]):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "present"


def _nvidia_smi() -> str | None:
    """Clocks and power limit beside the name: what the timings were measured under."""
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit,pstate,mig.mode.current"
    try:
        p = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                           capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() or None


def part_env(ctx: Context) -> dict:
    """Device, driver, versions; required and optional packages; the data engine's origin."""
    import platform

    import torch

    from pyfast_tune import doctor

    results = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": doctor.versions(),
        "devices": doctor.devices(),
        "cuda_available": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "required": {}, "optional": {},
    }  # fmt: skip
    results["nvidia_smi"] = _nvidia_smi()
    gpu = next((d for d in results["devices"] if d["device"].startswith("cuda")), None)
    results["device"] = gpu or results["devices"][0]
    # Found, not imported: importing deepspeed alone takes tens of seconds on a loaded CPU.
    for group, names in (("required", REQUIRED), ("optional", OPTIONAL)):
        for name in names:
            results[group][name] = _installed_version(name)
    try:
        results["packer"] = ensure_packer(ctx.root, ctx.work)
    except ImportError as e:
        results["packer"] = None
        results.setdefault("import_errors", {})["pyfast_tune._packer"] = str(e)
    missing = [n for n, v in results["required"].items() if v is None]
    if results["packer"] is None:
        missing.append("pyfast_tune._packer")
    if missing:
        raise PartFailed(f"missing: {', '.join(missing)} (the train part needs them)", results)
    return results


def part_doctor(ctx: Context) -> dict:
    """Every op x backend x shape class, checked on this device: ``pyfast-tune doctor``'s
    checks, one shape class at a time so a timeout keeps the finished ones."""
    from pyfast_tune import doctor
    from pyfast_tune.kernels import guard

    device = _device()
    results = {"device": guard.device_name(device), "device_type": device.type,
               "versions": doctor.versions(), "devices": doctor.devices(),
               "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
               "checks": [], "decisions": []}  # fmt: skip
    # On CUDA the C++ op (the CPU backend) is not a choice; building it would only spend the
    # GPU's minutes on a compiler.
    print("doctor: building the C++ op" if device.type == "cpu" else "", flush=True)
    results["cpp_build"] = (doctor.cpp_build() if device.type == "cpu" else
                            {"ok": True, "seconds": 0.0, "error": None, "skipped": "CPU backend"})  # fmt: skip
    for name in guard.op_names():
        for shape in doctor.shape_classes(name, device.type):
            start = time.perf_counter()
            if ctx.dry and shape.get("dtype") == "bfloat16" and name == "varlen_attention":
                continue  # the CPU tests cover bf16 in the interpreter; here: time
            decision = guard.check_now(name, device, shape)
            results["checks"] += [c.as_dict() for c in decision.checks]
            results["decisions"].append({"op": name, **shape, "chosen": decision.chosen,
                                         "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
            print(f"doctor: {name} {guard.describe(shape)}: {decision.chosen} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip
            ctx.save(results)
    bad = [c for c in results["checks"] if c["ok"] is False]
    results["ok"] = not bad
    print(doctor.format_table(results), flush=True)
    if bad:
        what = "; ".join(f"{c['op']}/{c['backend']} {guard.describe({k: c[k] for k in c if k in ('dtype', 'head_dim', 'gqa', 'window', 'rank', 'softcap')})}: {c['error'] or 'wrong'}" for c in bad[:8])  # fmt: skip
        raise PartFailed(f"{len(bad)} backend check(s) incorrect or failing: {what}", results)
    return results


def part_pytest(ctx: Context) -> dict:
    """``pytest -m gpu tests/gpu``; each test's outcome logged as it ends (a timeout keeps
    the finished ones). Dry mode: the same tests at tiny shapes in the interpreter."""
    log = ctx.work / "pytest.jsonl"
    log.unlink(missing_ok=True)
    env = dict(os.environ, PYFAST_TUNE_GPU_PYTEST_LOG=str(log))
    if ctx.dry:
        env["PYFAST_TUNE_GPU_DRY"] = "1"
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-rfEs",
           "-p", "no:cacheprovider", "-p", "pyfast_tune.gpu_check.pytest_log"]  # fmt: skip
    timed_out = False
    try:
        code = subprocess.run(
            cmd, cwd=ctx.root, env=env, timeout=max(5, ctx.budget_s - 15)
        ).returncode
    except subprocess.TimeoutExpired:
        code, timed_out = None, True
    tests = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    counts = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    results = {"exit_code": code, "counts": counts, "tests": tests}
    failed = [t for t in tests if t["outcome"] in ("failed", "error")]
    if timed_out:
        results["timed_out"] = True
        raise PartFailed(
            f"pytest ran past {ctx.budget_s - 15:.0f} s after {len(tests)} tests", results
        )
    if failed or code not in (0, 5):
        names = ", ".join(t["nodeid"].split("::")[-1] for t in failed[:10])
        raise PartFailed(f"{len(failed)} GPU test(s) failed (exit {code}): {names}", results)
    if not tests:
        raise PartFailed("pytest collected no GPU tests", results)
    return results


def _bench_module(ctx: Context, name: str):
    bench = ctx.root / "bench"
    if not (bench / f"{name}.py").exists():
        raise PartSkipped(f"{bench / name}.py not found: run the kit from a checkout")
    sys.path.insert(0, str(bench))
    return importlib.import_module(name)


def part_bench_attention(ctx: Context) -> dict:
    """Forward, backward, both: ours beside torch's varlen_attn, flash-attn, SDPA per sample.
    GPU: H 32, H_kv 8, D 128, bf16, causal, segments of 512 to 32k tokens (the issue's target
    shapes: T 8k-32k)."""
    import torch

    b = _bench_module(ctx, "bench_attention_gpu")
    device = _device()
    if ctx.dry:
        setup = {"shapes": [(48, 2)], "heads": 2, "kv_heads": 1, "head_dim": 16,
                 "dtype": torch.float32, "methods": ("triton", "sdpa"), "repeat": 1}  # fmt: skip
    else:
        setup = {"shapes": [(8192, 1), (16384, 2), (32768, 4), (32768, 1), (16384, 32)],
                 "heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": torch.bfloat16,
                 "methods": b.METHODS, "repeat": 10}  # fmt: skip
    rows = b.run(setup["shapes"], setup["heads"], setup["kv_heads"], setup["head_dim"],
                 setup["dtype"], device, methods=setup["methods"], repeat=setup["repeat"])  # fmt: skip
    setup["dtype"] = str(setup["dtype"]).removeprefix("torch.")
    return {"setup": setup, "rows": rows}


def part_bench_lora(ctx: Context) -> dict:
    """Fused LoRA (Triton and the composed torch backend) beside peft: time, TFLOP/s, memory."""
    import torch

    b = _bench_module(ctx, "bench_lora_gpu")
    device = _device()
    if ctx.dry:
        cases = [(32, 32, 48, 4, 0.0, False)]
        dtype, repeat = torch.float32, 1
    else:
        cases = [(8192, 4096, 4096, 16, 0.0, False), (8192, 4096, 4096, 128, 0.0, False),
                 (8192, 4096, 4096, 16, 0.1, False)]  # fmt: skip
        if importlib.util.find_spec("bitsandbytes"):
            cases.append((8192, 4096, 4096, 16, 0.0, True))
        dtype, repeat = torch.bfloat16, None
    rows = []
    for tokens, d_in, d_out, r, p, four_bit in cases:
        res = b.run(tokens, d_in, d_out, r, p, dtype=dtype, four_bit=four_bit, device=device,
                    repeat=repeat)  # fmt: skip
        print(b.report(res, tokens, d_in, d_out, r, p, dtype, four_bit, device), flush=True)
        flops = b.lora_flops(tokens, d_in, d_out, r)
        rows.append({"tokens": tokens, "in": d_in, "out": d_out, "rank": r, "dropout": p,
                     "four_bit": four_bit, "dtype": str(dtype).removeprefix("torch."),
                     "methods": res, "flops": {"fwd": flops[0], "bwd": flops[1]}})  # fmt: skip
        ctx.save({"rows": rows})
    return {"rows": rows}


def part_bench_loss(ctx: Context) -> dict:
    """Fused linear cross-entropy beside the plain logits path and Liger: time and the peak
    memory above the inputs (the issue's target: ours <= 0.2x plain at V 152k)."""
    b = _bench_module(ctx, "bench_loss")
    if ctx.dry:
        shapes, dtype, repeat = [(64, 512)], "float32", 1
    else:
        shapes, dtype, repeat = [(8192, 32000), (8192, 151936)], "bfloat16", 5
    rows = []
    for T, V in shapes:
        for method in b.METHODS:
            row = {"tokens": T, "vocab": V, "hidden": b.HIDDEN, "dtype": dtype, "method": method}
            try:
                row.update(b._loss_worker(method, T, V, repeat, dtype))
            except RuntimeError as e:  # "n/a: ..." (Liger absent or CPU)
                row["unavailable"] = str(e)
            rows.append(row)
            print(json.dumps(row), flush=True)
            ctx.save({"rows": rows})
    return {"rows": rows}


def part_train(ctx: Context) -> dict:
    from pyfast_tune.gpu_check.train_check import run_train_check

    ensure_packer(ctx.root, ctx.work)
    return run_train_check(ctx)


PARTS = {"env": part_env, "doctor": part_doctor, "pytest": part_pytest,
         "bench_attention": part_bench_attention, "bench_lora": part_bench_lora,
         "bench_loss": part_bench_loss, "train": part_train}  # fmt: skip


def _injected(name: str) -> None:
    """A failure a test asked for: ``part`` raises, ``part:hang`` never returns."""
    want = os.environ.get(FAIL_ENV, "")
    for item in filter(None, want.split(",")):
        part, _, how = item.partition(":")
        if part == name:
            if how == "hang":
                while True:
                    time.sleep(1)
            raise RuntimeError(f"injected failure ({FAIL_ENV}={want})")


def _partial(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()).get("results")
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run one part of the GPU check kit")
    ap.add_argument("--part", required=True, choices=sorted(PARTS))
    ap.add_argument("--mode", required=True, choices=["gpu", "dry"])
    ap.add_argument("--result", required=True, type=Path)
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--budget", type=float, default=600.0)
    a = ap.parse_args(argv)
    ctx = Context(a.mode, a.root, a.work, a.result, a.budget)
    try:
        _injected(a.part)
        payload = {"status": "ok", "results": PARTS[a.part](ctx), "error": None}
    except PartSkipped as e:
        payload = {"status": "skipped", "results": None, "error": str(e)}
    except PartFailed as e:
        payload = {"status": "failed", "results": e.results, "error": str(e)}
    except BaseException as e:  # noqa: BLE001 - every failure is the report's to show
        traceback.print_exc()
        tb = traceback.format_exc()
        payload = {"status": "failed", "results": _partial(a.result),
                   "error": f"{type(e).__name__}: {e}\n{tb[-1500:]}"}  # fmt: skip
    _write(a.result, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
