"""CPU benchmark of varlen attention: the C++ op against two SDPA baselines.

Baselines, measured in the same run on the same inputs (H 8, D 64, fp32, causal):
- ``dense``: one SDPA call over the whole pack with a dense block-diagonal causal mask
  (what packed training does without a varlen kernel: cost and mask memory grow with pack²);
- ``loop``: SDPA per segment on slices of the packed tensors (torch's CPU flash kernel per
  sample, ``is_causal=True``); its backward writes a full-size gradient for every slice.

Each (method, shape, pass) runs in a fresh subprocess so peak memory is that run's own:
peak RSS (VmHWM) minus RSS after the inputs exist, with glibc's mmap threshold pinned so
freed buffers leave RSS. Times are the median of ``--repeat`` runs after one warm-up.

    python bench/bench_attention.py                       # all shapes, ~5 min on 2 cores
    python bench/bench_attention.py --shapes 4096x8 --repeat 5
    pytest bench/bench_attention.py -s
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
SHAPES = ((4096, 8), (16384, 32), (16384, 512))
METHODS = ("ours", "dense", "loop")
PASSES = ("fwd", "fwd+bwd")
HEADS, HEAD_DIM = 8, 64


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(method: str, tokens: int, segments: int, mode: str, repeat: int) -> dict:
    """Runs in a subprocess: time and peak memory of one (method, shape, pass)."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from pyfast_tune.kernels import varlen_attention

    torch.manual_seed(0)
    seg = tokens // segments
    cu = torch.arange(0, tokens + 1, seg, dtype=torch.int32)
    q, k, v = (torch.randn(tokens, HEADS, HEAD_DIM, requires_grad=mode != "fwd") for _ in range(3))
    dout = torch.randn(tokens, HEADS, HEAD_DIM)
    if method == "dense":
        pos = torch.arange(tokens)
        doc = pos // seg
        mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])  # (T, T) bool

    def run():
        if method == "ours":
            return varlen_attention(q, k, v, cu, cu, seg, seg, causal=True, backend="cpp")
        if method == "dense":
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                attn_mask=mask,
            )
            return o[0].transpose(0, 1)
        outs = []
        for b in range(segments):
            s = slice(b * seg, (b + 1) * seg)
            o = F.scaled_dot_product_attention(
                q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1), is_causal=True
            )
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return run()
        for t in (q, k, v):
            t.grad = None
        out = run()
        out.backward(dout)
        return out

    out = step()  # warm-up (and the C++ build on a cold cache)
    checksum = float(out.detach().double().sum())
    del out
    for t in (q, k, v):
        t.grad = None  # peak counts the run's outputs and gradients too
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _rss_kib("VmHWM") - base
    times.sort()
    return {"ms": 1e3 * times[len(times) // 2], "peak_mib": peak / 1024, "checksum": checksum}


def measure(method: str, tokens: int, segments: int, mode: str, repeat: int) -> dict:
    """One measurement in a fresh interpreter (clean allocator, own peak RSS)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    args = [
        sys.executable,
        __file__,
        "--worker",
        method,
        str(tokens),
        str(segments),
        mode,
        str(repeat),
    ]
    res = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{method} {tokens}/{segments} {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_all(shapes=SHAPES, repeat: int = 3, methods=METHODS) -> list[dict]:
    """Measure every (shape, pass, method); print a table and the ratios ours / baseline."""
    import torch

    print(
        f"\nvarlen attention, CPU: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; H {HEADS}, D {HEAD_DIM}, fp32, causal, equal segments"
    )
    print(
        f"{'tokens/segs':>12} {'pass':>8} {'method':>6} {'ms':>10} {'peak MiB':>9} {'ours is':>22}"
    )
    rows = []
    for tokens, segments in shapes:
        for mode in PASSES:
            res = {m: measure(m, tokens, segments, mode, repeat) for m in methods}
            for m in methods:
                r = res[m]
                ratio = ""
                if m != "ours" and "ours" in res:
                    ratio = f"{r['ms'] / res['ours']['ms']:.1f}x faster"
                print(
                    f"{tokens:>6}/{segments:<5} {mode:>8} {m:>6} {r['ms']:>10.1f} "
                    f"{r['peak_mib']:>9.1f} {ratio:>22}"
                )
                rows.append(dict(tokens=tokens, segments=segments, mode=mode, method=m, **r))
    return rows


def test_bench_attention_cpu():
    """`pytest bench/bench_attention.py -s`: the table, and all methods agree on the output."""
    rows = run_all(repeat=int(os.environ.get("BENCH_REPEAT", "3")))
    for tokens, segments in SHAPES:
        sums = [r["checksum"] for r in rows if (r["tokens"], r["segments"]) == (tokens, segments)]
        assert max(sums) - min(sums) < 1e-2 * max(1.0, abs(sums[0])), sums


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, tokens, segments, mode, repeat = sys.argv[2:7]
        print(json.dumps(_worker(method, int(tokens), int(segments), mode, int(repeat))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shapes", nargs="*", default=[f"{t}x{s}" for t, s in SHAPES], help="TOKENSxSEGMENTS"
    )
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes]
    run_all(shapes, a.repeat, a.methods)


if __name__ == "__main__":
    main()
