"""Distributed packing benchmark: one corpus packed by one ``pack``, by the Ray executor with 1
and 2 workers, and by ``pack --shard I/N`` + the serial ``merge-packs``; wall time, merge time
and its share, peak RSS per worker, and the merge plan's memory per sample.

Run:  .venv/bin/python bench/bench_distributed.py --gb 2.0 [--shards 4]
  or: BENCH_DIST_GB=2.0 .venv/bin/python -m pytest bench/bench_distributed.py -s

The corpus: the benchmark data's chats (bench/_corpus.py: chitchat on ../shared/data, else the
generated ones), written out again and again in seeded order into 8 JSONL files until it holds
``--gb`` GB; openai format, max_length 4096, the data's default tokenizer. Chats are short
(hundreds of tokens), so the corpus has many samples: the case where a plan is largest.

- ``pack``: the CLI in a fresh process; its peak RSS read from outside (bench/_child.py).
- Ray, W workers: a local Ray of W CPUs (``ray.init(num_cpus=W)``) runs ``--shards`` shards
  with ``threads = cores // W`` each, then the merge in ranges (plan here, one range per
  shard as Ray tasks, manifest last); merge time = plan + ranges + manifest (the stats'
  ``write_seconds``). Peak RSS per worker: every process of the Ray session sampled every
  0.2 s (workers are reused across tasks, so a worker's figure covers all its tasks).
- Serial: ``pack --shard i/N`` for each i (fresh processes, one after another), then
  ``merge-packs`` (fresh process): the merge one process does today, copying every token.
- Plan memory: the plan step alone (``merge_plan``) in a fresh process over the serial run's
  parts: its peak RSS over the RSS before it (VmHWM), per sample. Target: <= 32 B/sample.
Target: the merge <= 10% of end-to-end time. All outputs are checked byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import pyfast_tune  # noqa: F401
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _child import MiB, run_child  # noqa: E402
from _corpus import bench_data  # noqa: E402

FILES = 8


def make_corpus(src: Path, out: Path, size: int, seed: int = 0) -> int:
    """``FILES`` JSONL files under ``out`` of ~``size`` bytes in all, the lines of ``src`` in
    seeded orders; returns the number of records."""
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()]
    rng = random.Random(seed)
    out.mkdir(parents=True)
    per_file = size // FILES
    n = 0
    for k in range(FILES):
        written = 0
        with open(out / f"chats-{k:02d}.jsonl", "w") as f:
            while written < per_file:
                rng.shuffle(lines)
                for ln in lines:
                    f.write(ln + "\n")
                    written += len(ln) + 1
                    n += 1
                    if written >= per_file:
                        break
    return n


def _pack_args(corpus: Path, tok: Path) -> list[str]:
    return [str(corpus), "--tokenizer", str(tok), "--format", "openai", "--max-length", "4096",
            "--template", "default", "--quiet", "--json"]  # fmt: skip


def _stats(out: str) -> dict:
    return json.loads(out[out.index("{") : out.rindex("}") + 1])


def _digest(d: Path) -> str:
    h = hashlib.blake2b()
    for name in sorted(os.listdir(d)):
        with open(d / name, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


class RssSampler:
    """Peak RSS of every descendant process of this one (the Ray session's workers)."""

    def __init__(self, period: float = 0.2):
        import psutil

        self.psutil, self.period, self.peak = psutil, period, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self.psutil.Process()
        while not self.stop.is_set():
            for p in me.children(recursive=True):
                try:
                    name = " ".join(p.cmdline()[:3])[:60]
                    rss = p.memory_info().rss
                except (self.psutil.Error, OSError):
                    continue
                old = self.peak.get(p.pid, (0, name))
                self.peak[p.pid] = (max(old[0], rss), name)
            self.stop.wait(self.period)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def workers(self) -> list[int]:
        return sorted(
            (
                rss
                for rss, name in self.peak.values()
                if "default_worker" in name or "ray::" in name
            ),
            reverse=True,
        )


RAY_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {bench!r})
import ray
from bench_distributed import RssSampler
from pyfast_tune.data.executor import run_sharded
opts = json.loads({opts!r})
ray.init(num_cpus={workers}, log_to_driver=False, include_dashboard=False)
with RssSampler() as s:
    t = time.perf_counter()
    steps = {{}}
    stats = run_sharded(opts, {out!r}, "ray", {shards}, work_dir={work!r}, _merge_seconds=steps)
    dt = time.perf_counter() - t
ray.shutdown()
print(json.dumps({{"wall": dt, "stats": stats.__dict__, "workers": s.workers(), "steps": steps}}))
"""

PLAN_CHILD = r"""
import json, shutil, sys
def hwm():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
from pyfast_tune import _packer
import time
before = hwm()
t = time.perf_counter()
r = _packer.merge_plan({parts!r}, {out!r}, 1)
dt = time.perf_counter() - t
after = hwm()
shutil.rmtree(r["staging"])
print(json.dumps({{"before": before, "after": after, "seconds": dt}}))
"""


def plan_memory(parts: list[str], out: Path) -> dict:
    """The plan step alone in a fresh process: its VmHWM before and after, and seconds."""
    code = PLAN_CHILD.format(parts=parts, out=str(out))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-4000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_ray(corpus, tok, out, work, workers, shards, threads) -> dict:
    opts = {"inputs": [str(corpus)], "tokenizer": str(tok), "format": "openai",
            "max_length": 4096, "template": "default", "threads": threads}  # fmt: skip
    code = RAY_CHILD.format(bench=str(Path(__file__).parent), opts=json.dumps(opts),
                            workers=workers, out=str(out), shards=shards, work=str(work))  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ray run failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(gb: float, shards: int = 4, keep: bool = False) -> dict:
    data = bench_data()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench_dist.", dir=Path(__file__).resolve().parents[1]
                                / ".bench_cache"))  # fmt: skip
    results: dict = {}
    try:
        corpus = tmp / "corpus"
        t = time.perf_counter()
        records = make_corpus(data.chat, corpus, int(gb * 1e9))
        size = sum(f.stat().st_size for f in corpus.iterdir())
        print(f"{data.label}\ncorpus: {size / 1e9:.2f} GB, {records:,} chats in {FILES} files "
              f"({time.perf_counter() - t:.0f} s to write); {cores} cores; load "
              f"{os.getloadavg()[0]:.1f}")  # fmt: skip
        rows = []

        # 1. one pack
        dt, rss, _, out = run_child(["pack", *_pack_args(corpus, data.tokenizer), "--out",
                                     str(tmp / "one")])  # fmt: skip
        one = _stats(out)
        ref = _digest(tmp / "one")
        rows.append(("one pack", dt, one["write_seconds"], [rss]))
        print(f"one pack: {dt:.1f} s, {one['samples']:,} samples, {one['tokens'] / 1e6:.0f} M "
              f"tokens, write phase {one['write_seconds']:.1f} s, peak RSS {rss / MiB:.0f} MiB")  # fmt: skip
        shutil.rmtree(tmp / "one")

        # 2. Ray, 1 and 2 workers
        for w in (1, 2):
            r = run_ray(corpus, data.tokenizer, tmp / f"ray{w}", tmp / f"work{w}", w, shards,
                        max(1, cores // w))  # fmt: skip
            st = r["stats"]
            assert _digest(tmp / f"ray{w}") == ref, f"ray {w} workers: bytes differ"
            rows.append((f"Ray, {w} worker{'s' * (w > 1)}, {shards} shards", r["wall"],
                         st["write_seconds"], r["workers"]))  # fmt: skip
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in r["steps"].items())
            print(f"ray {w}: {r['wall']:.1f} s (shards {st['encode_seconds']:.1f} s, merge "
                  f"{st['write_seconds']:.1f} s: {steps}); worker peak RSS "
                  f"{[round(x / MiB) for x in r['workers']]} MiB")  # fmt: skip
            shutil.rmtree(tmp / f"ray{w}")
            shutil.rmtree(tmp / f"work{w}")

        # 3. shards + serial merge-packs
        t = time.perf_counter()
        shard_rss = []
        for i in range(shards):
            _, rss, _, _ = run_child(["pack", *_pack_args(corpus, data.tokenizer), "--out",
                                      str(tmp / f"part{i}"), "--shard", f"{i}/{shards}"])  # fmt: skip
            shard_rss.append(rss)
        enc = time.perf_counter() - t
        parts = [str(tmp / f"part{i}") for i in range(shards)]
        mdt, mrss, _, _ = run_child(["merge-packs", *parts, "--out", str(tmp / "serial"),
                                     "--quiet"])  # fmt: skip
        assert _digest(tmp / "serial") == ref, "merge-packs: bytes differ"
        rows.append((f"{shards} × pack --shard + merge-packs", enc + mdt, mdt, shard_rss + [mrss]))
        print(f"serial: shards {enc:.1f} s, merge-packs {mdt:.1f} s, peak RSS shards "
              f"{[round(x / MiB) for x in shard_rss]} MiB, merge {mrss / MiB:.0f} MiB")  # fmt: skip
        shutil.rmtree(tmp / "serial")

        # 4. the plan step's memory: over the start of its process, and per sample as the
        # slope between this run and a small one (the fixed part: buffers, allocator)
        m = plan_memory(parts, tmp / "planned")
        small = tmp / "small"
        make_corpus(data.chat, small, 5_000_000, seed=1)
        for i in range(shards):
            run_child(["pack", *_pack_args(small, data.tokenizer), "--out",
                       str(tmp / f"small{i}"), "--shard", f"{i}/{shards}"])  # fmt: skip
        small_parts = [str(tmp / f"small{i}") for i in range(shards)]
        ms = plan_memory(small_parts, tmp / "small_planned")
        n_small = sum(json.loads(Path(d, "part.json").read_text())["samples"] for d in small_parts)
        per_sample = (m["after"] - m["before"]) / one["samples"]
        slope = ((m["after"] - m["before"]) - (ms["after"] - ms["before"])) / (
            one["samples"] - n_small
        )
        results["plan_bytes_per_sample"] = slope

        print(f"\n{'run':<34} {'wall s':>8} {'merge s':>8} {'merge %':>8}  peak RSS per worker MiB")
        for name, wall, merge, rss in rows:
            print(f"{name:<34} {wall:8.1f} {merge:8.1f} {100 * merge / wall:7.1f}%  "
                  f"{', '.join(str(round(x / MiB)) for x in rss)}")  # fmt: skip
        print(f"plan step: {m['seconds']:.1f} s, {(m['after'] - m['before']) / MiB:.1f} MiB over "
              f"its start ({m['before'] / MiB:.0f} MiB) for {one['samples']:,} samples = "
              f"{per_sample:.1f} B/sample; {n_small:,} samples: "
              f"{(ms['after'] - ms['before']) / MiB:.1f} MiB; per sample (slope) {slope:.1f} B "
              f"(target <= 32); all outputs byte-identical; load "
              f"{os.getloadavg()[0]:.1f}")  # fmt: skip
        results["rows"] = rows
        results["samples"] = one["samples"]
        results["tokens"] = one["tokens"]
        return results
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def test_bench_distributed():
    r = main(float(os.environ.get("BENCH_DIST_GB", 0.25)),
             int(os.environ.get("BENCH_DIST_SHARDS", 4)))  # fmt: skip
    assert r["plan_bytes_per_sample"] <= 32


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="corpus size in GB (default 2.0)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args()
    main(a.gb, a.shards, a.keep)
