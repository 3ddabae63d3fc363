"""CPU training throughput: packed rows + varlen attention against padded batches.

The same conversations (bench/_corpus.py: ../shared/data/chitchat.jsonl with the SmolLM2
tokenizer where present, else generated chats of realistic lengths with a byte-level BPE of the
same vocabulary size trained on them; OpenAI format, template ``default``) train a tiny Llama (built from a config, fp32, full fine-tuning, AdamW)
for one pass in two ways, measured in the same run:

- ``padded``: what a plain HF loop does: batches of ``--batch`` samples in a shuffled order,
  right-padded to the longest sample, attention mask, HF ``sdpa`` attention, HF's own loss;
- ``packed``: our path: each optimizer step one pack of up to ``--max-length`` tokens
  (whole samples back to back), position_ids restarting per sample, varlen attention
  (``ref`` = PyTorch per sample, ``op`` = pyfast_tune.kernels), per-sample shifted labels.

``--packs`` packs spread over the packed dataset supply the samples. Both train on exactly the
same samples once (one optimizer step per pack, or per padded batch); throughput counts real
(non-pad) tokens only. Packing can at best remove the padding, so the
ideal speed-up is 1/(1 - padding fraction) of the padded batches; the ratio is printed next
to it. Each path takes one untimed warm-up step (its first batch or pack, on its own copy of
the model) before its timed pass.

    python bench/bench_train.py                       # ~5 min on 2 idle cores
    python bench/bench_train.py --packs 20 --batch 8 --threads 2
    pytest bench/bench_train.py -s
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _corpus import bench_data

ROOT = Path(__file__).resolve().parents[1]


def _spread_packs(ds, n_packs: int) -> list[int]:
    """``n_packs`` pack indices spread evenly over the dataset (packs are made longest-first,
    so the first packs alone would hold only the longest, truncated conversations)."""
    import numpy as np

    return np.linspace(0, len(ds) - 1, n_packs).round().astype(int).tolist()


def _samples_of_packs(ds, pack_ids: list[int], seed: int = 0) -> list[tuple]:
    """(input_ids, labels) of every sample of these packs, shuffled as a random loader would."""
    import numpy as np

    out = []
    for i in pack_ids:
        p = ds[i]
        cu = p["cu_seqlens"]
        for a, b in zip(cu[:-1], cu[1:]):
            out.append((p["input_ids"][a:b], p["labels"][a:b]))
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]


def _padded_batches(samples, batch: int, pad_id: int):
    import numpy as np
    import torch

    for k in range(0, len(samples), batch):
        group = samples[k : k + batch]
        width = max(len(s[0]) for s in group)
        ids = np.full((len(group), width), pad_id, dtype=np.int64)
        labels = np.full((len(group), width), -100, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        for r, (i, lab) in enumerate(group):
            ids[r, : len(i)], labels[r, : len(i)], mask[r, : len(i)] = i, lab, 1
        yield torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(mask)


def _time_padded(model, samples, batch: int, pad_id: int) -> tuple[float, int, int]:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(ids, labels, mask):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(*next(_padded_batches(samples, batch, pad_id)))  # warm-up, untimed (as in packed)
    start = time.perf_counter()
    slots = 0
    for ids, labels, mask in _padded_batches(samples, batch, pad_id):
        step(ids, labels, mask)
        slots += ids.numel()
    real = sum(len(s[0]) for s in samples)
    return time.perf_counter() - start, real, slots


def _time_packed(model, ds, pack_ids: list[int]) -> tuple[float, int]:
    import torch

    from pyfast_tune.trainer.batches import collate, global_normalizer
    from pyfast_tune.trainer.step import batch_loss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(i):
        batch = collate([ds[i]], "token", global_normalizer(ds, [i], "token"))
        loss = batch_loss(model, batch, "cpu")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return batch.num_tokens

    step(pack_ids[0])  # warm-up, untimed (as in padded)
    start = time.perf_counter()
    tokens = 0
    for i in pack_ids:
        tokens += step(i)
    return time.perf_counter() - start, tokens


def run(packs: int, batch: int, max_length: int, threads: int, backends: list[str]) -> dict:
    """Measure and print; returns the figures."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from pyfast_tune import patch
    from pyfast_tune.data import PackedDataset, pack
    from pyfast_tune.trainer.tiny import make_tiny_llama

    torch.set_num_threads(threads)
    data = bench_data()
    tok = data.tokenizer
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    stats = pack(
        [data.chat],
        work / "packed",
        tokenizer=tok,
        max_length=max_length,
        format="openai",
        template="default",
    )
    ds = PackedDataset(work / "packed")
    model_dir = make_tiny_llama(
        work / "tiny", tok, hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.config.use_cache = False
    base.set_attn_implementation("sdpa")
    pad_id = base.config.eos_token_id or 0

    pack_ids = _spread_packs(ds, packs)
    samples = _samples_of_packs(ds, pack_ids)
    seconds, real, slots = _time_padded(copy.deepcopy(base), samples, batch, pad_id)
    padding = 1 - real / slots
    results = {"padded": {"seconds": seconds, "tokens": real, "tok_s": real / seconds}}
    for backend in backends:
        model = patch.apply(copy.deepcopy(base), lora=False, attention_backend=backend)
        seconds, tokens = _time_packed(model, ds, pack_ids)
        assert tokens == real, "both paths must train the same tokens"
        results[f"packed+varlen[{backend}]"] = {
            "seconds": seconds,
            "tokens": tokens,
            "tok_s": tokens / seconds,
        }

    print()
    print(data.label)
    print(
        f"CPU, {threads} thread(s) ({torch.get_num_threads()} in use); tiny Llama "
        f"(hidden 128, 4 layers, vocab {base.config.vocab_size}), fp32 full fine-tune, AdamW"
    )
    print(
        f"data: {data.chat.name}, {len(samples)} samples / {real} tokens in {packs} packs of "
        f"<= {max_length} (pack fill {stats.fill:.3f}); padded batches of {batch} samples"
    )
    print(f"padding fraction of the padded batches: {padding:.3f}")
    print(f"{'method':<22}{'seconds':>10}{'tokens/s':>12}{'vs padded':>12}")
    for name, r in results.items():
        ratio = r["tok_s"] / results["padded"]["tok_s"]
        print(f"{name:<22}{r['seconds']:>10.2f}{r['tok_s']:>12.0f}{ratio:>11.2f}x")
    print(f"ideal packed/padded ratio 1/(1 - padding) = {1 / (1 - padding):.2f}x")
    results["padding_fraction"] = padding
    results["ideal_ratio"] = 1 / (1 - padding)
    return results


def test_bench_train():
    r = run(packs=3, batch=8, max_length=2048, threads=2, backends=["ref", "op"])
    assert r["packed+varlen[ref]"]["tok_s"] > r["padded"]["tok_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--packs", type=int, default=8, help="packs (and their samples) to train on")
    ap.add_argument("--batch", type=int, default=8, help="samples per padded batch")
    ap.add_argument("--max-length", type=int, default=2048, help="tokens per pack")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="ref,op", help="varlen backends to measure")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    run(args.packs, args.batch, args.max_length, args.threads, args.backends.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
