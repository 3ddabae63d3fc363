"""A tiny Llama-architecture model built from a config (never downloaded), for tests and benches.

>>> make_tiny_llama("tiny/", "../shared/data/tokenizers/smollm2")  # doctest: +SKIP
PosixPath('tiny')
"""

from __future__ import annotations

import json
from pathlib import Path


def tokenizer_vocab_size(tokenizer_dir: str | Path) -> int:
    """Number of ids a model needs for this tokenizer (vocab + added tokens)."""
    data = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


def make_tiny_llama(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    init_std: float = 0.02,
    tie_word_embeddings: bool = True,
) -> Path:
    """Save a randomly initialised LlamaForCausalLM (and the tokenizer files) at ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyfast_tune.trainer.checkpoint import copy_tokenizer_files

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer_vocab_size(tokenizer_dir),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        use_cache=False,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
    )
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(tokenizer_dir, out)
    return out


def trimmed_conversations(src: str | Path, dst: str | Path, records: int, turns: int) -> Path:
    """The first ``records`` OpenAI-style conversations of ``src`` cut to ``turns`` messages.

    Real chats, short enough that a tiny model trains several samples per pack in seconds.
    """
    out = Path(dst)
    with open(src) as fin, open(out, "w") as fout:
        for _, line in zip(range(records), fin):
            rec = json.loads(line)
            rec["messages"] = rec["messages"][:turns]
            fout.write(json.dumps(rec) + "\n")
    return out


def preference_pairs(src: str | Path, dst: str | Path, records: int, max_words: int = 24,
                     seed: int = 0) -> Path:  # fmt: skip
    """TRL conversational preference pairs made from the OpenAI-style chats of ``src``: the
    first user turn as the prompt, its answer (cut to ``max_words`` words) as ``chosen`` and
    another chat's answer as ``rejected`` — pairs a tiny model can learn to tell apart."""
    import random

    chats = []
    with open(src) as fin:
        for _, line in zip(range(records), fin):
            msgs = json.loads(line)["messages"]
            cut = " ".join(msgs[1]["content"].split()[:max_words])
            chats.append((msgs[0], cut))
    rng = random.Random(seed)
    out = Path(dst)
    with open(out, "w") as fout:
        for i, (question, answer) in enumerate(chats):
            j = rng.randrange(len(chats) - 1)
            other = chats[j + (j >= i)][1]
            rec = {"prompt": [question], "chosen": [{"role": "assistant", "content": answer}],
                   "rejected": [{"role": "assistant", "content": other}]}  # fmt: skip
            fout.write(json.dumps(rec) + "\n")
    return out
