"""GPU benchmark of the Triton varlen attention kernels (issue 4); skips without CUDA.

Against, when installed, flash-attn's ``flash_attn_varlen_func`` and torch's own varlen
attention (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.9), and always against SDPA
per segment. Same shapes as the CPU bench plus a 64k pack; H 32, D 128, bf16, causal.
Reports forward, backward (measured as fwd+bwd minus fwd) and fwd+bwd time and peak memory.

    python bench/bench_attention_gpu.py
    pytest bench/bench_attention_gpu.py -s
"""

from __future__ import annotations

import pytest
import torch

SHAPES = ((4096, 8), (16384, 32), (16384, 512), (65536, 64))
HEADS, HEAD_DIM, DTYPE = 32, 128, torch.bfloat16


def _methods():
    """name -> fn(q, k, v, cu, max_len) -> out, for what this machine has."""
    import torch.nn.functional as F

    from pyfast_tune.kernels import varlen_attention

    methods = {
        "triton": lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, cu, m, m, backend="triton"),
    }
    try:
        from flash_attn import flash_attn_varlen_func

        methods["flash-attn"] = lambda q, k, v, cu, m: flash_attn_varlen_func(
            q, k, v, cu, cu, m, m, causal=True
        )
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        methods["torch-varlen"] = lambda q, k, v, cu, m: varlen_attn(
            q, k, v, cu, cu, m, m, is_causal=True
        )
    except ImportError:
        pass

    def loop(q, k, v, cu, m):
        b = cu.tolist()
        outs = [
            F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1),
                k[s:e].transpose(0, 1),
                v[s:e].transpose(0, 1),
                is_causal=True,
            ).transpose(0, 1)
            for s, e in zip(b[:-1], b[1:])
        ]
        return torch.cat(outs)

    methods["sdpa-loop"] = loop
    return methods


def _time_ms(fn, repeat: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def run_all() -> None:
    print(
        f"\nvarlen attention, GPU {torch.cuda.get_device_name()}; H {HEADS}, D {HEAD_DIM}, {DTYPE}, causal"
    )
    print(
        f"{'tokens/segs':>12} {'method':>13} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9}"
    )
    methods = _methods()
    for tokens, segments in SHAPES:
        seg = tokens // segments
        cu = torch.arange(0, tokens + 1, seg, dtype=torch.int32, device="cuda")
        q, k, v = (
            torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True)
            for _ in range(3)
        )
        dout = torch.randn_like(q)
        for name, fn in methods.items():
            if name == "sdpa-loop" and segments > 64:
                continue  # thousands of tiny launches: not a baseline anyone would run

            args = (q, k, v, cu, seg)

            def fwd(fn=fn, args=args):
                with torch.no_grad():
                    fn(*args)

            def fwd_bwd(fn=fn, args=args, dout=dout):
                fn(*args).backward(dout)

            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t_fwd, t_both = _time_ms(fwd), _time_ms(fwd_bwd)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            print(
                f"{tokens:>6}/{segments:<5} {name:>13} {t_fwd:>9.2f} {t_both - t_fwd:>9.2f} "
                f"{t_both:>11.2f} {peak:>9.1f}"
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_bench_attention_gpu():
    run_all()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("bench_attention_gpu: no CUDA GPU on this machine, nothing to measure")
    else:
        run_all()
