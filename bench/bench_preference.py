"""DPO on CPU: our packed pairs against TRL 1.16's ``DPOTrainer`` (padded), same pairs.

The pairs come from the benchmark corpus (bench/_corpus.py: ../shared/data chats with the
SmolLM2 tokenizer where present, else generated chats of realistic lengths with a 49k BPE):
each chat's first question is the prompt, its answer (cut to ``--max-words`` words) the
chosen completion and another chat's answer the rejected one, so lengths vary as real pairs'
do. They are packed once (``pack --format preference``, template ``default``) and TRL gets
exactly those token ids (prompt = the tokens before the first trained one, completions the
rest), so both sides train on the same tokens.

Both sides train on every pair once (after one untimed warm-up step), so pairs/s compares the
same work. Model: a randomly initialised Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads,
3 KV heads, MLP 1536, tied embeddings; ``--shape tiny`` for a smoke run), fp32, LoRA r 16 on
every linear layer, AdamW, the reference = the adapters disabled (TRL's own choice for a peft
model without ``ref_model``), beta 0.1, sigmoid loss. Each side runs in its own process (peak
RSS is that process's):

- ``ours``: one pack per step (whole pairs, ``--pack-length`` tokens at most), varlen
  attention, the fused LoRA op, per-token log-probabilities from the fused linear
  cross-entropy (no logits);
- ``trl``: ``DPOTrainer.train`` with ``per_device_train_batch_size`` = ``--batch`` pairs,
  padded to the longest sequence of each batch (TRL 1.16 disables ``padding_free``).

Printed: pairs/s, tokens/s (real tokens), peak RSS, the share of TRL's batch positions that
are padding, and the ratio ours/TRL (target: >= 2x). ::

    python bench/bench_preference.py                    # SmolLM2-135M shape, ~10 min on 2 cores
    python bench/bench_preference.py --shape tiny --pairs 48
    pytest bench/bench_preference.py -s
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, layers=30, heads=9, kv_heads=3, intermediate_size=1536),
    "tiny": dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128),
}


def prepare(work: Path, args) -> dict:
    """Pairs, their pack and the model, in ``work``."""
    from _corpus import bench_data

    from pyfast_tune.data import PackedDataset, pack
    from pyfast_tune.trainer.tiny import make_tiny_llama, preference_pairs

    data = bench_data()
    pairs = preference_pairs(data.chat, work / "pairs.jsonl", records=args.pairs,
                             max_words=args.max_words)  # fmt: skip
    pack([pairs], work / "packed", tokenizer=data.tokenizer, max_length=args.pack_length,
         format="preference", template="default")  # fmt: skip
    model = make_tiny_llama(work / "model", data.tokenizer, seed=0, **SHAPES[args.shape])
    ds = PackedDataset(work / "packed")
    return {"label": data.label, "packs": len(ds), "pairs": ds.num_samples // 2,
            "model": str(model), "packed": str(work / "packed")}  # fmt: skip


def _lora_model(model_dir: str, r: int):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pyfast_tune.trainer.model import lora_config

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(0)
    return get_peft_model(model, lora_config({"r": r, "alpha": 2 * r, "dropout": 0.0}, None))


def run_ours(info: dict, args) -> dict:
    from types import SimpleNamespace

    import torch

    from pyfast_tune import patch
    from pyfast_tune.config import PreferenceConfig
    from pyfast_tune.data import PackedDataset
    from pyfast_tune.trainer.batches import collate
    from pyfast_tune.trainer.preference import Reference, global_pairs, row_loss

    model = _lora_model(info["model"], args.lora_r)
    patch.apply(model, lora=True, attention=True, attention_backend="auto")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = SimpleNamespace(objective="dpo", preference=PreferenceConfig(beta=0.1), fused_loss=True)
    ds = PackedDataset(info["packed"])
    times, pairs, tokens, losses = [], 0, 0, []
    # One untimed warm-up step on pack 0, then every pack once: each pair exactly once.
    for step, pack_id in enumerate([0, *range(len(ds))]):
        ids = [pack_id]
        batch = collate([ds[i] for i in ids], "token", 1)
        t0 = time.perf_counter()
        loss, _, figures = row_loss(
            model, batch, "cpu", cfg, global_pairs(ds, ids), Reference(None)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
            pairs += int(figures[0])
            tokens += batch.num_tokens
            losses.append(float(loss))
    return {"seconds": sum(times), "pairs": pairs, "tokens": tokens, "padding": 0.0,
            "loss": sum(losses) / len(losses)}  # fmt: skip


def _trl_rows(packed: str) -> list[dict]:
    """Our packed pairs as TRL's tokenized rows: the same token ids."""
    import numpy as np

    from pyfast_tune.data import PackedDataset

    ds = PackedDataset(packed)
    rows = {}
    for j in range(ds.num_samples):
        s = ds.sample(j)
        ids, trained = s["input_ids"], np.nonzero(s["labels"] != -100)[0]
        first = int(trained[0]) if len(trained) else len(ids)
        row = rows.setdefault(s["pair"], {})
        row["prompt_ids"] = ids[:first].tolist()
        row["chosen_ids" if s["role"] == "chosen" else "rejected_ids"] = ids[first:].tolist()
    return [rows[k] for k in sorted(rows)]


def run_trl(info: dict, args) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model = _lora_model(info["model"], args.lora_r)
    tok = AutoTokenizer.from_pretrained(info["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = _trl_rows(info["packed"])
    # Every pair once (the last batch topped up from the first pairs), plus one untimed
    # warm-up batch: one epoch of max_steps batches in the sampler's shuffled order.
    rows = rows + rows[: (-len(rows)) % args.batch]
    rows = rows + rows[: args.batch]
    steps = len(rows) // args.batch
    config = DPOConfig(output_dir=str(Path(info["packed"]).parent / "trl"), report_to=[],
                       use_cpu=True, bf16=False, gradient_checkpointing=False, beta=0.1,
                       per_device_train_batch_size=args.batch, max_steps=steps,
                       learning_rate=1e-4, logging_steps=1, save_strategy="no",
                       dataloader_num_workers=0, seed=0)  # fmt: skip
    trainer = DPOTrainer(model=model, args=config, processing_class=tok,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": " b",
                                                           "rejected": " c"}]))  # fmt: skip
    trainer.train_dataset = Dataset.from_list(rows)
    marks = {"times": [], "real": 0, "positions": 0}
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        marks["real"] += int(batch["attention_mask"].sum())
        marks["positions"] += batch["attention_mask"].numel()
        return batch

    trainer.data_collator = counting

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            marks["times"].append(time.perf_counter() - marks["t0"])

    trainer.add_callback(Clock())
    result = trainer.train()
    timed = marks["times"][1:]
    per_batch_real = marks["real"] / max(len(marks["times"]), 1)
    return {"seconds": sum(timed), "pairs": len(timed) * args.batch,
            "tokens": int(per_batch_real * len(timed)),
            "padding": 1 - marks["real"] / max(marks["positions"], 1),
            "loss": float(result.training_loss)}  # fmt: skip


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    info = json.loads(Path(args.info).read_text())
    out = run_ours(info, args) if args.side == "ours" else run_trl(info, args)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def compare(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-pref-") as tmp:
        work = Path(tmp)
        info = prepare(work, args)
        (work / "info.json").write_text(json.dumps(info))
        results = {}
        for side in ("trl", "ours"):
            cmd = [sys.executable, __file__, "--side", side, "--info", str(work / "info.json"),
                   *_pass_through(args)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise RuntimeError(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[side] = json.loads(line[-1][7:])
    ours, trl = results["ours"], results["trl"]
    print(f"{info['label']}; {info['pairs']} pairs in {info['packs']} packs of "
          f"<= {args.pack_length} tokens; model: {args.shape}, LoRA r {args.lora_r}, fp32, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'':6} {'pairs/s':>8} {'tokens/s':>9} {'peak RSS MiB':>13} {'padding':>8} {'loss':>7}")
    for name, r in (("trl", trl), ("ours", ours)):
        print(f"{name:6} {r['pairs'] / r['seconds']:8.2f} {r['tokens'] / r['seconds']:9.0f} "
              f"{r['peak_rss_mib']:13.0f} {r['padding']:8.1%} {r['loss']:7.4f}")  # fmt: skip
    ratio = (ours["pairs"] / ours["seconds"]) / (trl["pairs"] / trl["seconds"])
    print(f"ours / TRL pairs per second: {ratio:.2f}x (target >= 2x); peak RSS ratio "
          f"{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}")  # fmt: skip
    return {"ratio": ratio, "ours": ours, "trl": trl}


def _pass_through(args) -> list[str]:
    return ["--batch", str(args.batch), "--lora-r", str(args.lora_r), "--threads",
            str(args.threads)]  # fmt: skip


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--pairs", type=int, default=64, help="pairs to make, pack and train on")
    p.add_argument("--max-words", type=int, default=120, help="words per completion at most")
    p.add_argument("--pack-length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="TRL's pairs per step")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--info", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def test_bench_preference():
    """pytest entry: the tiny shape (the SmolLM2-135M shape is the script's default)."""
    out = compare(parse(["--shape", "tiny", "--pairs", "48"]))
    assert out["ours"]["pairs"] > 0 and out["trl"]["pairs"] > 0


if __name__ == "__main__":
    a = parse()
    child(a) if a.side else compare(a)
