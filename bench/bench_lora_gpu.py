"""GPU benchmark: fused ``lora_linear`` (Triton, and the composed torch backend) beside peft.

Every method is first checked the way the first-use guard checks it (y, dx, dA, dB against a
float64 reference, flash-attention's rule relative to peft's own error); a method that fails is
reported and not timed. Then forward, backward and forward+backward (median of
``triton.testing.do_bench``), TFLOP/s (base and adapter matmuls: 2·M·(K·N + K·r + r·N)
forward, 2·M·(K·N + 2·N·r + 2·r·K) backward), saved-activation bytes and peak memory, with
each method's time over peft's. Skips without CUDA.

Run:  .venv/bin/python bench/bench_lora_gpu.py [--tokens 8192 --in 4096 --out 4096 --r 16]
      .venv/bin/python bench/bench_lora_gpu.py --four-bit          # QLoRA: NF4 base weight
  or: .venv/bin/python -m pytest bench/bench_lora_gpu.py -s
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest
import torch

try:
    import pyfast_tune  # noqa: F401
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_lora's helpers

NO_GPU = "no CUDA GPU: the Triton LoRA kernels are benchmarked on GPU only"
METHODS = ("triton", "torch", "peft")


def lora_flops(M: int, K: int, N: int, r: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of one LoRA linear (frozen base: no dW)."""
    return 2.0 * M * (K * N + K * r + r * N), 2.0 * M * (K * N + 2 * N * r + 2 * r * K)


def check(methods, device, dtype, adapter_dtype, r, four_bit) -> dict[str, str | None]:
    """{method: None if correct, else why not} — the guard's own check, run fresh."""
    from pyfast_tune.kernels import guard

    shape = {"dtype": str(dtype).removeprefix("torch."),
             "adapter_dtype": str(adapter_dtype).removeprefix("torch."),
             "rank": r, "four_bit": four_bit}  # fmt: skip
    found = {}
    for c in guard.evaluate(guard.get_op("lora_linear"), device, shape, list(methods), race=False):
        found[c.backend] = None if c.ok else (c.error or "failed")
        state = "ok" if c.ok else ("skipped" if c.ok is None else "WRONG/FAILED")
        ratio = f"{c.error_ratio:g}x peft's error (allowed {c.allowed:g}x)" if c.ok else ""
        print(f"  check {c.backend:7} {state:8} {ratio}{c.error or ''}")
    return found


def _bench(device, repeat=None):
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench

    def best_ms(fn):  # CPU smoke runs of this script's logic
        fn()
        times = []
        for _ in range(repeat or 5):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return min(times)

    return best_ms


def run(tokens, d_in, d_out, r, dropout_p, dtype=torch.bfloat16, adapter_dtype=None,
        four_bit=False, device=None, methods=METHODS, repeat=None) -> dict:  # fmt: skip
    """{method: {fwd, bwd, fwd+bwd (ms), saved, peak (bytes)}} for the methods that pass.

    ``repeat``: timed calls per figure on CPU (None: 5; the GPU check kit's dry mode runs 1);
    on CUDA ``triton.testing.do_bench`` decides.
    """
    from bench_lora import saved_bytes

    from pyfast_tune.kernels.lora import lora_linear
    from pyfast_tune.kernels.lora.upstream import peft_lora_layer

    device = device or torch.device("cuda")
    adapter_dtype = adapter_dtype or dtype
    verdict = check(methods, device, dtype, adapter_dtype, r, four_bit)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, device=device, generator=gen) * std).to(dt)

    x = randn(tokens, d_in).requires_grad_()
    W = randn(d_out, d_in, std=d_in**-0.5)
    A = randn(r, d_in, std=d_in**-0.5, dt=adapter_dtype).requires_grad_()
    B = randn(d_out, r, std=0.01, dt=adapter_dtype).requires_grad_()
    dy = randn(tokens, d_out)
    layer = peft_lora_layer(W, A.detach(), B.detach(), 2 * r, four_bit, dtype)
    layer.lora_dropout["default"] = torch.nn.Dropout(dropout_p)  # peft's own, in train mode
    s = layer.scaling["default"]
    base_w = layer.get_base_layer().weight if four_bit else W
    peft_params = [p for p in layer.parameters() if p.requires_grad]
    impls = {
        name: (lambda name=name: lora_linear(x, base_w, A, B, s, dropout_p, backend=name), [A, B])
        for name in ("triton", "torch")
    }
    impls["peft"] = (lambda: layer(x), peft_params)
    bench, res = _bench(device, repeat), {}
    for name in methods:
        if verdict.get(name) is not None:
            continue
        fn, params = impls[name]
        row = {"fwd": bench(lambda fn=fn: fn().detach())}
        y = fn()
        row["bwd"] = bench(
            lambda y=y, p=params: torch.autograd.grad(y, (x, *p), dy, retain_graph=True)
        )
        row["fwd+bwd"] = bench(lambda fn=fn, p=params: torch.autograd.grad(fn(), (x, *p), dy))
        del y
        row["saved"] = saved_bytes(fn, [W, base_w, A, B, *layer.parameters()])
        row["peak"] = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            torch.autograd.grad(fn(), (x, *params), dy)
            row["peak"] = torch.cuda.max_memory_allocated() - base
        res[name] = row
    return res


def report(res, tokens, d_in, d_out, r, p, dtype, four_bit, device) -> str:
    from pyfast_tune.kernels.guard import device_name

    f_fwd, f_bwd = lora_flops(tokens, d_in, d_out, r)
    flops = {"fwd": f_fwd, "bwd": f_bwd, "fwd+bwd": f_fwd + f_bwd}
    names = list(res)
    base = "4-bit NF4" if four_bit else str(dtype).removeprefix("torch.")
    lines = [
        f"LoRA linear | {device_name(device)} | tokens {tokens}, in {d_in}, out {d_out}, r {r}, "
        f"dropout {p}, base {base} | torch {torch.__version__}",
        f"{'':9}"
        + "".join(f"{n:>22}" for n in names)
        + "".join(f"{n + '/peft':>13}" for n in names if n != "peft" and "peft" in res),
    ]
    for k in ("fwd", "bwd", "fwd+bwd"):
        cells = "".join(
            f"{res[n][k]:>8.3f}ms {flops[k] / res[n][k] / 1e9:>6.1f}TF/s " for n in names
        )
        ratios = "".join(
            f"{res[n][k] / res['peft'][k]:>13.3f}" for n in names if n != "peft" and "peft" in res
        )
        lines.append(f"{k:9}{cells}{ratios}")
    for k in ("saved", "peak"):
        cells = "".join(f"{res[n][k] / 2**20:>20.1f}MB" for n in names)
        lines.append(f"{k:9}{cells}")
    return "\n".join(lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("four_bit", [False, True])
def test_bench_lora_gpu(four_bit):
    dev = torch.device("cuda")
    for p in (0.0, 0.1):
        res = run(8192, 4096, 4096, 16, p, four_bit=four_bit, device=dev)
        print("\n" + report(res, 8192, 4096, 4096, 16, p, torch.bfloat16, four_bit, dev))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--in", dest="d_in", type=int, default=4096)
    ap.add_argument("--out", dest="d_out", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--four-bit", action="store_true", help="QLoRA: an NF4 base weight")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"skipped: {NO_GPU}")
        return
    dev = torch.device("cuda")
    for p in (0.0, 0.1):
        res = run(a.tokens, a.d_in, a.d_out, a.r, p, four_bit=a.four_bit, device=dev)
        print(report(res, a.tokens, a.d_in, a.d_out, a.r, p, torch.bfloat16, a.four_bit, dev))


if __name__ == "__main__":
    main()
