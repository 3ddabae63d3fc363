"""Benchmark of the fused linear cross-entropy against the plain logits path, and a training step.

1. The loss alone, forward+backward of ``CE(hidden @ W.T, targets)`` with gradients of both
   hidden and W (full fine-tuning, the op's worst case: it keeps a weight gradient):
   - ``ours``: ``pyfast_tune.kernels.linear_cross_entropy`` (torch backend on CPU, Triton on
     CUDA), reduction "sum";
   - ``plain``: ``F.cross_entropy((h @ W.T).float(), t, reduction="sum")``, what training does
     with ``fused_loss: false`` (and what the op replaces);
   - ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` where it runs (CUDA and
     ``liger-kernel`` installed; reported as n/a with the reason otherwise).
   H 576 (SmolLM2-135M), T ∈ {4096, 16384} × V ∈ {49152, 151936}, and the target shape
   T 8192 × V 49152 (targets: memory above the inputs <= 0.2x plain's, time <= 1.2x).
2. A whole training step (forward, backward, AdamW) of a SmolLM2-135M-sized Llama (30 layers,
   H 576, V 49152, tied, random init, activation checkpointing as training has it) on one
   packed row of 8192 tokens (8 samples), ``fused_loss`` on and off: peak RSS and tokens/s.

Each measurement runs in a fresh subprocess so its peak is its own: peak RSS (VmHWM, reset
after the inputs exist) minus RSS then, with glibc's mmap threshold pinned so freed buffers
leave RSS; on CUDA, ``max_memory_allocated`` above the inputs. Times: median of ``--repeat``
runs after a small warm-up, wall clock and this process's CPU time (on a shared machine the
CPU time is the steadier figure of the work done). A side whose estimated peak exceeds 60% of MemAvailable is
skipped and says so (the machine is shared; plain at 16k x 152k needs ~30 GB).

    python bench/bench_loss.py                           # everything, ~25 min on 2 loaded cores
    python bench/bench_loss.py --part loss --shapes 8192x49152 --repeat 3
    python bench/bench_loss.py --part step
    pytest bench/bench_loss.py -s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 576
TARGET = (8192, 49152)
GRID = ((4096, 49152), (4096, 151936), (16384, 49152), (16384, 151936))
METHODS = ("ours", "plain", "liger")
STEP_TOKENS, STEP_SAMPLES = 8192, 8


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class _Peak:
    """Peak memory above the current level: CUDA allocator, or this process's RSS."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS

    def mib(self) -> float:
        import torch

        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_rss_kib("VmHWM") * 1024 - self.base) / 2**20


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _loss_fn(method: str, device: str):
    import torch.nn.functional as F

    from pyfast_tune.kernels import linear_cross_entropy

    if method == "ours":
        return lambda h, W, t: linear_cross_entropy(h, W, t, reduction="sum")
    if method == "plain":
        return lambda h, W, t: F.cross_entropy((h @ W.T).float(), t, reduction="sum")
    if device != "cuda":
        raise RuntimeError("n/a: Liger-Kernel's kernels are Triton, CUDA only")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise RuntimeError("n/a: liger-kernel is not installed") from None
    liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda h, W, t: liger(W, h, t)


def _loss_worker(method: str, T: int, V: int, repeat: int, dtype_name: str) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    fn = _loss_fn(method, device)
    torch.manual_seed(0)

    def make(t):
        h = torch.randn(t, HIDDEN, device=device, dtype=dtype, requires_grad=True)
        W = (torch.randn(V, HIDDEN, device=device, dtype=dtype) / HIDDEN**0.5).requires_grad_()
        return h, W, torch.randint(0, V, (t,), device=device)

    h, W, t = make(256)  # warm-up: BLAS threads, Triton compile
    fn(h, W, t).backward()
    h, W, t = make(T)
    peak = _Peak(device)
    times, cpu, loss = [], [], 0.0
    for _ in range(repeat):
        h.grad = W.grad = None
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(h, W, t)
        out.backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        loss = float(out)
    times.sort()
    cpu.sort()
    return {"ms": 1e3 * times[len(times) // 2], "cpu_ms": 1e3 * cpu[len(cpu) // 2],
            "peak_mib": peak.mib(), "loss": loss}  # fmt: skip


def _step_worker(fused: str, tokens: int, samples: int) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyfast_tune import patch
    from pyfast_tune.trainer.batches import collate
    from pyfast_tune.trainer.step import batch_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=8192,
                         use_cache=False)  # SmolLM2-135M's shape  # fmt: skip
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model = patch.apply(model, lora=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rng = np.random.default_rng(0)

    def batch(n_tokens: int):
        seg = n_tokens // samples
        packs = []
        for _ in range(samples):
            ids = rng.integers(0, config.vocab_size, seg)
            packs.append({"input_ids": ids, "labels": ids.copy(), "position_ids": np.arange(seg),
                          "cu_seqlens": np.array([0, seg], dtype=np.int32)})  # fmt: skip
        return collate(packs, "token", n_tokens)

    def step(b) -> float:
        loss = batch_loss(model, b, device, fused=fused == "true")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step(batch(256))  # warm-up: optimizer state, C++ attention op, the fused-loss probe
    b = batch(tokens)
    peak = _Peak(device)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step(b)
    _sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"s": seconds, "cpu_s": cpu, "tokens_per_s": tokens / seconds, "peak_mib": peak.mib(),
            "loss": loss}  # fmt: skip


def _subprocess(args: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, __file__, "--worker", *args], env=env,
                         capture_output=True, text=True, check=False)  # fmt: skip
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["killed"])[-1].removeprefix("RuntimeError: ")
        return {"error": last[-200:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _plain_estimate(T: int, V: int) -> int:
    """Bytes plain needs: logits, their fp32 log-softmax and its gradient (fp32, T x V)."""
    return 3 * T * V * 4


def run_loss(shapes, repeat: int, methods=METHODS, dtype: str = "float32") -> list[dict]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"\nlinear cross-entropy fwd+bwd ({where}, torch {torch.__version__}; H {HIDDEN}, "
          f"{dtype}, grads of hidden and W; median of {repeat})")  # fmt: skip
    print(f"{'T x V':>16} {'method':>6} {'ms':>10} {'CPU ms':>10} {'peak MiB':>10}  ours vs it")
    rows = []
    for T, V in shapes:
        res = {}
        for m in methods:
            if m == "plain" and device == "cpu" and _plain_estimate(T, V) > 0.6 * _mem_available():
                res[m] = {"error": f"skipped: needs ~{_plain_estimate(T, V) / 2**30:.0f} GiB"}
                continue
            res[m] = _subprocess(["loss", m, str(T), str(V), str(repeat), dtype])
        for m in methods:
            r = res[m]
            if "error" in r:
                print(f"{T:>6} x {V:<7} {m:>6} {r['error']}")
            else:
                vs = ""
                if m != "ours" and "error" not in res.get("ours", {"error": 1}):
                    o = res["ours"]
                    vs = (f"memory {o['peak_mib'] / r['peak_mib']:.3f}x, time {o['ms'] / r['ms']:.2f}x"
                          f" (CPU {o['cpu_ms'] / r['cpu_ms']:.2f}x)")  # fmt: skip
                print(f"{T:>6} x {V:<7} {m:>6} {r['ms']:>10.0f} {r['cpu_ms']:>10.0f} "
                      f"{r['peak_mib']:>10.0f}  {vs}")  # fmt: skip
            rows.append(dict(T=T, V=V, method=m, **r))
    return rows


def run_step(tokens: int = STEP_TOKENS, samples: int = STEP_SAMPLES) -> dict:
    print(f"\ntraining step, SmolLM2-135M-sized Llama, one packed row of {tokens} tokens "
          f"({samples} samples), forward+backward+AdamW, activation checkpointing")  # fmt: skip
    print(f"{'fused_loss':>10} {'s':>8} {'CPU s':>8} {'tokens/s':>9} {'peak MiB':>9}")
    res = {f: _subprocess(["step", f, str(tokens), str(samples)]) for f in ("true", "false")}
    for f, r in res.items():
        if "error" in r:
            print(f"{f:>10} {r['error']}")
        else:
            print(f"{f:>10} {r['s']:>8.1f} {r['cpu_s']:>8.1f} {r['tokens_per_s']:>9.0f} "
                  f"{r['peak_mib']:>9.0f}")  # fmt: skip
    if all("error" not in r for r in res.values()):
        t, f = res["true"], res["false"]
        print(f"fused: peak {t['peak_mib'] / f['peak_mib']:.2f}x, tokens/s "
              f"{t['tokens_per_s'] / f['tokens_per_s']:.2f}x (per CPU second "
              f"{f['cpu_s'] / t['cpu_s']:.2f}x); loss {t['loss']:.6f} vs {f['loss']:.6f}")  # fmt: skip
    return res


def _targets(rows) -> bool:
    by = {r["method"]: r for r in rows if (r["T"], r["V"]) == TARGET and "error" not in r}
    if not {"ours", "plain"} <= set(by):
        return False
    mem = by["ours"]["peak_mib"] / by["plain"]["peak_mib"]
    tim = by["ours"]["ms"] / by["plain"]["ms"]
    cpu = by["ours"]["cpu_ms"] / by["plain"]["cpu_ms"]
    ok = mem <= 0.2 and tim <= 1.2
    print(f"\ntarget T {TARGET[0]} x V {TARGET[1]}: memory {mem:.3f}x plain (<= 0.2), "
          f"time {tim:.2f}x plain (<= 1.2; CPU time {cpu:.2f}x): {'met' if ok else 'NOT met'}")  # fmt: skip
    return ok


def test_bench_loss():
    """`pytest bench/bench_loss.py -s`: the target shape; ours and plain agree on the loss."""
    rows = run_loss([TARGET], int(os.environ.get("BENCH_REPEAT", "3")), ("ours", "plain"))
    by = {r["method"]: r for r in rows}
    assert abs(by["ours"]["loss"] - by["plain"]["loss"]) <= 1e-5 * abs(by["plain"]["loss"])
    _targets(rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *a = sys.argv[2:]
        if kind == "loss":
            out = _loss_worker(a[0], int(a[1]), int(a[2]), int(a[3]), a[4])
        else:
            out = _step_worker(a[0], int(a[1]), int(a[2]))
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "loss", "step"), default="all")
    ap.add_argument("--shapes", nargs="*", help="TxV, default: the target shape and the grid")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = ap.parse_args()
    if a.part in ("all", "loss"):
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes] if a.shapes else [
            TARGET, *GRID]  # fmt: skip
        rows = run_loss(shapes, a.repeat, a.methods, a.dtype)
        _targets(rows)
    if a.part in ("all", "step"):
        run_step()


if __name__ == "__main__":
    main()
