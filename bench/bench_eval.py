"""What evaluation during training costs: eval time against step time, and the fill eval.split
leaves the training packs.

Conversations (bench/_corpus.py: ../shared/data/chitchat.jsonl with the SmolLM2 tokenizer where
present, else generated chats of realistic lengths with a byte-level BPE trained on them; the
label is printed; OpenAI format, template ``default``) packed at ``--max-length``; a tiny Llama (built from a config, fp32) trains with
LoRA for ``--steps`` steps on one CPU process through ``pyfast-tune train``'s launcher, with
``eval.split`` held out and evaluated every ``--eval-steps`` steps (loss over the held-out
samples, and ``--prompts`` greedy answers of ``--max-new-tokens`` tokens). Printed: the mean
optimizer step and the mean evaluation (from metrics.jsonl and eval.jsonl of the same run),
their ratio, and the fill of the packs before and after the held-out samples are taken out.

    python bench/bench_eval.py                        # ~2 min on 2 idle cores
    python bench/bench_eval.py --split 0.05 --steps 12 --eval-steps 4
    pytest bench/bench_eval.py -s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _corpus import bench_data

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["How was your weekend?", "What do you like to cook?", "Where did you grow up?"]


def run(args) -> dict:
    import numpy as np

    from pyfast_tune.data import PackedDataset, pack
    from pyfast_tune.launch import launch_command
    from pyfast_tune.trainer.evaluate import TrainingPacks, held_out_samples
    from pyfast_tune.trainer.metrics import read_metrics
    from pyfast_tune.trainer.tiny import make_tiny_llama

    data = bench_data()
    print(f"\n{data.label}")
    tok = data.tokenizer
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        d = Path(tmp)
        lines = data.chat.read_text().splitlines()[: args.records]
        (d / "chat.jsonl").write_text("\n".join(lines) + "\n")
        pack([d / "chat.jsonl"], d / "packed", tokenizer=tok, max_length=args.max_length,
             format="openai", template="default")  # fmt: skip
        model = make_tiny_llama(d / "tiny", tok, hidden_size=256, layers=4, heads=4, kv_heads=2,
                                intermediate_size=512)  # fmt: skip
        config = d / "run.yaml"
        config.write_text(
            f"model: {model}\ndata: {d / 'packed'}\nmax_length: {args.max_length}\n"
            f"method: lora\nmax_steps: {args.steps}\nlr: 1.0e-3\nglobal_batch_size: 1\n"
            "save_hf: false\nprogress_bar: false\nreport_to: none\n"
            f"eval:\n  split: {args.split}\n  steps: {args.eval_steps}\n"
            f"  max_new_tokens: {args.max_new_tokens}\n"
            f"  prompts: {json.dumps(PROMPTS[: args.prompts])}\n"
        )
        out = d / "run"
        cmd = launch_command(config, nproc=1, extra_args=["--output_dir", str(out)])
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        steps = read_metrics(out / "metrics.jsonl")
        evals = read_metrics(out / "eval.jsonl")
        ds = PackedDataset(d / "packed")
        train = TrainingPacks(ds, held_out_samples(ds, args.split, 0))
        step_s = float(np.mean([m["seconds"] for m in steps[1:]]))  # the first step warms up
        eval_s = float(np.mean([e["seconds"] for e in evals]))
        loss_s = float(np.mean([e["loss_seconds"] for e in evals]))
        answer_s = float(np.mean([e["answer_seconds"] for e in evals]))
        return {
            "data": data.chat.name,
            "samples": ds.num_samples,
            "held_out": ds.num_samples - train.num_samples,
            "eval_tokens": evals[-1]["trained_tokens"],
            "step_s": step_s,
            "eval_s": eval_s,
            "loss_s": loss_s,
            "answer_s": answer_s,
            "evals": len(evals),
            "fill_before": float(ds.pack_lengths.sum() / (len(ds) * args.max_length)),
            "fill_after": float(train.pack_lengths.sum() / (len(train) * args.max_length)),
            "packs_before": len(ds),
            "packs_after": len(train),
        }


def report(r: dict, args) -> None:
    print(f"{r['data']}, {r['samples']} samples; eval.split {args.split}: {r['held_out']} held "
          f"out ({r['eval_tokens']} trained tokens), {args.prompts} prompts x "
          f"{args.max_new_tokens} new tokens")  # fmt: skip
    print(f"  mean optimizer step  {r['step_s']:.3f} s (1 pack of <= {args.max_length} tokens)")
    print(f"  mean evaluation      {r['eval_s']:.3f} s ({r['evals']} evaluations)"
          f" = {r['eval_s'] / r['step_s']:.2f} steps: loss {r['loss_s']:.3f} s, answers "
          f"{r['answer_s']:.3f} s")  # fmt: skip
    print(f"  every {args.eval_steps} steps: +{r['eval_s'] / (r['step_s'] * args.eval_steps):.1%}"
          " of the training time")  # fmt: skip
    print(
        f"  pack fill {r['fill_before']:.2%} ({r['packs_before']} packs) -> "
        f"{r['fill_after']:.2%} ({r['packs_after']} packs) with the held-out samples taken out"
    )


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--split", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def test_bench_eval():
    args = _args([])
    report(run(args), args)


if __name__ == "__main__":
    a = _args()
    report(run(a), a)
