"""Tokenizer-bound packing speed: end-to-end ``pyfast-tune pack`` tokens/s against the raw
encoders on the same texts, for every tokenizer of the benchmark data.

    pytest bench/bench_tokenize.py -s          # or
    python bench/bench_tokenize.py [--repeat 3] [--threads 2] [--records N]

Data (bench/_corpus.py, printed first): with ../shared/data, the four shared tokenizers
(Qwen3, SmolLM2, Mistral v0.3, DeepSeek-V3) on chitchat.jsonl and pydoc.jsonl; without it,
generated chats and documents of realistic lengths and a byte-level BPE trained on them
(vocab 49,152 behind Llama 3's split regex: the fast path and tiktoken both apply).
For each tokenizer and corpus (chat: openai messages with the qwen_chat template, max_length
4096; docs: pretraining text, max_length 32768) it measures:

- ``pack fast`` / ``pack hf``: the whole CLI run (interpreter start, tokenizer load, read, JSON,
  template, encode, pack, write, commit) as a subprocess, ``--tokenizer-backend fast|hf``;
  tokens = every token encoded (written + truncated + dropped), over the wall time;
  ``encode phase``: the same tokens over the run's own ``encode_seconds`` (read, JSON, template,
  tokenize, stage: what scales with the data), and ``load``, the fixed cost of loading the
  tokenizer (Qwen3's 11 MB tokenizer.json takes ~0.3 s, most of a run on these small corpora);
  the two runs' packed directories are compared (``ids identical``), and ``fast/hf`` is checked
  against the target of 3x;
- ``encode_batch``: Hugging Face ``tokenizers`` on the message/document texts, all threads,
  tokenizer already loaded;
- ``tiktoken``: tiktoken's rank-based encoder built from the same vocabulary and pattern
  (``encode_ordinary_batch``, same thread count, added tokens ignored), when installed and the
  tokenizer is byte-level BPE behind one regex (Qwen3, SmolLM2). Its
  ids are not always Hugging Face's (the vocabularies list one merge per token, tiktoken merges
  any pair whose concatenation is a token); the share of texts that differ is printed, and so
  is the time to build the encoder from the vocabulary (not counted in its rate).

``--records N`` (or BENCH_RECORDS) takes the first N records of each corpus, for a quick run.

Best of ``--repeat`` runs each; the machine and its load are printed with the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from _corpus import BenchData, bench_data

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    # (corpus of bench_data(), template, max_length)
    ("chat", "qwen_chat", 4096),
    ("docs", "none", 32768),
]
TARGET = 3.0  # pack --tokenizer-backend fast over hf, end to end


def texts_of(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "messages" in rec:
            out.extend(m["content"] for m in rec["messages"])
        else:
            out.append(rec["text"])
    return out


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def pack_cli(
    data: Path, tok: Path, template: str, max_length: int, backend: str, threads: int
) -> dict:
    exe = Path(sys.executable).with_name("pyfast-tune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pyfast_tune.cli"]
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            cmd
            + [
                "pack",
                str(data),
                "--out",
                f"{d}/p",
                "--tokenizer",
                str(tok),
                "--template",
                template,
                "--max-length",
                str(max_length),
                "--threads",
                str(threads),
                "--tokenizer-backend",
                backend,
                "--json",
                "--quiet",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        digest = hashlib.sha256()
        for f in sorted(Path(f"{d}/p").iterdir()):
            digest.update(f.name.encode() + f.read_bytes())
    stats = json.JSONDecoder().raw_decode(out[out.index("{") :])[0]
    stats["digest"] = digest.hexdigest()
    return stats


def tiktoken_encoding(tok_json: Path):
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tok_json.read_text())
    pre = spec["pre_tokenizer"]
    steps = pre.get("pretokenizers", [pre])
    if [s["type"] for s in steps] not in (["ByteLevel"], ["Split", "ByteLevel"]):
        return None  # not byte-level BPE behind one regex: no tiktoken equivalent
    char_byte = {c: b for b, c in enumerate(_bytes_to_unicode())}
    ranks = {
        bytes(char_byte[c] for c in t): i
        for t, i in spec["model"]["vocab"].items()
        if all(c in char_byte for c in t)
    }
    split = next((s for s in steps if s["type"] == "Split"), None)
    pattern = (
        split["pattern"]["Regex"]
        if split
        else r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    )
    return tiktoken.Encoding(
        name=tok_json.parent.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
    )


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = {}, 0
    for b in range(256):
        if b in bs:
            cs[b] = chr(b)
        else:
            cs[b] = chr(256 + n)
            n += 1
    return [cs[b] for b in range(256)]


def conditions(threads: int) -> str:
    load = os.getloadavg()
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        "?",
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), load average {load[0]:.1f}/{load[1]:.1f}, "
        f"--threads {threads}"
    )


def corpus_file(data: BenchData, kind: str, records: int | None, tmp: Path) -> Path:
    """The corpus of that kind, or its first ``records`` lines copied into ``tmp``."""
    path = data.corpus(kind)
    if not records:
        return path
    head = tmp / path.name
    with path.open() as src, head.open("w") as dst:
        for _, line in zip(range(records), src):
            dst.write(line)
    return head


def run(
    repeat: int = 3,
    threads: int = 2,
    tokenizers: list[str] | None = None,
    records: int | None = None,
    data: BenchData | None = None,
) -> list[dict]:
    from tokenizers import Tokenizer

    data = data or bench_data()
    unknown = sorted(set(tokenizers or []) - set(data.tokenizers))
    if unknown:
        raise SystemExit(f"unknown tokenizer(s) {unknown}: this data has {list(data.tokenizers)}")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    print(f"\nbench_tokenize: best of {repeat}; {conditions(threads)}\n{data.label}")
    if records:
        print(f"first {records} records of each corpus")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    for tok_name in tokenizers or list(data.tokenizers):
        tok_dir = data.tokenizers[tok_name]
        hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        t0 = time.perf_counter()
        enc_tt = tiktoken_encoding(tok_dir / "tokenizer.json")
        tt_build = time.perf_counter() - t0
        for kind, template, max_length in CASES:
            path = corpus_file(data, kind, records, tmp)
            texts = texts_of(path)
            row = {"tokenizer": tok_name, "data": path.name}
            digests = set()
            for backend in ("fast", "hf"):
                secs, stats = best(
                    partial(pack_cli, path, tok_dir, template, max_length, backend, threads),
                    repeat if backend == "fast" else 1,
                )
                n = stats["tokens"] + stats["truncated_tokens"] + stats["dropped_tokens"]
                row[f"pack_{backend}"] = n / secs
                row[f"pack_{backend}_inproc"] = n / stats["seconds"]
                row[f"pack_{backend}_encode"] = n / max(stats.get("encode_seconds", 0.0), 1e-9)
                row[f"pack_{backend}_load_s"] = stats.get("load_seconds", 0.0)
                digests.add(stats["digest"])
            row["identical"] = len(digests) == 1
            secs, encs = best(partial(hf.encode_batch, texts, add_special_tokens=False), repeat)
            hf_ids = [e.ids for e in encs]
            row["encode_batch"] = sum(map(len, hf_ids)) / secs
            if enc_tt is not None:
                secs, tt_ids = best(
                    partial(enc_tt.encode_ordinary_batch, texts, num_threads=threads), repeat
                )
                row["tiktoken"] = sum(map(len, tt_ids)) / secs
                row["tiktoken_build_s"] = tt_build
                row["tiktoken_differs"] = sum(a != b for a, b in zip(hf_ids, tt_ids)) / len(texts)
            rows.append(row)
            print_row(row)
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def print_row(r: dict) -> None:
    m = 1e6
    line = (
        f"{r['tokenizer']:8s} {r['data']:14s} pack fast {r['pack_fast'] / m:5.2f} M tok/s "
        f"(in-process {r['pack_fast_inproc'] / m:5.2f}, encode phase "
        f"{r['pack_fast_encode'] / m:5.2f}, load {r['pack_fast_load_s']:.2f} s) | "
        f"pack hf {r['pack_hf'] / m:5.2f} | "
        f"encode_batch {r['encode_batch'] / m:5.2f}"
    )
    if "tiktoken" in r:
        line += (
            f" | tiktoken {r['tiktoken'] / m:5.2f} (build {r['tiktoken_build_s']:.2f} s, "
            f"ids differ from HF on {100 * r['tiktoken_differs']:.2f}% of texts)"
        )
    line += f" || fast/encode_batch {r['pack_fast'] / r['encode_batch']:4.2f}x"
    if "tiktoken" in r:
        line += (
            f", fast/tiktoken {r['pack_fast'] / r['tiktoken']:4.2f}x "
            f"(encode phase {r['pack_fast_encode'] / r['tiktoken']:4.2f}x)"
        )
    ratio = r["pack_fast"] / r["pack_hf"]
    line += (
        f", fast/hf {ratio:4.2f}x (target {TARGET:.0f}x {'met' if ratio >= TARGET else 'MISSED'})"
        f", ids {'identical' if r['identical'] else 'DIFFER'}"
    )
    print(line, flush=True)


def test_bench_tokenize():
    rows = run(
        repeat=int(os.environ.get("BENCH_REPEAT", "3")),
        records=int(os.environ.get("BENCH_RECORDS", "0")) or None,
    )
    for r in rows:
        assert r["identical"], f"fast and hf packed different bytes: {r}"
        assert r["pack_fast"] > r["pack_hf"], f"fast backend slower than hf: {r}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizers", nargs="+", help="names among the data's (default: all)")
    ap.add_argument("--records", type=int, help="first N records of each corpus (default: all)")
    args = ap.parse_args()
    run(args.repeat, args.threads, args.tokenizers, args.records)
