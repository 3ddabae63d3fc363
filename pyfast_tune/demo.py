"""The embedded default: generated chat data, a byte-level BPE tokenizer trained on it, and
(with the ``[train]`` extra) a tiny model — so the whole workflow runs with no download.

    python -m pyfast_tune.demo --out demo_out        # what `make demo` runs
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


def _sentence(rng: random.Random) -> str:
    s = rng.choice(_SUBJECTS)
    out = f"{s.capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
    if rng.random() < 0.2:
        out += f" ({rng.randint(0, 9999)})"
    return out


def synth_conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` OpenAI-style chats with 1–6 turns of varied length, a function of ``seed`` only."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "You are a concise assistant."})
        for _turn in range(rng.randint(1, 6)):
            q = rng.choice(_QUESTIONS).format(
                s=rng.choice(_SUBJECTS), v=rng.choice(_VERBS), o=rng.choice(_OBJECTS)
            )
            a = " ".join(_sentence(rng) for _ in range(rng.choice([1, 1, 2, 3, 5, 8, 13])))
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        records.append({"messages": messages})
    return records


def _texts(records: Iterable[dict]) -> Iterable[str]:
    for r in records:
        for m in r.get("messages", []):
            yield m["content"]


def make_tokenizer(records: list[dict], out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE tokenizer on the records' text (deterministic) and write
    ``tokenizer.json`` + ``tokenizer_config.json`` (ChatML special tokens, eos ``<|im_end|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_texts(records)), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
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


def prepare(out: Path, n: int = 2000, seed: int = 0) -> tuple[Path, Path]:
    """Write the demo data (``out/data/chat.jsonl``) and tokenizer (``out/tokenizer``)."""
    records = synth_conversations(n, seed=seed)
    data = write_jsonl(records, out / "data" / "chat.jsonl")
    tok = make_tokenizer(records, out / "tokenizer")
    return data.parent, tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pyfast_tune.demo",
        description="Run pyfast-tune end to end on generated data (no download).",
    )
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out)")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=1024)
    args = p.parse_args(argv)
    from pyfast_tune.cli import main as cli

    out = Path(args.out)
    data, tok = prepare(out, n=args.samples)
    print(f"demo: {args.samples} generated chats in {data}, tokenizer in {tok}")
    return cli(
        [
            "pack",
            "--in",
            str(data),
            "--out",
            str(out / "packed"),
            "--tokenizer",
            str(tok),
            "--max-length",
            str(args.max_length),
            "--template",
            "internlm2_chat",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
