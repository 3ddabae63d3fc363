"""The Triton kernels compile for sm_80 and sm_90 the way they launch: no spills, within
shared memory, no compile errors the interpreter would not show (``pyfast_tune.kernels.aot``).

No GPU is needed: Triton's bundled ptxas compiles for a named architecture and its bundled
cuobjdump reads the registers and stack of the cubin. The default run compiles each 16-bit
tile-table entry once in its most register-hungry variant (``--quick``, ~50 compiles);
``-m slow`` compiles every dtype (fp32 too), head dim, GQA, rank and flag (~500). Triton caches
the compiles (~/.triton/cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pyfast_tune.kernels.aot import row_failure, run_report
from pyfast_tune.kernels.varlen_attention import triton as _varlen_triton


def _failures(rows):
    return [
        f"{r['kernel']} sm_{r['arch']} {r.get('dtype')} "
        f"{r.get('head_dim', r.get('shape'))} w{r['num_warps']}: {row_failure(r)}"
        for r in rows
        if row_failure(r)
    ]


@pytest.fixture(scope="module")
def quick_rows():
    return run_report([80, 90], ["attention", "lora", "lce"], quick=True)


def test_shipped_tiles_compile_spill_free_on_sm80_and_sm90(quick_rows):
    assert not _failures(quick_rows), "\n".join(_failures(quick_rows))
    # every kernel of both ops was compiled for both architectures
    kernels = {(r["kernel"].split(":")[1], r["arch"]) for r in quick_rows}
    for name in (
        "_varlen_attn_fwd_kernel",
        "_varlen_attn_bwd_preprocess_kernel",
        "_varlen_attn_bwd_dkdv_kernel",
        "_varlen_attn_bwd_dq_kernel",
        "_lora_fwd_kernel",
        "_lora_bwd_dx_kernel",
        "_lora_bwd_dadb_kernel",
    ):
        assert {(name, 80), (name, 90)} <= kernels, name
    # rows carry what a reader needs to reproduce the compile
    row = next(r for r in quick_rows if r["kernel"].endswith("_varlen_attn_fwd_kernel"))
    assert row["signature"]["Q_ptr"] in ("*bf16", "*fp32")
    assert row["constexprs"]["HEAD_DIM"] == row["head_dim"]
    assert row["regs"] > 0 and row["shared_bytes"] > 0


def test_report_rows_are_the_launchers_own_configs(quick_rows):
    """A row's tiles are launch_config's for its (dtype, head dim, arch): the report compiles
    what the product launches, not a copy of it."""
    names = {
        "_varlen_attn_fwd_kernel": "fwd",
        "_varlen_attn_bwd_dkdv_kernel": "bwd_dkdv",
        "_varlen_attn_bwd_dq_kernel": "bwd_dq",
    }
    seen = 0
    for r in quick_rows:
        kind = names.get(r["kernel"].split(":")[1])
        if kind is None:
            continue
        cfg = _varlen_triton.launch_config(
            kind, getattr(torch, r["dtype"]), r["head_dim"], r["arch"]
        )
        assert r["constexprs"]["BLOCK_M"] == cfg["BLOCK_M"]
        assert r["constexprs"]["BLOCK_N"] == cfg["BLOCK_N"]
        assert (r["num_warps"], r["num_stages"]) == (cfg["num_warps"], cfg["num_stages"])
        seen += 1
    assert seen >= 2 * 3 * 3  # two archs, three kernels, bf16 head dims 64/128/256


_SPECIALIZE = """
import json, torch
from pyfast_tune.kernels.lora import triton as _lora_triton
from pyfast_tune.kernels.varlen_attention import triton as _varlen_triton
from pyfast_tune.kernels.aot import specialize
q = torch.zeros((1, 32, 128), dtype=torch.bfloat16)
k = torch.zeros((1, 8, 128), dtype=torch.bfloat16)
out, lse = torch.zeros_like(q), torch.zeros((32, 1), dtype=torch.float32)
cu = torch.zeros(2, dtype=torch.int32)
att = _varlen_triton.fwd_launch(q, k, k, out, lse, cu, cu, 64, 0.1, -1, 0, 90)
x = torch.zeros((64, 256), dtype=torch.float16)
w = torch.zeros((512, 256), dtype=torch.float16)
a, b = torch.zeros((16, 256), dtype=torch.float16), torch.zeros((512, 16), dtype=torch.float16)
y, u = torch.zeros((64, 512), dtype=torch.float16), torch.zeros((64, 16), dtype=torch.float16)
wargs = _lora_triton._weight_args(w, None)
lora = _lora_triton.fwd_launch(x, wargs, a, b, None, y, u, 2.0, 0.1, 0, 80)
rows = []
for launch in (att, lora):
    sig, const, attrs = specialize(launch.kernel, launch.args, launch.meta)
    names = launch.kernel.arg_names
    rows.append(dict(sig=sig, const={k: repr(v) for k, v in const.items()},
                     hinted=[names[i[0]] for i in attrs]))
print(json.dumps(rows))
"""


def test_specialization_matches_the_jit():
    """Aligned pointers and strides divisible by 16 get the divisibility hint, unit strides
    become constants, and runtime-only arguments (window, group, seed) stay plain. (Compiled
    kernels only exist outside the interpreter, hence the fresh process.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _SPECIALIZE], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    att, lora = json.loads(proc.stdout.strip().splitlines()[-1])
    assert att["sig"]["Q_ptr"] == "*bf16" and att["sig"]["CU_Q_ptr"] == "*i32"
    assert att["sig"]["qk_scale"] == "fp32"
    assert {"Q_ptr", "stride_q_tok", "stride_k_tok"} <= set(att["hinted"])
    # window_right = 0 would be 'divisible by 16' if specialized: do_not_specialize keeps the
    # causal and non-causal launches on one binary
    assert att["sig"]["window_right"] == "i32" and "window_right" not in att["hinted"]
    assert att["sig"]["group"] == "i32" and "group" not in att["const"]
    assert lora["sig"]["stride_x_k"] == "constexpr" and lora["const"]["stride_x_k"] == "1"
    assert lora["sig"]["seed"] == "i32" and lora["sig"]["M"] == "i32"
    assert "M" not in lora["hinted"]  # M = 64 is divisible by 16, but M never specializes


def test_a_spilling_config_fails_the_report(monkeypatch):
    """The report's verdict, on rows as the compiler reports them."""
    base = dict(error=None, spill_bytes=0, shared_bytes=1000, arch=90)
    assert row_failure(base) is None
    assert "spills 48" in row_failure({**base, "spill_bytes": 48})
    assert "shared memory" in row_failure({**base, "shared_bytes": 300 * 1024})
    assert row_failure({**base, "arch": 80, "shared_bytes": 200 * 1024})  # fits H100, not A100
    assert "CompilationError" in row_failure({**base, "error": "CompilationError: x"})


@pytest.mark.slow
def test_every_config_compiles_spill_free_cli():
    """The whole report (every dtype, head dim, GQA, rank and flag) through the CLI."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pyfast_tune.kernels.aot", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    rows = json.loads(proc.stdout)
    assert not _failures(rows), "\n".join(_failures(rows))
    assert proc.returncode == 0
    assert len(rows) > 300
