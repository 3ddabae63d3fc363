"""GPU benchmark: our Triton varlen attention beside torch's varlen_attn, flash-attn and SDPA.

Every method is first checked the way the first-use guard checks it (forward and gradients
against a float64 reference, flash-attention's rule relative to the upstream's own error);
a method that fails is reported and not timed. Then forward, backward and forward+backward are
timed on packed batches (causal, bf16, H 32, D 128, GQA 4 unless told), and printed with
TFLOP/s (causal FLOPs counted per segment: 4·H·D·L²/2 forward, 2.5x that backward) and each
method's time over ours. Skips without CUDA.

    python bench/bench_attention_gpu.py                       # the default shapes
    python bench/bench_attention_gpu.py --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16
    pytest bench/bench_attention_gpu.py -s
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

try:
    import pyfast_tune  # noqa: F401
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NO_GPU = "no CUDA GPU on this machine: the Triton attention kernels are benchmarked on GPU only"
SHAPES = ((4096, 8), (16384, 32), (16384, 512), (65536, 64))  # (tokens, segments)
METHODS = ("triton", "torch_varlen", "flash_attn", "sdpa")  # ours first


def attention_flops(lens: list[int], heads: int, head_dim: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of causal attention over segments of ``lens``."""
    fwd = sum(4.0 * heads * head_dim * n * n / 2 for n in lens)
    return fwd, 2.5 * fwd


def check(methods, device, dtype, head_dim, gqa) -> dict[str, str | None]:
    """{method: None if correct, else why not} — the guard's own check, run fresh."""
    from pyfast_tune.kernels import guard

    shape = {"dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim, "gqa": gqa,
             "window": [-1, 0]}  # fmt: skip
    op = guard.get_op("varlen_attention")
    found = {}
    for c in guard.evaluate(op, device, shape, list(methods), race=False):
        found[c.backend] = None if c.ok else (c.error or "failed")
        state = "ok" if c.ok else ("skipped" if c.ok is None else "WRONG/FAILED")
        ratio = f"{c.error_ratio:g}x the upstream's error (allowed {c.allowed:g}x)" if c.ok else ""
        print(f"  check {c.backend:13} {state:8} {ratio}{c.error or ''}")
    return found


def _timer(device):
    import time

    def time_ms(fn, repeat=10) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / repeat
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t) * 1e3)
        return best

    return time_ms


def run(shapes, heads, kv_heads, head_dim, dtype, device, methods=METHODS, repeat=10) -> list[dict]:
    """Check, then time every correct method on every shape; rows for the table.

    ``repeat``: timed calls per figure (the GPU check kit's dry mode runs 1 in the interpreter).
    """
    from pyfast_tune.kernels.varlen_attention import varlen_attention

    print(f"\nvarlen attention | {_device_name(device)} | H {heads}, H_kv {kv_heads}, "
          f"D {head_dim}, {str(dtype).removeprefix('torch.')}, causal | torch {torch.__version__}")  # fmt: skip
    verdict = check(methods, device, dtype, head_dim, heads // kv_heads)
    usable = [m for m in methods if verdict.get(m) is None]
    time_ms, rows = _timer(device), []
    for tokens, segments in shapes:
        seg = tokens // segments
        lens = [seg] * segments
        cu = torch.arange(0, tokens + 1, seg, dtype=torch.int32, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype, generator=gen)
        k, v = (torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
                for _ in range(2))  # fmt: skip
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        dout = torch.randn_like(q)
        f_fwd, f_bwd = attention_flops(lens, heads, head_dim)
        for name in usable:
            if name == "sdpa" and segments > 64:
                continue  # thousands of tiny launches: not a baseline anyone would run

            args = (q, k, v, cu, cu, seg, seg)

            def fwd(name=name, args=args):
                with torch.no_grad():
                    varlen_attention(*args, backend=name)

            def both(name=name, args=args, dout=dout):
                varlen_attention(*args, backend=name).backward(dout)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t_fwd, t_both = time_ms(fwd, repeat), time_ms(both, repeat)
            peak = (
                (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else 0
            )
            rows.append({"tokens": tokens, "segments": segments, "method": name,
                         "fwd_ms": t_fwd, "bwd_ms": t_both - t_fwd, "fwd_bwd_ms": t_both,
                         "fwd_tflops": f_fwd / t_fwd / 1e9,
                         "fwd_bwd_tflops": (f_fwd + f_bwd) / t_both / 1e9, "peak_mib": peak})  # fmt: skip
    print_table(rows, methods[0])
    return rows


def print_table(rows: list[dict], ours: str = "triton") -> None:
    print(f"{'tokens/segs':>12} {'method':>13} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} "
          f"{'fwd TF/s':>9} {'f+b TF/s':>9} {'peak MiB':>9} {'f+b / ' + ours:>11}")  # fmt: skip
    mine_by = {(r["tokens"], r["segments"]): r["fwd_bwd_ms"] for r in rows if r["method"] == ours}
    for r in rows:
        mine = mine_by.get((r["tokens"], r["segments"]))
        ratio = f"{r['fwd_bwd_ms'] / mine:.2f}" if mine else "-"
        print(f"{r['tokens']:>6}/{r['segments']:<5} {r['method']:>13} {r['fwd_ms']:>8.2f} "
              f"{r['bwd_ms']:>8.2f} {r['fwd_bwd_ms']:>8.2f} {r['fwd_tflops']:>9.1f} "
              f"{r['fwd_bwd_tflops']:>9.1f} {r['peak_mib']:>9.1f} {ratio:>11}")  # fmt: skip


def _device_name(device) -> str:
    from pyfast_tune.kernels.guard import device_name

    return device_name(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_bench_attention_gpu():
    run(SHAPES, 32, 8, 128, torch.bfloat16, torch.device("cuda"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"skipped: {NO_GPU}")
        return
    dtype = getattr(torch, a.dtype)
    run(SHAPES, a.heads, a.kv_heads, a.head_dim, dtype, torch.device("cuda"))


if __name__ == "__main__":
    main()
