"""Run the kit's parts, each in a subprocess under a time budget, and write the report.

This process imports neither torch nor Triton: a part that hangs, crashes the CUDA context
or the interpreter is killed (its whole process group) when its budget runs out, recorded as
``timeout`` or ``failed`` with the end of its log, and the next part runs. A part saves its
results as it goes (``parts.Progress``), so a timed-out part still reports what it finished.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = 1
STATUSES = ("ok", "failed", "skipped", "timeout")
# Order: cheap facts first, then correctness, then speed, then the end-to-end run.
PART_NAMES = ("env", "doctor", "pytest", "bench_attention", "bench_lora", "bench_loss", "train")
# Seconds per part on a GPU: they add up to 450 s, under the 8 minutes with the
# start-up probe; first-run Triton compiles are the bulk of doctor's and pytest's time.
GPU_BUDGET_S = {"env": 20, "doctor": 110, "pytest": 130, "bench_attention": 60,
                "bench_lora": 30, "bench_loss": 35, "train": 70}  # fmt: skip
GPU_TOTAL_S = 470
# Dry mode has no clock to beat, only a shared CPU: budgets catch hangs, not slowness.
DRY_BUDGET_S = dict.fromkeys(PART_NAMES, 600)
DRY_TOTAL_S = 3600
FAIL_ENV = "PYFAST_TUNE_GPU_CHECK_FAIL"  # "part" or "part:hang" (tests inject failures)
LOG_TAIL = 2000


def repo_root() -> Path:
    """The checkout this package lives in (bench/ and tests/gpu/ are found there)."""
    return Path(__file__).resolve().parents[2]


def _probe_cuda(env: dict) -> tuple[bool, str | None]:
    """Whether torch sees a CUDA device, asked in a subprocess (this one stays CUDA-free)."""
    code = "import torch; print(int(torch.cuda.is_available()))"
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired:
        return False, "torch import timed out (120 s)"
    if p.returncode != 0:
        return False, f"torch does not import: {p.stderr.strip()[-LOG_TAIL:]}"
    return p.stdout.strip().endswith("1"), None


def _base_env(root: Path, work: Path) -> dict:
    env = dict(os.environ)
    # The checkout's Python first, whatever the working directory; the guard decides afresh
    # (its disk cache under the report) so the report shows this run's checks, not old ones.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env["PYFAST_TUNE_CACHE"] = str(work / "guard-cache")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Everything the kit uses is generated or local: a Hub lookup could only wait on a network
    # that GPU machines often lack.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(root / ".torch_extensions"))
    env["PYTHONHASHSEED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL:]
    except OSError:
        return ""


def _run_part(name: str, mode: str, budget: float, env: dict, out: Path, work: Path,
              root: Path) -> dict:  # fmt: skip
    log_path = out / "logs" / f"{name}.log"
    result_path = work / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pyfast_tune.gpu_check.parts", "--part", name, "--mode", mode,
           "--result", str(result_path), "--root", str(root), "--work", str(work),
           "--budget", str(budget)]  # fmt: skip
    start = time.monotonic()
    with open(log_path, "w") as log:
        # A new session: on timeout the whole group goes (pytest's and torch's children too).
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=budget)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, timed_out = None, True
    seconds = round(time.monotonic() - start, 2)
    saved = {}
    if result_path.exists():
        try:
            saved = json.loads(result_path.read_text())
        except ValueError as e:
            saved = {"status": "failed", "error": f"unreadable result file: {e}"}
    entry = {"status": saved.get("status"), "seconds": seconds, "budget_s": round(float(budget), 1),
             "results": saved.get("results"), "error": saved.get("error"),
             "log": f"logs/{name}.log"}  # fmt: skip
    if timed_out:
        entry["status"] = "timeout"
        entry["error"] = f"killed after its budget of {budget:.0f} s; log tail:\n{_tail(log_path)}"
    elif entry["status"] not in STATUSES or saved.get("partial"):
        # The process ended without writing its verdict: a crash (segfault, CUDA abort, OOM kill).
        entry["status"] = "failed"
        entry["error"] = f"exit code {code} without a result; log tail:\n{_tail(log_path)}"
    return entry


def run(out: str | os.PathLike, parts: list[str] | None = None, dry: bool | None = None,
        budgets: dict[str, float] | None = None, total_s: float | None = None,
        fail: str | None = None) -> dict:  # fmt: skip
    """Run the kit; write ``out/report.json`` and ``out/summary.txt``; return the report.

    ``dry``: None = decide by CUDA's presence; True forces the CPU dry mode. ``budgets``
    overrides per-part seconds; ``fail`` ("part" or "part:hang") injects a failure (tests).
    """
    names = list(parts or PART_NAMES)
    unknown = sorted(set(names) - set(PART_NAMES))
    if unknown:
        raise ValueError(f"gpu_check: unknown part(s) {unknown}; known: {list(PART_NAMES)}")
    out, root = Path(out), repo_root()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    # Scratch (generated data, a tiny model, the guard's cache) stays out of the report folder,
    # which a GPU machine sends back, and goes when the run ends.
    work = Path(tempfile.mkdtemp(prefix="pyfast-gpu-check-"))
    try:
        return _run_all(names, out, work, root, dry, budgets, total_s, fail)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_all(names, out, work, root, dry, budgets, total_s, fail) -> dict:
    from pyfast_tune.gpu_check.summary import evaluate_targets, format_summary

    env = _base_env(root, work)
    started = time.monotonic()
    cuda, probe_error = (False, None) if dry else _probe_cuda(env)
    mode = "gpu" if cuda else "dry"
    # The interpreter exactly when there is no GPU: tests/conftest.py defaults it on, and a
    # leftover TRITON_INTERPRET=1 on a GPU machine would test nothing that runs there.
    env["TRITON_INTERPRET"] = "0" if cuda else "1"
    env["PYFAST_TUNE_GPU_CHECK_MODE"] = mode
    env.pop(FAIL_ENV, None)
    if fail:
        env[FAIL_ENV] = fail
    budget_of = dict(GPU_BUDGET_S if cuda else DRY_BUDGET_S, **(budgets or {}))
    total = total_s or (GPU_TOTAL_S if cuda else DRY_TOTAL_S)
    report = {
        "schema": SCHEMA,
        "kit": "pyfast_tune.gpu_check",
        "mode": mode,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "cuda_probe_error": probe_error,
        "parts": {},
    }
    for name in names:
        left = total - (time.monotonic() - started)
        if left < 5:
            report["parts"][name] = {"status": "skipped", "seconds": 0.0, "budget_s": 0.0,
                                     "results": None, "log": None,
                                     "error": f"the run's total budget ({total:.0f} s) is spent"}  # fmt: skip
            continue
        print(f"gpu_check [{mode}]: {name} (budget {min(budget_of[name], left):.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
        entry = _run_part(name, mode, min(budget_of[name], left), env, out, work, root)
        report["parts"][name] = entry
        print(f"gpu_check [{mode}]: {name}: {entry['status']} in {entry['seconds']} s",
              file=sys.stderr, flush=True)  # fmt: skip
    env_results = (report["parts"].get("env") or {}).get("results") or {}
    report["device"] = env_results.get("device")
    report["versions"] = env_results.get("versions")
    report["seconds"] = round(time.monotonic() - started, 2)
    report["targets"] = evaluate_targets(report)
    report["ok"] = all(p["status"] in ("ok", "skipped") for p in report["parts"].values())
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "summary.txt").write_text(format_summary(report) + "\n")
    return report
