"""JSON array vs JSONL: peak memory of `pyfast-tune pack` on the same records both ways.

Run:  .venv/bin/python bench/bench_json_array.py [--mib 512] [--zst]

Generates alpaca-style conversations (as exporters write them: one JSON array, indented) of
about --mib MiB, and the JSONL of the same records; packs each in a child process and reads
the child's own peak RSS from outside it (`_child.run_child`: a small launcher's wait4, so
the figure cannot include this process's pages). Prints both, their ratio, the file size, and whether the packed
bytes are identical (every output file but meta.json, which names and hashes the inputs).
Tokenizer: one trained here on generated text (pyfast_tune.demo), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

try:
    import pyfast_tune  # noqa: F401
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _child import WORDS, MiB, run_child  # noqa: E402


def gen(jsonl: Path, array: Path, size: int, seed: int = 0) -> int:
    """Alpaca records of 20..1500 words, about `size` bytes of JSONL, written both ways."""
    rng = random.Random(seed)
    n, written = 0, 0
    with open(jsonl, "w") as fl, open(array, "w") as fa:
        fa.write("[\n")
        while written < size:
            rec = {
                "instruction": " ".join(rng.choices(WORDS, k=rng.randint(5, 60))),
                "input": " ".join(rng.choices(WORDS, k=rng.randint(0, 40))),
                "output": " ".join(rng.choices(WORDS, k=rng.randint(20, 1500))),
            }
            line = json.dumps(rec)
            fl.write(line + "\n")
            fa.write((",\n" if n else "") + json.dumps(rec, indent=2))
            written += len(line) + 1
            n += 1
        fa.write("\n]\n")
    return n


def compress(path: Path) -> Path:
    import zstandard

    out = path.with_name(path.name + ".zst")
    with open(path, "rb") as src, open(out, "wb") as dst:
        zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
    path.unlink()
    return out


def packed_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "meta.json"}


def main(mib: int = 512, zst: bool = False, threads: int | None = None) -> dict:
    from pyfast_tune.demo import make_tokenizer, synth_conversations

    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)")
    with tempfile.TemporaryDirectory(prefix="bench-array-") as tmp:
        tmp = Path(tmp)
        tok = tmp / "tok"
        make_tokenizer(synth_conversations(300, seed=1), tok)
        jsonl, array = tmp / "a" / "data.jsonl", tmp / "b" / "data.json"
        jsonl.parent.mkdir()
        array.parent.mkdir()
        t = time.perf_counter()
        n = gen(jsonl, array, mib * MiB)
        if zst:
            jsonl, array = compress(jsonl), compress(array)
        print(f"generated {n} alpaca records in {time.perf_counter() - t:.1f} s: JSONL "
              f"{jsonl.stat().st_size / MiB:.0f} MiB, JSON array "
              f"{array.stat().st_size / MiB:.0f} MiB{' (zstd)' if zst else ''}")  # fmt: skip
        common = ["--tokenizer", str(tok), "--max-length", "4096", "--format", "alpaca",
                  "--template", "qwen_chat", "--quiet"]  # fmt: skip
        common += ["--threads", str(threads)] if threads else []
        res = {}
        for name, src in (("jsonl", jsonl), ("array", array)):
            dt, rss, _, _ = run_child(["pack", str(src), "--out", str(tmp / f"p_{name}"), *common])
            res[name] = (dt, rss)
            print(f"{name:>5}: peak RSS {rss / MiB:7.1f} MiB, {dt:6.1f} s "
                  f"({src.stat().st_size / MiB / dt:.1f} MiB/s of input)")  # fmt: skip
        same = packed_bytes(tmp / "p_jsonl") == packed_bytes(tmp / "p_array")
        ratio = res["array"][1] / res["jsonl"][1]
        print(f"peak RSS array / JSONL: {ratio:.2f}; array input / array peak RSS: "
              f"{array.stat().st_size / res['array'][1]:.1f}x; packed bytes identical: {same}")  # fmt: skip
        return {"ratio": ratio, "identical": same, "array_rss": res["array"][1],
                "jsonl_rss": res["jsonl"][1], "array_bytes": array.stat().st_size}  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512, help="size of the JSONL (the array is larger)")
    ap.add_argument("--zst", action="store_true", help="compress both inputs with zstd")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    out = main(a.mib, a.zst, a.threads)
    raise SystemExit(0 if out["identical"] else 1)
