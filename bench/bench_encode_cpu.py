"""The encode phase of ``pyfast-tune pack`` in CPU seconds, for builds side by side.

    python bench/bench_encode_cpu.py [--chat FILE --tokenizer-dir DIR --template NAME]
        [--threads 1] [--reps 3] [--build before=/path/to/old/checkout --build after=.]

On a shared machine wall times move with the neighbours' load; the kernel's CPU accounting of
a child process moves much less. Each build packs the corpus and, in the same alternation, its
first 20 records; the encode phase is estimated as the difference of the two processes' CPU
seconds (start-up, tokenizer load and most of the write cancel) over the difference of their
tokens: M tokens per CPU second, i.e. per core on any thread count. Also printed: whole-process CPU
seconds, the engine's load time, the start-up before the engine (wall minus the engine's
seconds) and the whole process's tokens per wall second, and a digest of the packed files
(builds that encode alike write the same bytes). ``--build NAME=PATH`` puts PATH first on
PYTHONPATH (a checkout with its own built ``pyfast_tune/_packer*.so``); by default the
current checkout alone. Without ``--chat``: the benchmark chat corpus and tokenizer of
bench/_corpus.py (real shared data, else generated), ``qwen_chat``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _corpus import bench_data

M = 1e6


def pack(pythonpath: str | None, data: Path, tok: Path, template: str, threads: int) -> dict:
    """One whole ``pyfast-tune pack`` process: CPU and wall seconds, statistics, digest. Run
    with bytecode caches as after ``pip install``: a ``PYTHONDONTWRITEBYTECODE`` in this
    environment is not passed on (every start would compile every module again)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory() as d:
        cmd = [
            sys.executable, "-P", "-c", "import sys; from pyfast_tune.cli import main; sys.exit(main())",
            "pack", str(data), "--out", f"{d}/p", "--tokenizer", str(tok), "--template", template,
            "--max-length", "4096", "--threads", str(threads), "--tokenizer-backend", "fast",
            "--json", "--quiet",
        ]  # fmt: skip
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        wall = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        digest = hashlib.sha256()
        for f in sorted(Path(f"{d}/p").iterdir()):
            digest.update(f.name.encode() + f.read_bytes())
    stats = json.JSONDecoder().raw_decode(out[out.index("{") :])[0]
    return {
        "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "wall": wall,
        "tokens": stats["tokens"] + stats["truncated_tokens"] + stats["dropped_tokens"],
        "load": stats["load_seconds"],
        "start": wall - stats["seconds"],
        "digest": digest.hexdigest()[:12],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chat", type=Path, help="openai-messages JSONL (default: bench corpus)")
    ap.add_argument("--tokenizer-dir", type=Path, help="with --chat: the tokenizer")
    ap.add_argument("--template", help="default: llama3_chat with --chat, else qwen_chat")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--build", action="append", default=[], help="NAME=PYTHONPATH, repeatable")
    args = ap.parse_args()
    if args.chat:
        if not args.tokenizer_dir:
            ap.error("--chat needs --tokenizer-dir")
        data, tok, template = args.chat, args.tokenizer_dir, args.template or "llama3_chat"
    else:
        bd = bench_data()
        print(bd.label)
        data, tok, template = bd.chat, bd.tokenizer, args.template or "qwen_chat"
    builds = dict(b.split("=", 1) for b in args.build) or {"this checkout": ""}
    for name, path in builds.items():  # `-P`: the current directory does not shadow PYTHONPATH
        env = dict(os.environ, **({"PYTHONPATH": path} if path else {}))
        so = subprocess.run(
            [sys.executable, "-P", "-c", "import pyfast_tune._packer as p; print(p.__file__)"],
            check=True, capture_output=True, text=True, env=env,
        ).stdout.strip()  # fmt: skip
        print(f"{name}: {so}")
    with tempfile.TemporaryDirectory() as d:
        head = Path(d) / f"head{data.suffix}"
        with data.open() as src, head.open("w") as dst:
            for _, line in zip(range(20), src):
                dst.write(line)
        for path in builds.values():  # warm: page cache, compiled tokenizer cache, bytecode
            pack(path or None, head, tok, template, args.threads)
        runs = {name: {"full": [], "head": []} for name in builds}
        for _ in range(args.reps):
            for name, path in builds.items():
                runs[name]["head"].append(pack(path or None, head, tok, template, args.threads))
                runs[name]["full"].append(pack(path or None, data, tok, template, args.threads))
    load = os.getloadavg()
    print(f"{data} with {tok} ({template}), --threads {args.threads}, best of {args.reps}; "
          f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    for name, r in runs.items():
        full = min(r["full"], key=lambda x: x["cpu"])
        small = min(r["head"], key=lambda x: x["cpu"])
        # CPU seconds add up over threads: tokens per CPU second is already per core.
        encode = (full["tokens"] - small["tokens"]) / (full["cpu"] - small["cpu"])
        print(
            f"{name}: {full['tokens']} tokens, digest {full['digest']}; encode phase "
            f"{encode / M:.2f} M tok/s per core (CPU time); whole process "
            f"{full['cpu']:.3f} CPU s, {min(x['wall'] for x in r['full']):.3f} s wall "
            f"({full['tokens'] / min(x['wall'] for x in r['full']) / M:.2f} M tok/s); "
            f"engine load {min(x['load'] for x in r['full']):.3f} s, start-up "
            f"{min(x['start'] for x in r['full']):.3f} s (wall)"
        )


if __name__ == "__main__":
    main()
