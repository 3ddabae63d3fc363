"""Tokenizer-bound packing speed: the phases of a whole ``pyfast-tune pack`` process, and our
encoder's first and later passes beside tiktoken (and fastokens, gigatoken when installed) on
the same texts, per core, for every tokenizer of the benchmark data.

    pytest bench/bench_tokenize.py -s          # or
    python bench/bench_tokenize.py [--repeat 3] [--threads 2] [--records N] [--tokenizers smollm2]

Data (bench/_corpus.py, printed first): with ../shared/data, the four shared tokenizers
(Qwen3, SmolLM2, Mistral v0.3, DeepSeek-V3) on chitchat.jsonl and pydoc.jsonl; without it
(or with PYFAST_TUNE_SHARED_DATA=/nonexistent), generated chats and documents of realistic
lengths and a byte-level BPE trained on them (vocab 49,152 behind Llama 3's split regex: the
fast path and tiktoken both apply). For each tokenizer and corpus (chat: openai messages with
the qwen_chat template, max_length 4096; docs: pretraining text, max_length 32768):

- ``process``: the whole CLI run as a subprocess, ``--tokenizer-backend fast``, split into its
  phases: ``start`` (interpreter, imports, argument parsing: the wall time the engine does not
  report; run with the package's bytecode caches, as after ``pip install``: a
  ``PYTHONDONTWRITEBYTECODE`` in the environment is not passed on, else every start compiles
  every module again), ``load`` (tokenizer, template, input listing), ``encode`` (read, JSON, template,
  tokenize, stage: what scales with the data) and ``write`` (plan, write, hash, commit);
  tokens = every token encoded (written + truncated + dropped). ``whole`` is tokens over the
  process's wall time;
- ``ours first``: the encode phase per core (tokens / encode seconds / threads) of that run,
  from a cold start (the encoder's per-thread memo of pieces starts empty);
- ``ours later``: a second copy of the corpus packed in the same run (two files, same bytes):
  the extra encode seconds over the extra tokens, with every thread's memo already warm;
- ``hf``: the same run with ``--tokenizer-backend hf``; the two packed directories must be
  byte-identical (``ids identical``);
- ``encode_batch``: Hugging Face ``tokenizers`` on the message/document texts, tokenizer loaded;
- ``tiktoken`` / ``fastokens`` / ``gigatoken`` (bench/_encoders.py): built from the same
  tokenizer.json, ``first`` = their first batch over the texts, ``later`` = the best of the
  following ones, per core (same thread count); the share of texts whose ids differ from
  Hugging Face's is printed. A missing package, or a tokenizer it cannot express, is a note.

The other encoders' figures are pure encoding of texts already in memory; ours (``first`` and
``later``) also read, parse and template the JSONL. Best of ``--repeat`` runs (first passes:
each run is a fresh process); the machine and its load are printed with the figures.
``--records N`` (or BENCH_RECORDS) takes the first N records of each corpus, for a quick run.
``--chat FILE --tokenizer-dir DIR [--template NAME]`` runs one chat corpus (openai
``messages`` records) with one tokenizer instead, e.g. ShareGPT with Llama 3's tokenizer.
Each process's CPU seconds (user + sys, from the kernel's accounting of the child) are
printed beside its wall time: on a shared machine they are the steadier figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from _corpus import BenchData, bench_data
from _encoders import ENCODERS

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    # (corpus of bench_data(), template, max_length)
    ("chat", "qwen_chat", 4096),
    ("docs", "none", 32768),
]
TARGET = 3.0  # pack --tokenizer-backend fast over hf, end to end
M = 1e6


def texts_of(path: Path) -> list[str]:
    out = []
    # Lines end at "\n" only: str.splitlines() would also cut at U+2028 inside JSON strings.
    for line in path.read_text().split("\n"):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "messages" in rec:
            out.extend(m["content"] for m in rec["messages"])
        else:
            out.append(rec["text"])
    return out


def pack_process(
    data: Path, tok: Path, template: str, max_length: int, backend: str, threads: int
) -> dict:
    """One whole ``pyfast-tune pack`` process: its statistics, wall time and output digest."""
    exe = Path(sys.executable).with_name("pyfast-tune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pyfast_tune.cli"]
    cmd += [
        "pack", str(data), "--out", "OUT", "--tokenizer", str(tok), "--template", template,
        "--max-length", str(max_length), "--threads", str(threads),
        "--tokenizer-backend", backend, "--json", "--quiet",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        cmd[cmd.index("OUT")] = f"{d}/p"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        digest = hashlib.sha256()
        for f in sorted(Path(f"{d}/p").iterdir()):
            digest.update(f.name.encode() + f.read_bytes())
    stats = json.JSONDecoder().raw_decode(out[out.index("{") :])[0]
    stats["wall"] = wall
    stats["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stats["start"] = max(wall - stats["seconds"], 0.0)
    stats["encoded"] = stats["tokens"] + stats["truncated_tokens"] + stats["dropped_tokens"]
    stats["digest"] = digest.hexdigest()
    return stats


def best_run(fn, repeat: int) -> dict:
    """The run with the shortest wall time of ``repeat``."""
    return min((fn() for _ in range(repeat)), key=lambda s: s["wall"])


def passes(encode, repeat: int) -> tuple[float, float, list]:
    """(first call's seconds, best later call's seconds, ids of the first call)."""
    t = time.perf_counter()
    ids = encode()
    first = time.perf_counter() - t
    later = []
    for _ in range(max(repeat, 2) - 1):
        t = time.perf_counter()
        encode()
        later.append(time.perf_counter() - t)
    return first, min(later), ids


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


def twice(path: Path, tmp: Path) -> Path:
    """A directory holding two copies of ``path``: packing it encodes the corpus twice."""
    d = tmp / f"twice-{path.stem}"
    d.mkdir(exist_ok=True)
    for name in ("a", "b"):
        shutil.copyfile(path, d / f"{name}{path.suffix}")
    return d


def run(
    repeat: int = 3,
    threads: int = 2,
    tokenizers: list[str] | None = None,
    records: int | None = None,
    data: BenchData | None = None,
    cases: list[tuple[str, str, int]] | None = None,
) -> list[dict]:
    from tokenizers import Tokenizer

    data = data or bench_data()
    cases = cases or CASES
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
        others = []
        for name, build, batch in ENCODERS:
            t0 = time.perf_counter()
            enc = build(tok_dir)
            others.append((name, enc, batch, time.perf_counter() - t0))
        for kind, template, max_length in cases:
            path = corpus_file(data, kind, records, tmp)
            texts = texts_of(path)
            row = {"tokenizer": tok_name, "data": path.name, "threads": threads, "notes": []}
            opts = (tok_dir, template, max_length)
            proc = best_run(partial(pack_process, path, *opts, "fast", threads), repeat)
            both_dir = twice(path, tmp)
            both = best_run(partial(pack_process, both_dir, *opts, "fast", threads), repeat)
            hf_proc = pack_process(path, *opts, "hf", threads)
            n = proc["encoded"]
            row.update(
                tokens=n,
                start=proc["start"],
                load=proc["load_seconds"],
                encode=proc["encode_seconds"],
                write=proc["write_seconds"],
                whole=n / proc["wall"],
                cpu=proc["cpu"],
                ours_first=n / proc["encode_seconds"] / threads,
                pack_hf=n / hf_proc["wall"],
                pack_fast=n / proc["wall"],
                identical=proc["digest"] == hf_proc["digest"],
            )
            extra = both["encode_seconds"] - proc["encode_seconds"]
            # Under load the difference of two noisy times can vanish: no figure then.
            row["ours_later"] = (both["encoded"] - n) / extra / threads if extra > 0 else None
            hf_batch = partial(hf.encode_batch, texts, add_special_tokens=False)
            secs = min(_timed(hf_batch) for _ in range(repeat))
            hf_ids = [e.ids for e in hf_batch()]
            row["encode_batch"] = sum(map(len, hf_ids)) / secs / threads
            for name, enc, batch, build_s in others:
                if isinstance(enc, str):
                    row["notes"].append(f"{name}: {enc}")
                    continue
                first, later, ids = passes(partial(batch, enc, texts, threads), repeat)
                total = sum(map(len, ids))
                row[name] = {
                    "first": total / first / threads,
                    "later": total / later / threads,
                    "build_s": build_s,
                    "differs": sum(a != b for a, b in zip(hf_ids, ids)) / len(texts),
                }
            rows.append(row)
            print_row(row)
    shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows)
    return rows


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def print_row(r: dict) -> None:
    later = f"{r['ours_later'] / M:5.2f}" if r["ours_later"] else "  n/a"
    print(
        f"{r['tokenizer']:8s} {r['data']:14s} {r['tokens'] / M:.2f} M tokens | process: start "
        f"{r['start']:.3f} s, load {r['load']:.3f} s, encode {r['encode']:.3f} s, write "
        f"{r['write']:.3f} s; whole {r['whole'] / M:5.2f} M tok/s on {r['threads']} threads, "
        f"{r['cpu']:.3f} CPU s",
        flush=True,
    )
    line = (
        f"    per core, M tok/s: ours first {r['ours_first'] / M:5.2f}, later {later} | "
        f"HF encode_batch {r['encode_batch'] / M:5.2f}"
    )
    for name, _, _ in ENCODERS:
        if name in r:
            e = r[name]
            line += (
                f" | {name} first {e['first'] / M:5.2f}, later {e['later'] / M:5.2f} "
                f"(build {e['build_s']:.2f} s, ids differ from HF on {100 * e['differs']:.2f}% "
                f"of texts)"
            )
    print(line)
    ratio = r["pack_fast"] / r["pack_hf"]
    print(
        f"    pack fast/hf {ratio:4.2f}x (target {TARGET:.0f}x "
        f"{'met' if ratio >= TARGET else 'MISSED'}), ids "
        f"{'identical' if r['identical'] else 'DIFFER'}"
        + "".join(f"\n    note: {n}" for n in r["notes"]),
        flush=True,
    )


def print_table(rows: list[dict]) -> None:
    """The rows as the README's Markdown table (M tok/s per core unless marked)."""
    names = [n for n, _, _ in ENCODERS if any(n in r for r in rows)]
    head = (
        "| tokenizer | data | start s | load s | encode s | write s | whole (all threads) "
        "| ours first | ours later | HF encode_batch |"
        + "".join(f" {n} first | {n} later |" for n in names)
    )
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        later = f"{r['ours_later'] / M:.2f}" if r["ours_later"] else "n/a"
        cells = [
            r["tokenizer"], r["data"], f"{r['start']:.3f}", f"{r['load']:.3f}",
            f"{r['encode']:.3f}", f"{r['write']:.3f}", f"{r['whole'] / M:.2f}",
            f"{r['ours_first'] / M:.2f}", later, f"{r['encode_batch'] / M:.2f}",
        ]  # fmt: skip
        for n in names:
            e = r.get(n)
            cells += [f"{e['first'] / M:.2f}", f"{e['later'] / M:.2f}"] if e else ["-", "-"]
        print("| " + " | ".join(cells) + " |")


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
    ap.add_argument("--chat", type=Path, help="one chat corpus (openai messages JSONL) instead")
    ap.add_argument("--tokenizer-dir", type=Path, help="with --chat: the tokenizer to use")
    ap.add_argument("--template", default="llama3_chat", help="with --chat (default llama3_chat)")
    args = ap.parse_args()
    data = None
    if args.chat:
        if not args.tokenizer_dir:
            ap.error("--chat needs --tokenizer-dir")
        name = args.tokenizer_dir.name
        data = BenchData(
            chat=args.chat, docs=args.chat, tokenizer=args.tokenizer_dir,
            tokenizers={name: args.tokenizer_dir}, real=True,
            label=f"data: {args.chat} with tokenizer {args.tokenizer_dir}",
        )  # fmt: skip
    cases = [("chat", args.template, 4096)] if args.chat else None
    run(args.repeat, args.threads, args.tokenizers, args.records, data, cases)
