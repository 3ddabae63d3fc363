"""Scale benchmark: peak memory while packing inputs several times larger than a memory budget,
and throughput of reading pre-tokenized InternEVO `.bin` data.

Run:  .venv/bin/python bench/bench_scale.py [--budget-mib 128 --factor 4 --bin-mib 256]
  or: .venv/bin/python -m pytest bench/bench_scale.py -s

1. Streaming: a generated JSONL pretraining corpus of factor × budget MiB (and its .zst) is
   packed by `pyfast-tune pack` in a fresh process started by a small launcher; its peak RSS
   (ru_maxrss from wait4 in the launcher: the whole process, interpreter, numpy, tokenizer,
   buffers) must stay under the budget. It cannot depend on what ran before in this process.
2. `.bin` reading: a generated `.bin` + `.bin.meta` of ~bin-mib MiB is packed (tokens/s, MB/s,
   peak RSS), and read by the engine against a pure-Python reader doing XTuner's
   JsonlDataset work (seek to each offset, json.loads, abs/labels) on the same rows, both
   with one warm-up and the median of three runs.
3. Steady state: >= --steady-mib (default 1024 MiB) of pretraining JSONL packed with the
   benchmark data's default tokenizer (bench/_corpus.py: SmolLM2 on ../shared/data, else the
   generated BPE), documents recombined from the paragraphs of its documents corpus (pydoc
   or the generated one) by a seeded sampler, so the words are real but no document repeats;
   the encode phase's tokens/s per core (tokens / encode_seconds / threads), where the
   warm-up of the encoder's memo is a vanishing share.
Tokenizer of 1 and 2: one trained here on generated text (pyfast_tune.demo), so nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import pyfast_tune  # noqa: F401
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _child import WORDS, MiB, run_child  # noqa: E402
from _corpus import bench_data  # noqa: E402


def gen_corpus(path: Path, size: int, seed: int = 0) -> int:
    """JSONL pretraining records ({"text"}) of 200..4000 characters, `size` bytes in all."""
    rng = random.Random(seed)
    written, n = 0, 0
    with open(path, "w") as f:
        while written < size:
            k = rng.randint(40, 800)
            line = json.dumps({"text": " ".join(rng.choices(WORDS, k=k))}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def gen_recombined(pool: Path, path: Path, size: int, seed: int = 2) -> int:
    """JSONL {"text"} documents of 5..120 paragraphs drawn (seeded) from the paragraphs of the
    documents in ``pool``, ``size`` bytes in all. Fast enough for gigabytes (joining strings),
    and the encoder sees real pieces in new contexts, never a repeated document."""
    paragraphs = [
        p
        for line in pool.read_text().splitlines()
        for p in json.loads(line)["text"].split("\n\n")
        if p.strip()
    ]
    rng = random.Random(seed)
    written, n = 0, 0
    with open(path, "w") as f:
        while written < size:
            doc = "\n\n".join(rng.choices(paragraphs, k=rng.randint(5, 120)))
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def gen_bin(path: Path, size: int, seed: int = 1) -> int:
    """InternEVO .bin lines {"tokens": [...]} (negative = no loss) and the .bin.meta."""
    rng = np.random.default_rng(seed)
    offsets, counts, written = [], [], 0
    with open(path, "wb") as f:
        while written < size:
            k = int(rng.integers(64, 2048))
            toks = rng.integers(1, 150_000, size=k)
            toks[: k // 3] *= -1
            line = ('{"tokens": [' + ", ".join(map(str, toks.tolist())) + "]}\n").encode()
            offsets.append(written)
            counts.append(k)
            f.write(line)
            written += len(line)
    with open(f"{path}.meta", "wb") as f:
        np.save(f, np.stack([offsets, counts], axis=1).astype(np.int64))
    return len(counts)


def timed(fn, warmup: int = 1, repeats: int = 3) -> tuple[float, object]:
    """Median seconds of `repeats` calls of `fn` after `warmup` untimed ones; its last result."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def python_bin_reader(path: Path) -> tuple[int, int]:
    """XTuner JsonlDataset's per-sample work, in Python: seek, readline, json, abs, labels.
    Returns (rows, tokens)."""
    meta = np.load(f"{path}.meta")
    n = 0
    with open(path, "rb") as f:
        for off, _ in meta:
            f.seek(int(off))
            toks = json.loads(f.readline())["tokens"]
            _ids = [abs(x) for x in toks]
            _labels = [x if x > 0 else -100 for x in toks]
            n += len(toks)
    return len(meta), n


def main(
    budget_mib: int = 128,
    factor: int = 4,
    bin_mib: int = 256,
    threads: int | None = None,
    steady_mib: int = 1024,
):
    from pyfast_tune.demo import make_tokenizer, synth_conversations

    print(
        f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared), python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        tok = tmp / "tok"
        make_tokenizer(synth_conversations(300, seed=1), tok)
        thr = ["--threads", str(threads)] if threads else []

        # 1. streaming under a memory budget
        budget = budget_mib * MiB
        corpus = tmp / "corpus" / "big.jsonl"
        corpus.parent.mkdir()
        t = time.perf_counter()
        n = gen_corpus(corpus, factor * budget)
        size = corpus.stat().st_size
        print(
            f"generated {size / MiB:.0f} MiB JSONL ({n} records) in {time.perf_counter() - t:.1f} s"
        )
        dt, rss, launcher, out = run_child(
            [
                "pack",
                str(corpus.parent),
                "--out",
                str(tmp / "p1"),
                "--tokenizer",
                str(tok),
                "--max-length",
                "4096",
                "--format",
                "pretrain",
                "--quiet",
                *thr,
            ]
        )
        print(out.strip())
        print(
            f"stream JSONL: input {size / MiB:.0f} MiB = {size / budget:.1f}x the "
            f"{budget_mib} MiB budget; peak RSS {rss / MiB:.1f} MiB (fresh process; the "
            f"launcher's own {launcher / MiB:.1f} MiB bounds what is not the packer's); "
            f"{dt:.1f} s, {size / MiB / dt:.1f} MiB/s"
        )
        ok = rss < budget
        print(f"  peak RSS under budget: {'yes' if ok else 'NO'}")

        # 2. .bin reading throughput
        b = tmp / "evo" / "data.bin"
        b.parent.mkdir()
        rows = gen_bin(b, bin_mib * MiB)
        bsize = b.stat().st_size
        dt, rss2, _, out = run_child(
            [
                "pack",
                str(b.parent),
                "--file-type",
                ".bin",
                "--out",
                str(tmp / "p2"),
                "--tokenizer",
                str(tok),
                "--max-length",
                "4096",
                "--quiet",
                "--json",
                *thr,
            ]
        )
        stats = json.loads(out[: out.rindex("}") + 1])
        toks = stats["tokens"]
        print(
            f".bin read+pack: {bsize / MiB:.0f} MiB, {rows} rows, {toks / 1e6:.1f} M tokens in "
            f"{dt:.2f} s (process wall, incl. interpreter start): {bsize / MiB / dt:.0f} MiB/s, "
            f"{toks / dt / 1e6:.2f} M tokens/s; engine {stats['tokens_per_second'] / 1e6:.2f} "
            f"M tokens/s; peak RSS {rss2 / MiB:.1f} MiB"
        )
        from pyfast_tune import _packer

        # The ratio's two sides do the same work on the same rows, with the same warm-up (which
        # also brings the file into the page cache) and repeats.
        rdt, (kept, rtoks) = timed(lambda: _packer.read_pretok(str(b), 0))
        pdt, (prows, ptoks) = timed(lambda: python_bin_reader(b))
        assert (kept, rtoks) == (prows, ptoks), "both readers must read the same rows"
        print(
            f".bin read only, 1 thread, median of 3 after 1 warm-up, {kept} rows, "
            f"{rtoks / 1e6:.1f} M tokens: engine (seek, parse, check against .meta) "
            f"{bsize / MiB / rdt:.0f} MiB/s, {rtoks / rdt / 1e6:.2f} M tokens/s | Python "
            f"JsonlDataset-style reader {ptoks / pdt / 1e6:.2f} M tokens/s | ratio "
            f"{pdt / rdt:.1f}x"
        )

        # 3. steady-state encoding, per core
        if steady_mib:
            steady_state(tmp, steady_mib, threads or os.cpu_count() or 1)
        return ok


def steady_state(tmp: Path, size_mib: int, threads: int) -> float:
    """Pack ``size_mib`` MiB of recombined documents; print and return the encode phase's
    tokens/s per core."""
    data = bench_data()
    corpus = tmp / "steady" / "docs.jsonl"
    corpus.parent.mkdir()
    t = time.perf_counter()
    n = gen_recombined(data.docs, corpus, size_mib * MiB)
    size = corpus.stat().st_size
    print(
        f"{data.label}\ngenerated {size / MiB:.0f} MiB ({n} documents) in "
        f"{time.perf_counter() - t:.1f} s from the paragraphs of {data.docs.name}"
    )
    dt, rss, _, out = run_child(
        [
            "pack",
            str(corpus),
            "--out",
            str(tmp / "p3"),
            "--tokenizer",
            str(data.tokenizer),
            "--format",
            "pretrain",
            "--max-length",
            "32768",
            "--threads",
            str(threads),
            "--quiet",
            "--json",
        ]  # fmt: skip
    )
    shutil.rmtree(tmp / "p3", ignore_errors=True)
    stats = json.loads(out[: out.rindex("}") + 1])
    toks = stats["tokens"] + stats["truncated_tokens"] + stats["dropped_tokens"]
    per_core = toks / stats["encode_seconds"] / threads
    print(
        f"steady state: {toks / 1e6:.0f} M tokens with {data.tokenizer.name}, {threads} threads: "
        f"encode phase {stats['encode_seconds']:.1f} s = {per_core / 1e6:.2f} M tokens/s per "
        f"core; whole process {dt:.1f} s ({toks / dt / 1e6:.2f} M tokens/s, load "
        f"{stats['load_seconds']:.2f} s, write {stats['write_seconds']:.1f} s); peak RSS "
        f"{rss / MiB:.0f} MiB"
    )
    return per_core


def test_bench_scale():
    assert main(
        budget_mib=int(os.environ.get("BENCH_BUDGET_MIB", 128)),
        factor=int(os.environ.get("BENCH_FACTOR", 4)),
        bin_mib=int(os.environ.get("BENCH_BIN_MIB", 256)),
        steady_mib=int(os.environ.get("BENCH_STEADY_MIB", 1024)),
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-mib", type=int, default=128)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--bin-mib", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--steady-mib", type=int, default=1024, help="steady-state corpus size (0: skip)"
    )
    a = ap.parse_args()
    sys.exit(0 if main(a.budget_mib, a.factor, a.bin_mib, a.threads, a.steady_mib) else 1)
