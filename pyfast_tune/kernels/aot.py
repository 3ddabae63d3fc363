"""Compile every shipped Triton kernel for sm_80 / sm_90 without a GPU and report its resources.

    python -m pyfast_tune.kernels.aot                    # table, sm_80 and sm_90
    python -m pyfast_tune.kernels.aot --arch 90 --json   # one JSON object per compile
    python -m pyfast_tune.kernels.aot --only attention   # attention | lora | lce
    python -m pyfast_tune.kernels.aot --quick            # each 16-bit tile entry once

The launchers build their launches with ``*_launches``/``*_launch`` functions; this report
calls the same functions with an explicit architecture, specializes the arguments exactly as
Triton's JIT does at launch (``native_specialize_impl``: 16-byte aligned pointers, integers
divisible by 16, integers equal to 1 folded to constants), compiles with Triton's bundled ptxas
and reads registers and spills with its bundled ``cuobjdump --dump-resource-usage``. No GPU or
driver is needed. A row fails when it does not compile, spills (stack or local bytes > 0), or
asks for more shared memory than the architecture has; the exit status is 1 if any row fails.
Compiles land in Triton's own cache (``~/.triton/cache``), so a second run takes seconds.

Each row (``--json``): kernel ("module:function"), arch, dtype, head_dim (attention) or shape
(others), signature / constexprs / attrs as passed to ``triton.compiler.ASTSource``, num_warps,
num_stages, regs, spill_bytes, shared_bytes, error.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any

# Usable shared memory per block (opt-in maximum), bytes: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
GROUPS = ("attention", "lora", "lce")


@functools.cache
def _launches(group: str, arch: int) -> list:
    """The launches of one group, from the Triton module of its op (imported here: Triton)."""
    if group == "attention":
        from pyfast_tune.kernels.varlen_attention.triton import aot_launches
    elif group == "lora":
        from pyfast_tune.kernels.lora.triton import aot_launches
    else:
        from pyfast_tune.kernels.linear_cross_entropy.triton import aot_launches
    return aot_launches(arch)


def specialize(kernel, args: tuple, meta: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``kernel[grid](*args, **meta)``, as the JIT makes them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    bound = dict(zip(kernel.arg_names, args))
    bound.update({k: v for k, v in meta.items() if k in kernel.arg_names})
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, param in enumerate(kernel.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, key = native_specialize_impl(
            BaseBackend,
            value,
            False,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = key
        elif isinstance(key, str) and key:
            attrs[(i,)] = BaseBackend.parse_attr(key)
    return signature, constexprs, attrs


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """regs, stack and local bytes per thread of a cubin, from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource line: {out[-300:]!r}")
    return dict(regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]))


def _compile_row(job: tuple) -> dict:
    """Compile one launch for one arch (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    group, arch, index = job
    launch = _launches(group, arch)[index]
    options = {k: launch.meta[k] for k in ("num_warps", "num_stages") if k in launch.meta}
    signature, constexprs, attrs = specialize(launch.kernel, launch.args, launch.meta)
    fn = launch.kernel
    row: dict[str, Any] = {
        "kernel": f"{fn.fn.__module__}:{fn.fn.__name__}",
        "arch": arch,
        **launch.labels,
        "signature": signature,
        "constexprs": constexprs,
        "attrs": {str(k[0]): v for k, v in attrs.items()},
        "num_warps": options.get("num_warps", 4),
        "num_stages": options.get("num_stages", 3),
        "regs": None,
        "spill_bytes": None,
        "shared_bytes": None,
        "error": None,
    }
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options=options,
        )
        usage = resource_usage(compiled.asm["cubin"])
        row["regs"] = usage["regs"]
        row["spill_bytes"] = usage["stack"] + usage["local"]
        row["shared_bytes"] = compiled.metadata.shared + usage["static_shared"]
    except Exception as e:  # a compile error is a result of the report, not a crash
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        key = [ln for ln in lines if "Error" in ln or "error" in ln] or lines or [""]
        row["error"] = f"{type(e).__name__}: {key[0][:300]}"
    return row


def row_failure(row: dict) -> str | None:
    """Why a row fails (compile error, spill, shared memory over the limit), or None."""
    if row["error"]:
        return row["error"]
    if row["spill_bytes"]:
        return f"spills {row['spill_bytes']} bytes per thread"
    limit = SHARED_LIMIT.get(row["arch"])
    if limit is not None and row["shared_bytes"] > limit:
        return f"shared memory {row['shared_bytes']} > {limit}"
    return None


def _quick(group: str, labels: dict) -> bool:
    """The default test's subset: each 16-bit tile-table entry once, in its most
    register-hungry variant (bf16 stands for fp16: the same code with another element type;
    head dims 80/96 share head dim 128's tiles). fp32 and the rest run in the full report."""
    if labels.get("dtype") != "bfloat16":
        return False
    if group == "attention":
        return labels.get("gqa", 1) == 1 and labels["head_dim"] in (64, 128, 256)
    if group == "lora":
        shape = labels["shape"]
        return shape["rank"] in (16, 128) and shape["dropout"] and shape["w_4bit"]
    return True


def jobs(archs: list[int], groups: list[str], quick: bool = False) -> list[tuple]:
    """(group, arch, index) of every distinct compile: launches that specialize to the same
    signature, constants and options (fp16 and bf16 never do; rank 8 and 16 may) compile once."""
    out, seen = [], set()
    for arch in archs:
        for group in groups:
            for i, launch in enumerate(_launches(group, arch)):
                if quick and not _quick(group, launch.labels):
                    continue
                sig, const, attrs = specialize(launch.kernel, launch.args, launch.meta)
                opts = (launch.meta.get("num_warps"), launch.meta.get("num_stages"))
                key = (arch, launch.kernel.fn.__qualname__, launch.kernel.fn.__module__,
                       repr(sig), repr(const), repr(attrs), opts)  # fmt: skip
                if key not in seen:
                    seen.add(key)
                    out.append((group, arch, i))
    return out


def report(
    archs: list[int], groups: list[str], quick: bool = False, workers: int | None = None
) -> list[dict]:
    """Compile every distinct launch of ``groups`` for ``archs``; one row per compile."""
    todo = jobs(archs, groups, quick)
    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    if workers == 1:
        return [_compile_row(j) for j in todo]
    # spawn, not fork: this process already runs torch's and Triton's threads, and a forked
    # child can inherit one of their locks held (seen here: workers asleep forever)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_row, todo, chunksize=1))


def _env_for_compiling() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated
    return env


def run_report(archs: list[int], groups: list[str], quick: bool = False) -> list[dict]:
    """``report`` in a fresh process when this one runs Triton in interpreter mode."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return report(archs, groups, quick)
    cmd = [sys.executable, "-m", "pyfast_tune.kernels.aot", "--json"]
    cmd += ["--arch", ",".join(map(str, archs)), "--only", ",".join(groups)]
    cmd += ["--quick"] if quick else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env_for_compiling())
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"aot report failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _shape(row: dict) -> str:
    if "head_dim" in row:
        return f"D{row['head_dim']} gqa{row.get('gqa', 1)}"
    return str(row.get("shape", ""))


def _table(rows: list[dict]) -> str:
    lines = [
        f"{'kernel':44} {'arch':>4} {'dtype':9} {'shape':24} {'tiles':22} {'w':>2} {'s':>2} "
        f"{'regs':>4} {'spill':>5} {'shared':>7}  status"
    ]
    for r in rows:
        c = r["constexprs"]
        tiles = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D") if k in c)
        status = row_failure(r) or "ok"
        lines.append(
            f"{r['kernel'].split(':')[1]:44} {r['arch']:>4} {r.get('dtype', ''):9} "
            f"{_shape(r):24} {tiles:22} {r['num_warps']:>2} {r['num_stages']:>2} "
            f"{r['regs'] if r['regs'] is not None else '-':>4} "
            f"{r['spill_bytes'] if r['spill_bytes'] is not None else '-':>5} "
            f"{r['shared_bytes'] if r['shared_bytes'] is not None else '-':>7}  {status}"
        )
    bad = sum(row_failure(r) is not None for r in rows)
    lines.append(f"{len(rows)} compiles, {bad} failing")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pyfast_tune.kernels.aot",
        description="Compile every shipped Triton kernel config for sm_80/sm_90 (no GPU needed) "
        "and report registers, spills and shared memory. Exit 1 on any compile error, spill "
        "or shared-memory overflow.",
        epilog="example: python -m pyfast_tune.kernels.aot --arch 80,90 --json > aot.json",
    )
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities")
    ap.add_argument("--json", action="store_true", help="print a JSON list of rows")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"subset of {','.join(GROUPS)}")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="each 16-bit tile-table entry once, in its most register-hungry variant (the default "
        "test's set) instead of every dtype, head dim, rank and flag",
    )
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        ap.error(f"--only: unknown {unknown}; choose from {GROUPS}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        os.execve(sys.executable, [sys.executable, "-m", "pyfast_tune.kernels.aot", *(argv or sys.argv[1:])],
                  _env_for_compiling())  # fmt: skip
    rows = report(archs, groups, args.quick)
    print(json.dumps(rows, indent=1) if args.json else _table(rows))
    return 1 if any(row_failure(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
