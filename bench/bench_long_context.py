"""Long-context training with sequence parallelism: peak memory per rank and tokens/s.

One training step (forward, backward, gradient all-reduce, AdamW) of a SmolLM2-135M-sized
Llama (H 576, I 1536, V 49152, tied embeddings, random init from a config, nothing downloaded)
on one packed row of 16k and of 32k tokens, with the fused loss and gradient checkpointing as
training has them, unsplit (N = 1) and split over N = 2 ranks (``sequence_parallel_size: 2``:
``shard_row`` + Ulysses all-to-all around the varlen op, gloo on CPU). Full fine-tuning.

Departures from SmolLM2-135M, printed with the results: 12 heads of 48 instead of 9 of 64 and
4 key/value heads of 48 instead of 3 of 64 (the same widths, parameters and FLOPs: Ulysses
splits heads, and 9 do not split over 2 ranks), and ``--layers`` (default 2 of its 30) so a
step runs on a 2-core CPU in seconds; activation memory per rank is linear in the depth under
gradient checkpointing, so the ratio N=2 / N=1 measured at 2 layers holds at 30 (the docs'
formula). Samples of ``--sample-length`` tokens (default 4096) fill the row, so a step does
not spend minutes in quadratic attention on 2 cores; the attention op is our C++ kernel
(O(T) memory, like flash-attention).

Memory: every (tokens, N) case runs in fresh processes (torchrun), so nothing that ran before
counts. Each rank warms up on a short row (optimizer state, gradients, the C++ op, the fused
loss probe), then resets its peak RSS (``/proc/self/clear_refs``) and runs the step: peak
activation memory = VmHWM during the step - VmRSS before it (weights, gradients and Adam
state are in the baseline, as they are the same at any N), with glibc's mmap threshold pinned
so freed buffers leave RSS; the peak is read after forward and backward, before the gradient
all-reduce and the optimizer's update (their temporaries are parameter-sized, not activations,
and the same at any N; their time is in tokens/s). tokens/s counts the row's tokens per second of the group's step;
each case gets the same 2 cores (N = 2: one thread per rank).

    .venv/bin/python bench/bench_long_context.py                      # 16k, 32k; ~3 min
    .venv/bin/python bench/bench_long_context.py --tokens 16384 --layers 4
    .venv/bin/python -m pytest bench/bench_long_context.py -s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_attention_heads=12, head_dim=48, num_key_value_heads=4,
                    tie_word_embeddings=True, rope_theta=100000.0)  # fmt: skip
TARGET = 0.6  # peak activation memory per rank, N=2 / N=1


def activation_bytes(
    tokens_per_rank: int,
    layers: int,
    hidden: int,
    kv_width: int,
    intermediate: int,
    dtype_bytes: int,
) -> int:
    """Peak activation memory of one rank under per-layer gradient checkpointing (the formula
    of docs/long-context.md): every layer keeps its input (L*h per token); the layer being
    recomputed in backward holds what autograd saves (two RMSNorms 2h each, the attention's
    q/out h each and k/v, o_proj's input h, SiLU's gate, the gate*up factors and down_proj's
    input 4I) plus the MLP backward's gradients in flight (3I + 2h)."""
    per_token = layers * hidden + 9 * hidden + 2 * kv_width + 7 * intermediate
    return tokens_per_rank * per_token * dtype_bytes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(tokens: int, layers: int, sample_length: int, attention: str, out: str) -> None:
    """One rank of a case (run by torchrun): warm up, then one measured step; JSON to out.rank."""
    import gc

    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyfast_tune import patch
    from pyfast_tune.trainer.batches import collate
    from pyfast_tune.trainer.sequence_parallel import SequenceParallel, shard_row
    from pyfast_tune.trainer.step import batch_loss

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    sp = None
    if world > 1:
        dist.init_process_group("gloo")
        sp = SequenceParallel(dist.group.WORLD, world, rank)
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M, num_hidden_layers=layers,
                         max_position_embeddings=max(tokens, 8192), use_cache=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    patch.apply(model, lora=False, attention_backend=attention)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def row(n_tokens: int, seed: int):
        rng = np.random.default_rng(seed)
        lengths = [sample_length] * (n_tokens // sample_length)
        if n_tokens % sample_length:
            lengths.append(n_tokens % sample_length)
        packs = []
        for n in lengths:
            ids = rng.integers(0, config.vocab_size, n)
            packs.append({"input_ids": ids, "labels": ids.copy(), "position_ids": np.arange(n),
                          "cu_seqlens": np.array([0, n], dtype=np.int32)})  # fmt: skip
        full = collate(packs, "token", n_tokens - len(lengths))
        return shard_row(full, world, rank) if sp is not None else full

    def forward_backward(batch) -> float:
        loss = batch_loss(model, batch, "cpu", fused=True, sequence_parallel=sp)
        loss.backward()
        return float(loss)

    def update() -> None:
        if sp is not None:  # what ZeRO's reduction does over a sequence-parallel group: a sum
            for p in model.parameters():
                dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: part of the baseline

    forward_backward(row(512, seed=1))
    update()
    batch = row(tokens, seed=2)
    gc.collect()
    if sp is not None:
        dist.barrier()
    base = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0, c0 = time.perf_counter(), time.process_time()
    loss = forward_backward(batch)
    peak = _status_kib("VmHWM") * 1024  # activations: forward and backward, not the update
    update()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    params = sum(p.numel() for p in model.parameters())
    Path(f"{out}.{rank}").write_text(json.dumps({
        "rank": rank, "loss": loss, "seconds": seconds, "cpu_seconds": cpu, "base": base,
        "peak": peak, "activation": peak - base, "params": params,
        "shard_tokens": len(batch.input_ids)}))  # fmt: skip
    if sp is not None:
        dist.destroy_process_group()


def run_case(tokens: int, n: int, layers: int, sample_length: int, attention: str) -> dict:
    """One (tokens, N) case in fresh processes; the ranks' figures and the group's."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))  # fmt: skip
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "rank")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
               "--standalone", __file__, "--worker", str(tokens), str(layers),
               str(sample_length), attention, out]  # fmt: skip
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"case tokens={tokens} N={n} failed:\n{p.stderr[-4000:]}")
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(n)]
    return {
        "tokens": tokens, "n": n, "ranks": ranks,
        "loss": sum(r["loss"] for r in ranks),  # the shards' shares sum to the row's loss
        "seconds": max(r["seconds"] for r in ranks),
        "tokens_per_s": tokens / max(r["seconds"] for r in ranks),
        "activation": max(r["activation"] for r in ranks),
        "peak": max(r["peak"] for r in ranks),
    }  # fmt: skip


def run(tokens_list, layers: int, sample_length: int, attention: str) -> list[dict]:
    mib = 2**20
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; fp32; "
          f"SmolLM2-135M widths (H 576, I 1536, V 49152, tied) with 12x48 query / 4x48 kv "
          f"heads (SmolLM2: 9x64 / 3x64, same parameters; 9 heads do not split over 2 ranks), "
          f"{layers} of its 30 layers; samples of {sample_length} tokens; attention "
          f"{attention}; fused loss, gradient checkpointing, full fine-tuning, AdamW")  # fmt: skip
    print(f"{'tokens':>7} {'N':>2} {'tokens/s':>9} {'step s':>7} {'act MiB/rank':>13} "
          f"{'peak RSS MiB/rank':>18} {'loss':>10}")  # fmt: skip
    results = []
    for tokens in tokens_list:
        by_n = {}
        for n in (1, 2):
            r = run_case(tokens, n, layers, sample_length, attention)
            by_n[n] = r
            results.append(r)
            print(f"{tokens:>7} {n:>2} {r['tokens_per_s']:>9.0f} {r['seconds']:>7.1f} "
                  f"{r['activation'] / mib:>13.0f} {r['peak'] / mib:>18.0f} {r['loss']:>10.6f}",
                  flush=True)  # fmt: skip
        ratio = by_n[2]["activation"] / by_n[1]["activation"]
        rel = abs(by_n[2]["loss"] - by_n[1]["loss"]) / abs(by_n[1]["loss"])
        per_token = by_n[1]["activation"] / tokens
        h, kv = (
            SMOLLM2_135M["hidden_size"],
            SMOLLM2_135M["num_key_value_heads"] * SMOLLM2_135M["head_dim"],
        )
        formula = [activation_bytes(tokens // n, layers, h, kv, SMOLLM2_135M["intermediate_size"], 4)
                   for n in (1, 2)]  # fmt: skip
        print(f"  {tokens} tokens: peak activation per rank N=2 / N=1 = {ratio:.3f} "
              f"(target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}); "
              f"tokens/s N=2 / N=1 = {by_n[2]['tokens_per_s'] / by_n[1]['tokens_per_s']:.2f}; "
              f"loss N=2 vs N=1 rel diff {rel:.1e}; "
              f"N=1 activation {per_token / 1024:.1f} KiB per token; formula "
              f"(docs/long-context.md) {formula[0] / mib:.0f} / {formula[1] / mib:.0f} MiB per "
              f"rank at N=1 / 2")  # fmt: skip
    return results


def test_bench_long_context():
    """`pytest bench/bench_long_context.py -s`: 16k tokens, 2 layers; N=2 halves activations
    per rank (<= 0.6x) and gives the unsplit loss."""
    results = run([16384], layers=2, sample_length=4096, attention="cpp")
    one, two = results
    assert two["activation"] <= TARGET * one["activation"]
    assert abs(two["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        tokens, layers, sample_length, attention, out = sys.argv[2:7]
        _worker(int(tokens), int(layers), int(sample_length), attention, out)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (SmolLM2-135M: 30)")
    ap.add_argument("--sample-length", type=int, default=4096)
    ap.add_argument("--attention", default="cpp", choices=("cpp", "op", "ref"))
    a = ap.parse_args()
    run(a.tokens, a.layers, a.sample_length, a.attention)


if __name__ == "__main__":
    main()
