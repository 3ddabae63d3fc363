"""GPU benchmark: Triton fused ``lora_linear`` vs peft's LoRA ``Linear`` (skips without CUDA).

Run:  .venv/bin/python bench/bench_lora_gpu.py [--tokens 8192 --in 4096 --out 4096 --r 16]
  or: .venv/bin/python -m pytest bench/bench_lora_gpu.py -s

Reports, per dropout setting: forward, backward and forward+backward time (median of
``triton.testing.do_bench``), saved-activation bytes (autograd ``saved_tensors_hooks``) and the
peak memory of one forward+backward, with the GPU name and shape printed beside them.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_lora's helpers

NO_GPU = "no CUDA GPU: the Triton LoRA kernels are benchmarked on GPU only"


def run(tokens, d_in, d_out, r, dropout_p, dtype=torch.bfloat16):
    """{case: (ours, peft)} with times in ms, saved and peak bytes."""
    from bench_lora import _peft_layer, saved_bytes
    from triton.testing import do_bench

    from pyfast_tune.kernels.lora import lora_linear

    dev = torch.device("cuda")
    x = torch.randn(tokens, d_in, device=dev, dtype=dtype, requires_grad=True)
    W = torch.randn(d_out, d_in, device=dev, dtype=dtype) * d_in**-0.5
    A = (torch.randn(r, d_in, device=dev, dtype=dtype) * d_in**-0.5).requires_grad_()
    B = (torch.randn(d_out, r, device=dev, dtype=dtype) * 0.01).requires_grad_()
    dy = torch.randn(tokens, d_out, device=dev, dtype=dtype)
    layer, s = _peft_layer(W.cpu(), A.detach().cpu(), B.detach().cpu(), dropout_p, 2 * r)
    layer = layer.to(dev)
    peft_train = [p for p in layer.parameters() if p.requires_grad]

    impls = {
        "ours": (lambda: lora_linear(x, W, A, B, s, dropout_p, backend="triton"), [A, B]),
        "peft": (lambda: layer(x), peft_train),
    }
    res: dict[str, list[float]] = {k: [] for k in ("fwd", "bwd", "fwd+bwd", "saved", "peak")}
    for fn, params in impls.values():
        res["fwd"].append(do_bench(fn))
        y = fn()
        res["bwd"].append(
            do_bench(lambda y=y, p=params: torch.autograd.grad(y, (x, *p), dy, retain_graph=True))
        )
        res["fwd+bwd"].append(
            do_bench(lambda fn=fn, p=params: torch.autograd.grad(fn(), (x, *p), dy))
        )
        del y
        res["saved"].append(saved_bytes(fn, [W, A, B, *layer.parameters()]))
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(fn(), (x, *params), dy)
        res["peak"].append(torch.cuda.max_memory_allocated() - base)
    return res


def report(res, tokens, d_in, d_out, r, p) -> str:
    lines = [
        f"fused LoRA (triton) vs peft | {torch.cuda.get_device_name()} | tokens {tokens}, "
        f"in {d_in}, out {d_out}, r {r}, dropout {p}, bf16",
        f"{'':10}{'ours':>12}{'peft':>12}{'ours/peft':>11}",
    ]
    for k in ("fwd", "bwd", "fwd+bwd"):
        o, q = res[k]
        lines.append(f"{k:10}{o:>10.3f}ms{q:>10.3f}ms{o / q:>11.3f}")
    for k in ("saved", "peak"):
        o, q = res[k]
        lines.append(f"{k:10}{o / 2**20:>10.1f}MB{q / 2**20:>10.1f}MB{o / q:>11.3f}")
    return "\n".join(lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_bench_lora_gpu():
    for p in (0.0, 0.1):
        print("\n" + report(run(8192, 4096, 4096, 16, p), 8192, 4096, 4096, 16, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--in", dest="d_in", type=int, default=4096)
    ap.add_argument("--out", dest="d_out", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"skipped: {NO_GPU}")
        return
    for p in (0.0, 0.1):
        print(report(run(a.tokens, a.d_in, a.d_out, a.r, p), a.tokens, a.d_in, a.d_out, a.r, p))


if __name__ == "__main__":
    main()
