"""The embedded default: generated chat data, a byte-level BPE tokenizer trained on it, and
(with the ``[train]`` extra) a tiny model — so the whole workflow runs with no download.

    python -m pyfast_tune.demo --out demo_out        # what `make demo` runs

prints and runs: pack -> inspect -> continued pretraining of the tiny model (full fine-tune on
plain text) -> convert -> LoRA fine-tune on the chats -> convert -> merge -> chat. Each subject
of the generated world has one fact ("The cat likes red apples in the morning."), so the last
step shows whether training worked: the answer is checked against the data's fact.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SUBJECTS = ["the cat", "my neighbour", "a robot", "the teacher", "our team", "the river", "she"]
_VERBS = ["likes", "builds", "paints", "remembers", "counts", "follows", "explains"]
_OBJECTS = ["red apples", "old songs", "tiny boats", "prime numbers", "the stars", "soft bread"]
_PLACES = ["in the morning", "at the market", "near the sea", "after school", "on Mondays"]
_QUESTIONS = ["What does {s} do?", "Why does {s} {v} {o}?", "Tell me about {s}.", "Where is {s}?"]


def fact(subject: str) -> str:
    """The one thing the generated data says ``subject`` does."""
    i = _SUBJECTS.index(subject)
    verb, obj, place = (
        _VERBS[i % len(_VERBS)],
        _OBJECTS[i % len(_OBJECTS)],
        _PLACES[i % len(_PLACES)],
    )
    return f"{subject[0].upper()}{subject[1:]} {verb} {obj} {place}."


def _sentence(rng: random.Random) -> str:
    return fact(rng.choice(_SUBJECTS))


def _answer(rng: random.Random, question: str, subject: str, exact: bool = False) -> str:
    """What does/Tell me about S: S's fact first; otherwise facts of any subjects. ``exact``:
    "What does S do?" is answered by S's fact alone, so where the answer ends is learnable."""
    first = [fact(subject)] if question.startswith(("What does", "Tell me")) else []
    more = rng.choice([0, 0, 1, 2, 4, 7, 12])
    if exact and question.startswith("What does"):
        return first[0]
    return " ".join(first + [_sentence(rng) for _ in range(more + (0 if first else 1))])


def synth_conversations(n: int, seed: int = 0, exact_answers: bool = False) -> list[dict]:
    """``n`` OpenAI-style chats with 1–6 turns of varied length, a function of ``seed`` only.

    ``exact_answers``: "What does S do?" gets S's fact and nothing more (the demo's question:
    a model can only learn to stop at its end-of-turn token where the data stops the same
    way); otherwise answers run on with a random number of facts (tests pin this data)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "You are a concise assistant."})
        for _turn in range(rng.randint(1, 6)):
            subject = rng.choice(_SUBJECTS)
            q = rng.choice(_QUESTIONS).format(
                s=subject, v=rng.choice(_VERBS), o=rng.choice(_OBJECTS)
            )
            a = _answer(rng, q, subject, exact_answers)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        records.append({"messages": messages})
    return records


def synth_documents(n: int, seed: int = 1) -> list[dict]:
    """``n`` plain-text documents (``{"text": ...}``) of the same world, for pretraining."""
    rng = random.Random(seed)
    return [{"text": " ".join(_sentence(rng) for _ in range(rng.randint(3, 40)))} for _ in range(n)]


def _texts(records: Iterable[dict]) -> Iterable[str]:
    for r in records:
        for m in r.get("messages", []):
            yield m["content"]


def make_tokenizer(records: list[dict], out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE tokenizer on the records' text (deterministic) and write
    ``tokenizer.json`` + ``tokenizer_config.json`` (ChatML special tokens, eos ``<|im_end|>``)."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return train_chatml_bpe(list(_texts(records)), Path(out_dir), vocab_size, pre, 4096)


def train_chatml_bpe(texts: list[str], out: Path, vocab_size: int, pre_tokenizer,
                     model_max_length: int) -> Path:  # fmt: skip
    """A byte-level BPE behind ``pre_tokenizer`` trained on ``texts`` (deterministic), with
    the ChatML special tokens, written to ``out`` with its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    return write_chatml_config(out, model_max_length=model_max_length)


def write_chatml_config(
    out: Path, model_max_length: int, chat_template: str = CHAT_TEMPLATE
) -> Path:
    """tokenizer_config.json of a trained ChatML tokenizer in ``out``: EOS ``<|im_end|>``, no
    BOS, ``chat_template``. Returns ``out``."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def prepare(out: Path, n: int = 2000, seed: int = 0) -> tuple[Path, Path, Path]:
    """Write the demo chats (``out/data/chat.jsonl``), pretraining text (``out/text/``) and
    tokenizer (``out/tokenizer``)."""
    records = synth_conversations(n, seed=seed, exact_answers=True)
    data = write_jsonl(records, out / "data" / "chat.jsonl")
    text = write_jsonl(synth_documents(n, seed=seed + 1), out / "text" / "docs.jsonl")
    tok = make_tokenizer(records, out / "tokenizer")
    return data.parent, text.parent, tok


DEMO_QUESTION = "What does the cat do?"


def _run(args: list[str]) -> None:
    """Print ``pyfast-tune ARGS`` as a shell line, run it in this process, fail loudly."""
    import shlex

    from pyfast_tune.cli import main as cli

    print(f"\n$ pyfast-tune {shlex.join(args)}", flush=True)
    code = cli(args)
    if code != 0:
        raise SystemExit(f"demo: `pyfast-tune {args[0]}` exited with {code}")


def write_run_config(
    out: Path, name: str, model: Path, packed: Path, steps: int, method: str, lr: float
) -> Path:
    """A demo training config ``out/NAME.yaml``: ``method`` (full, or LoRA on every linear
    layer) on the tiny model, one process."""
    config = out / f"{name}.yaml"
    config.write_text(
        f"# pyfast-tune train {config} --nproc 1   (written by python -m pyfast_tune.demo)\n"
        f"model: {model}\n"
        f"data: {packed}\n"
        "max_length: 1024\n"
        f"method: {method}\n"
        "lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}\n"
        "deepspeed: zero2\n"
        f"max_steps: {steps}\n"
        f"lr: {lr}\n"
        "warmup_steps: 2\n"
        "micro_batch_size: 2\n"
        "global_batch_size: 2\n"
        "gradient_checkpointing: false\n"
        "tensorboard: false\n"
        "progress_bar: false\n"
        "log_steps: 10\n"
        f"output_dir: {out / name}\n"
    )
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pyfast_tune.demo",
        description="Run pyfast-tune end to end on generated data (no download): pack -> inspect "
        "-> train a tiny model with LoRA -> convert -> merge -> chat. Needs the [train] extra "
        "for everything after inspect.",
    )
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out)")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--pretrain-steps", type=int, default=100,
                   help="full fine-tune steps on plain text (default 100)")  # fmt: skip
    # 100 steps learn the answer's form (one sentence, then <|im_end|>) but not which subject's
    # fact to give; by 250 the tiny model answers each subject's question with its fact.
    p.add_argument("--steps", type=int, default=250, help="LoRA training steps (default 250)")
    p.add_argument("--pack-only", action="store_true", help="stop after pack and inspect")
    args = p.parse_args(argv)

    out = Path(args.out)
    data, text, tok = prepare(out, n=args.samples)
    print(f"demo: {args.samples} generated chats in {data}, as many documents in {text}, "
          f"tokenizer in {tok}")  # fmt: skip
    packed = out / "packed"
    _run(["pack", "--in", str(data), "--out", str(packed), "--tokenizer", str(tok),
          "--max-length", str(args.max_length), "--template", "internlm2_chat"])  # fmt: skip
    _run(["inspect", str(packed), "--sample", "0", "--plot", str(out / "lengths.png")])
    if args.pack_only:
        return 0
    packed_text = out / "packed_text"
    _run(["pack", "--in", str(text), "--out", str(packed_text), "--tokenizer", str(tok),
          "--max-length", str(args.max_length), "--format", "pretrain"])  # fmt: skip

    from pyfast_tune.trainer.tiny import make_tiny_llama

    model = out / "tiny"
    print(f"\n# a tiny Llama (hidden 128, 2 layers) built from a config, saved to {model}")
    make_tiny_llama(model, tok, hidden_size=128, layers=2, heads=4, kv_heads=2,
                    intermediate_size=256, init_std=0.05)  # fmt: skip
    # Continued pretraining: a random model learns the language of the generated world.
    config = write_run_config(out, "pretrain", model, packed_text, args.pretrain_steps, "full",
                              3.0e-3)  # fmt: skip
    _run(["train", str(config), "--nproc", "1"])
    base = out / "base"
    _run(["convert", str(out / "pretrain"), str(base)])
    # Chat fine-tuning: a LoRA adapter on the pretrained base learns the template and answers.
    config = write_run_config(out, "run", base, packed, args.steps, "lora", 1.0e-2)
    _run(["train", str(config), "--nproc", "1"])
    _run(["convert", str(out / "run"), str(out / "adapter")])
    _run(["merge", str(base), str(out / "adapter"), str(out / "merged")])
    _run(["chat", str(out / "merged"), "--prompt", DEMO_QUESTION, "--max-new-tokens", "40"])
    print(f"(the generated data's answer: {fact('the cat')!r})")
    from pyfast_tune.trainer.metrics import read_metrics

    for name in ("pretrain", "run"):
        records = read_metrics(out / name / "metrics.jsonl")
        print(f"demo: {name}: final loss {records[-1]['loss']:.4f} after {records[-1]['step']} "
              f"steps; loss plot {out / name / 'loss.png'}")  # fmt: skip
    print(
        f"\ndemo: done. Try `pyfast-tune chat {out / 'merged'}` (interactive), or "
        f"`pyfast-tune chat {base} --adapter {out / 'adapter'}` (base + adapter)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
