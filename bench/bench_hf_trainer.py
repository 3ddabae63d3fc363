"""transformers.Trainer steps on the same packs: our collator + patch against plain padding-free.

Conversations (bench/_corpus.py: ../shared/data/chitchat.jsonl with the SmolLM2 tokenizer where
present, else generated chats of realistic lengths with a byte-level BPE of SmolLM2's vocabulary
size trained on them; the label is printed; the first ``--records``, OpenAI format, the
tokenizer's own chat template) packed by the Rust engine into packs of up to
``--max-length`` tokens. A SmolLM2-135M-shaped Llama (30 layers, H 576, V 49152, tied; random
init, never downloaded; fp32 on CPU) with LoRA r 16 on every linear layer, activation
checkpointing, trained by ``transformers.Trainer`` one pack per step, two ways:

- ``ours``: ``PackedTorchDataset`` + ``PackedCollator`` + ``pyfast_tune.patch.apply(model)``
  (our varlen attention op and fused LoRA op; boundaries from ``cu_seq_lens_q/k``);
- ``plain``: the same packs split back into their samples and flattened by transformers'
  ``DataCollatorWithFlattening`` (position_ids, no flash kwargs), the model's stock SDPA.

Both see the same packs in the same order (Trainer's seeded sampler) from the same initial
weights, so their first-step losses must agree (printed); each side runs in a fresh process,
one untimed warm-up step then ``--steps`` timed steps (median wall and CPU seconds per step).

    python bench/bench_hf_trainer.py                    # ~6 min on 2 idle cores
    python bench/bench_hf_trainer.py --max-length 2048 --steps 2
    python bench/bench_hf_trainer.py --packed packed/ --steps 2     # packs already made
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _corpus import bench_data

ROOT = Path(__file__).resolve().parents[1]


def _pack(out: Path, records: int, max_length: int) -> Path:
    from pyfast_tune.data import pack
    from pyfast_tune.trainer.tiny import trimmed_conversations

    data = bench_data()
    print(data.label)
    src = trimmed_conversations(data.chat, out / "chats.jsonl", records, 10_000)
    stats = pack([src], out / "packed", tokenizer=data.tokenizer,
                 max_length=max_length, format="openai", template="hf")  # fmt: skip
    print(f"packed: {stats.summary()}")
    return out / "packed"


def _model(lora_r: int):
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=8192,
                         use_cache=False)  # SmolLM2-135M's shape  # fmt: skip
    model = LlamaForCausalLM(config).float()
    model.config._attn_implementation = "sdpa"
    lora = peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                           target_modules="all-linear")  # fmt: skip
    return peft.get_peft_model(model, lora)


class _SplitIntoSamples:
    """The plain side's collator: each pack back into its samples, then transformers' own."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening()

    def __call__(self, packs):
        samples = []
        for p in packs:
            starts = (p["position_ids"] == 0).nonzero().flatten().tolist() + [len(p["input_ids"])]
            for a, b in zip(starts[:-1], starts[1:]):
                samples.append({"input_ids": p["input_ids"][a:b], "labels": p["labels"][a:b]})
        return self.flatten(samples)


def _side(side: str, packed: str, steps: int, lora_r: int, checkpointing: bool) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pyfast_tune import patch
    from pyfast_tune.hf import PackedCollator, PackedTorchDataset

    ds = PackedTorchDataset(packed)
    model = _model(lora_r)
    if side == "ours":
        patch.apply(model)
        collator = PackedCollator()
    else:
        collator = _SplitIntoSamples()

    times: list[tuple[float, float]] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))

    class Count:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, features):
            batch = self.inner(features)
            tokens.append(int(batch["input_ids"].numel()))
            return batch

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=1, max_steps=steps + 1,
            learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
            activation_checkpointing=checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False},
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=Count(collator),
                          callbacks=[Clock()])  # fmt: skip
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    wall = [w for w, _ in times[1:]]
    cpu = [c for _, c in times[1:]]
    return {
        "side": side,
        "s_per_step": statistics.median(wall),
        "cpu_s_per_step": statistics.median(cpu),
        "tokens_per_step": statistics.mean(tokens[1 : steps + 1]),
        "first_loss": losses[0],
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (after 1 warm-up)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--packed", help="an existing packed directory (default: pack --records)")
    args = p.parse_args(argv)
    if args.side:
        res = _side(args.side, args.packed, args.steps, args.lora_r, not args.no_checkpointing)
        print("RESULT " + json.dumps(res))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        packed = args.packed or _pack(Path(tmp), args.records, args.max_length)
        results = {}
        for side in ("ours", "plain"):
            cmd = [sys.executable, __file__, "--side", side, "--packed", str(packed),
                   "--steps", str(args.steps), "--lora-r", str(args.lora_r)]  # fmt: skip
            if args.no_checkpointing:
                cmd.append("--no-checkpointing")
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                print(done.stdout[-3000:], done.stderr[-3000:])
                raise SystemExit(f"side {side} failed ({done.returncode})")
            results[side] = json.loads(line[0][len("RESULT ") :])
    print(f"\nTrainer step, SmolLM2-135M-shaped Llama, LoRA r {args.lora_r}, one pack of up to "
          f"{args.max_length} tokens per step, CPU fp32, median of {args.steps} steps")  # fmt: skip
    print(f"{'side':<6} {'s/step':>8} {'CPU s':>8} {'tokens':>7} {'tokens/s':>9} {'loss 1':>8}")
    for r in results.values():
        print(f"{r['side']:<6} {r['s_per_step']:>8.2f} {r['cpu_s_per_step']:>8.2f} "
              f"{r['tokens_per_step']:>7.0f} {r['tokens_per_step'] / r['s_per_step']:>9.0f} "
              f"{r['first_loss']:>8.4f}")  # fmt: skip
    ours, plain = results["ours"], results["plain"]
    print(
        f"ours is {plain['s_per_step'] / ours['s_per_step']:.2f}x faster per step (wall), "
        f"{plain['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}x (CPU time); "
        f"first-step loss differs by {abs(ours['first_loss'] - plain['first_loss']):.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
