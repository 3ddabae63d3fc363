"""Pack throughput against the two baselines of the foundation issue, measured in one run:

* a pure-Python pipeline doing the same work with Hugging Face `tokenizers` (XTuner's
  semantics: map_fn → template_map_fn → per-piece encode → greedy packing of whole samples);
* raw `tokenizers` `encode_batch` of the same rendered texts (all cores) — the tokenizer's own
  speed, the bound an engine that is tokenizer-bound should approach.

    pytest bench/bench_pack.py -s          # or: python bench/bench_pack.py

Needs ../shared/data (chitchat.jsonl, pydoc.jsonl, tokenizers/); skips without it.
"""

from __future__ import annotations

import bisect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))

from xtuner_ref import RefTokenizer, reference_samples  # noqa: E402

from pyfast_tune.data import pack  # noqa: E402

CASES = [
    # (name, file, format, template, max_length)
    ("chitchat", "chitchat.jsonl", "openai", "qwen_chat", 4096),
    ("pydoc", "pydoc.jsonl", "pretrain", "none", 4096),
]


def python_pipeline(records, fmt, template, tok_dir, max_length):
    """The same work in Python: encode like XTuner, then best-fit-decreasing of whole samples."""
    samples = reference_samples(records, fmt, template, RefTokenizer(tok_dir), max_length)
    lengths = sorted((len(ids) for _, ids, _ in samples), reverse=True)
    rooms: list[int] = []  # sorted remaining capacities of open packs
    packs = 0
    for n in lengths:
        i = bisect.bisect_left(rooms, n)
        if i == len(rooms):
            packs += 1
            left = max_length - n
        else:
            left = rooms.pop(i) - n
        if left:
            bisect.insort(rooms, left)
    return sum(lengths), packs


def rendered_texts(records, fmt):
    """One string per sample: what the tokenizer has to read."""
    texts = []
    for r in records:
        if fmt == "pretrain":
            texts.append(r["text"].strip())
        else:
            texts.append("".join(m["content"] for m in r["messages"]))
    return texts


def run_case(name, fname, fmt, template, max_length, tokenizer="smollm2", threads=None):
    tok_dir = SHARED / "tokenizers" / tokenizer
    path = SHARED / fname
    records = [json.loads(line) for line in path.open()]
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    texts = rendered_texts(records, fmt)
    hf.encode_batch(texts[:50], add_special_tokens=False)  # warm up the thread pool
    t0 = time.perf_counter()
    raw_tokens = sum(len(e.ids) for e in hf.encode_batch(texts, add_special_tokens=False))
    t_raw = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        best = None
        for _ in range(3):
            t0 = time.perf_counter()
            stats = pack(
                path,
                Path(tmp) / "p",
                tokenizer=tok_dir,
                max_length=max_length,
                format=fmt,
                template=template,
                threads=threads,
            )
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)

    t0 = time.perf_counter()
    py_tokens, py_packs = python_pipeline(records, fmt, template, tok_dir, max_length)
    t_py = time.perf_counter() - t0
    assert py_tokens == stats.tokens, "the Python pipeline must do the same work"

    # Throughput counts every token encoded (kept, truncated away, or in dropped samples):
    # that is the work encode_batch is timed on too.
    encoded = stats.tokens + stats.truncated_tokens + stats.dropped_tokens
    ours = encoded / best
    raw = raw_tokens / t_raw
    py = encoded / t_py
    print(
        f"\n[{name} / {tokenizer}, max_length {max_length}, {os.cpu_count()} cores] "
        f"pyfast-tune pack {ours / 1e6:.2f} M tok/s ({best:.2f} s end to end, {encoded} tokens "
        f"encoded, {stats.tokens} kept) | "
        f"raw encode_batch {raw / 1e6:.2f} M tok/s | pure-Python pipeline {py / 1e6:.3f} M tok/s\n"
        f"  ratio vs encode_batch {ours / raw:.2f}x, vs Python pipeline {ours / py:.1f}x; "
        f"fill {stats.fill:.4%} ({stats.packs} packs; Python BFD {py_packs}), "
        f"split samples {stats.split_samples}, truncated {stats.truncated_samples}"
    )
    return {
        "ours": ours,
        "raw": raw,
        "python": py,
        "fill": stats.fill,
        "split": stats.split_samples,
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bench_pack(case):
    if not (SHARED / case[1]).exists():
        pytest.skip(f"../shared/data/{case[1]} absent: benchmark needs the shared real data")
    r = run_case(*case)
    assert r["split"] == 0


if __name__ == "__main__":
    for case in CASES:
        run_case(*case)
