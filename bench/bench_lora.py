"""CPU benchmark: fused ``lora_linear`` vs peft's LoRA ``Linear``, forward and forward+backward.

Run:  .venv/bin/python bench/bench_lora.py [--tokens 4096 --in 2048 --out 2048 --r 16]
  or: .venv/bin/python -m pytest bench/bench_lora.py -s

Both sides get the same weights and input (x requires grad, as it does inside a model; W is
frozen, A and B train; the adapters are peft's own tensors, fp32 on a bf16 base as peft
keeps them). Time: median wall-clock of interleaved repetitions (ours, peft, ours,
...) so that load from other processes hits both alike. Saved-activation bytes: distinct
non-parameter storages handed to autograd's ``saved_tensors_hooks`` during the forward — what
the graph keeps alive until backward.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import pyfast_tune  # noqa: F401
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyfast_tune.kernels.lora import lora_linear


def _peft_layer(W, A, B, dropout_p, alpha):
    from peft import LoraConfig, get_peft_model

    K, N, r = W.shape[1], W.shape[0], A.shape[0]
    base = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False, dtype=W.dtype))
    model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout_p, target_modules=["0"])
    )
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(W)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    layer.train()
    return layer, layer.scaling["default"]


def saved_bytes(fn, params) -> int:
    """Bytes of distinct non-parameter storages autograd saves while running fn()."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def run(tokens=4096, d_in=2048, d_out=2048, r=16, dropout_p=0.0, dtype=torch.float32, reps=5):
    """Returns a dict of median seconds and saved bytes for both implementations."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(d_out, d_in, generator=g) * d_in**-0.5).to(dtype)
    A = (torch.randn(r, d_in, generator=g) * d_in**-0.5).to(dtype).requires_grad_()
    B = (torch.randn(d_out, r, generator=g) * 0.01).to(dtype).requires_grad_()
    dy = torch.randn(tokens, d_out, generator=g).to(dtype)
    layer, s = _peft_layer(W, A, B, dropout_p, alpha=2 * r)
    peft_params = list(layer.parameters())
    # peft keeps adapters in fp32 on a half-precision base (autocast_adapter_dtype): use its
    # very tensors, so both sides run the same dtypes
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def ours():
        return lora_linear(x, W, A, B, s, dropout_p, backend="torch")

    def peft():
        return layer(x)

    def fwd(fn):
        with torch.no_grad():
            fn()

    def fwd_bwd(fn, params):
        y = fn()
        torch.autograd.grad(y, (x, *params), dy)

    cases = {
        "fwd": (lambda: fwd(ours), lambda: fwd(peft)),
        "fwd+bwd": (
            lambda: fwd_bwd(ours, (A, B)),
            lambda: fwd_bwd(peft, [p for p in peft_params if p.requires_grad]),
        ),
    }
    result = {}
    for name, (f_ours, f_peft) in cases.items():
        f_ours(), f_peft()  # warm-up
        t_ours, t_peft = [], []
        for _ in range(reps):
            for fn, acc in ((f_ours, t_ours), (f_peft, t_peft)):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        result[name] = (statistics.median(t_ours), statistics.median(t_peft))
    result["saved"] = (saved_bytes(ours, (W, A, B)), saved_bytes(peft, peft_params))
    return result


def report(res, tokens, d_in, d_out, r, dropout_p, dtype) -> str:
    lines = [
        f"fused LoRA vs peft LoRA Linear | CPU {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores | tokens {tokens}, in {d_in}, "
        f"out {d_out}, r {r}, dropout {dropout_p}, {str(dtype).removeprefix('torch.')}",
        f"{'':10}{'ours':>12}{'peft':>12}{'ours/peft':>11}",
    ]
    for name in ("fwd", "fwd+bwd"):
        o, p = res[name]
        lines.append(f"{name:10}{o * 1e3:>10.1f}ms{p * 1e3:>10.1f}ms{o / p:>11.3f}")
    o, p = res["saved"]
    lines.append(f"{'saved':10}{o / 2**20:>10.1f}MB{p / 2**20:>10.1f}MB{o / p:>11.3f}")
    return "\n".join(lines)


def test_bench_lora_cpu():
    """pytest entry: the issue's shape, dropout off and on."""
    for p in (0.0, 0.1):
        res = run(dropout_p=p, reps=3)
        print("\n" + report(res, 4096, 2048, 2048, 16, p, torch.float32))
        assert res["saved"][0] <= res["saved"][1], "fused op saves more than peft"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--in", dest="d_in", type=int, default=2048)
    ap.add_argument("--out", dest="d_out", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    for p in a.dropout:
        res = run(a.tokens, a.d_in, a.d_out, a.r, p, dtype, a.reps)
        print(report(res, a.tokens, a.d_in, a.d_out, a.r, p, dtype) + "\n")


if __name__ == "__main__":
    main()
