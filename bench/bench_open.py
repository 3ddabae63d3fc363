"""Open time and random-pack read rate of a ≥ 1 GB packed directory against
`datasets.load_from_disk` of the same packs.

    python bench/bench_open.py [--gb 1.0] [--dir /tmp/bench_open] [--reads 3000]
    pytest bench/bench_open.py -s          # same, with the defaults

The input is built fast as pre-tokenized InternEVO data (`X.bin` JSON lines + `X.bin.meta`,
no tokenizer run): 2000 distinct samples of 64..4096 tokens repeated until the packed
`input_ids.bin` + `loss_mask.bin` reach the target size, then packed with `pyfast-tune pack`
at max_length 4096. The Arrow copy holds, per pack, `input_ids` and `labels` (int32 lists) as
XTuner's `process_hf_dataset` output does, written with pyarrow from the packed arrays.

Measured:
* open: `PackedDataset(dir)` vs `datasets.load_from_disk(dir)` — best of 20, warm page cache;
* random reads (the same uniform pack indices for every reader, 100 warm-up reads, best of 3
  passes): `ds[i]` (numpy: input_ids, labels, position_ids,
  cu_seqlens — what the trainer consumes), `ds.pack_arrays(i)` (zero-copy views of the stored
  ids and loss mask), Arrow `ds_hf[i]` (Python lists, the default) and Arrow with
  `.with_format("numpy")`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from pyfast_tune.data import PackedDataset, pack
from pyfast_tune.demo import make_tokenizer, synth_conversations

MAX_LENGTH = 4096


def write_pretok(path: Path, target_tokens: int, seed: int = 0) -> int:
    """Write `path` (.bin) and `path.meta`; returns the token count written."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(2000):
        n = int(rng.integers(64, MAX_LENGTH + 1))
        toks = rng.integers(1, 1000, size=n)
        toks[: n // 3] *= -1  # a prompt without loss, as InternEVO marks it
        lines.append(((json.dumps({"tokens": toks.tolist()}) + "\n").encode(), n))
    rows, off, total = [], 0, 0
    with open(path, "wb", buffering=1 << 24) as f:
        while total < target_tokens:
            for line, n in lines:
                f.write(line)
                rows.append((off, n))
                off += len(line)
                total += n
                if total >= target_tokens:
                    break
    np.save(open(str(path) + ".meta", "wb"), np.asarray(rows, dtype=np.int64))
    return total


def write_arrow(ds: PackedDataset, out: Path) -> None:
    import datasets
    import pyarrow as pa

    offsets = pa.array(np.asarray(ds.packs[:, 0]).astype(np.int64))
    ids = np.asarray(ds.input_ids).astype(np.int32)
    labels = np.where(np.asarray(ds.loss_mask) != 0, ids, np.int32(-100)).astype(np.int32)
    table = pa.table(
        {
            "input_ids": pa.LargeListArray.from_arrays(offsets, pa.array(ids)),
            "labels": pa.LargeListArray.from_arrays(offsets, pa.array(labels)),
        }
    )
    datasets.Dataset(table).save_to_disk(str(out))


def best_of(fn, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_rate(get, n_items: int, reads: int, seed: int = 1, rounds: int = 3) -> float:
    """Reads per second: the same `reads` random indices for every reader, 100 warm-up reads,
    the best of `rounds` passes."""
    idx = random.Random(seed).choices(range(n_items), k=reads)
    for i in idx[:100]:
        get(i)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for i in idx:
            get(i)
        best = min(best, time.perf_counter() - t)
    return reads / best


def run(gb: float, workdir: Path, reads: int) -> dict:
    import datasets

    workdir.mkdir(parents=True, exist_ok=True)
    packed, arrow = workdir / "packed", workdir / "arrow"
    target = int(gb * (1 << 30) / 5)  # 4 bytes of id + 1 byte of mask per token
    if not (packed / "meta.json").is_file() or PackedDataset(packed).num_tokens < target:
        src = workdir / "src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        tok = make_tokenizer(synth_conversations(50, seed=0), workdir / "tok")
        t = time.perf_counter()
        write_pretok(src / "data.bin", target)
        t_gen = time.perf_counter() - t
        t = time.perf_counter()
        pack(src, packed, tokenizer=tok, max_length=MAX_LENGTH, file_type=".bin", template="none")
        t_pack = time.perf_counter() - t
        shutil.rmtree(src)
        shutil.rmtree(arrow, ignore_errors=True)
        print(f"built input in {t_gen:.1f} s, packed in {t_pack:.1f} s")
    ds = PackedDataset(packed)
    if not arrow.is_dir():
        write_arrow(ds, arrow)
    size = sum(f.stat().st_size for f in packed.iterdir())
    hf = datasets.load_from_disk(str(arrow))
    hf_np = hf.with_format("numpy")
    n = len(ds)
    r = {
        "packed_bytes": size,
        "packs": n,
        "tokens": ds.num_tokens,
        "open_ms": 1e3 * best_of(lambda: PackedDataset(packed)),
        "open_ms_median": 1e3
        * statistics.median([best_of(lambda: PackedDataset(packed), 1) for _ in range(20)]),
        "hf_open_ms": 1e3 * best_of(lambda: datasets.load_from_disk(str(arrow))),
        "getitem_per_s": read_rate(lambda i: ds[i], n, reads),
        "raw_view_per_s": read_rate(lambda i: ds.pack_arrays(i), n, reads),
        "hf_lists_per_s": read_rate(lambda i: hf[i], n, reads),
        "hf_numpy_per_s": read_rate(lambda i: hf_np[i], n, reads),
    }
    a = hf_np[3]
    b = ds[3]
    assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(
        a["labels"], b["labels"]
    )
    return r


def report(r: dict) -> None:
    print(f"\npacked dir: {r['packed_bytes'] / 2**30:.2f} GiB, {r['packs']} packs, "
          f"{r['tokens'] / 1e6:.0f} M tokens")  # fmt: skip
    print(f"open:  PackedDataset {r['open_ms']:.2f} ms (median {r['open_ms_median']:.2f}) | "
          f"datasets.load_from_disk {r['hf_open_ms']:.2f} ms "
          f"({r['hf_open_ms'] / r['open_ms']:.0f}x)")  # fmt: skip
    print(f"reads: ds[i] {r['getitem_per_s'] / 1e3:.1f} k packs/s | ds.pack_arrays(i) "
          f"{r['raw_view_per_s'] / 1e3:.1f} k packs/s | Arrow lists {r['hf_lists_per_s'] / 1e3:.2f} k/s"
          f" | Arrow numpy {r['hf_numpy_per_s'] / 1e3:.2f} k/s")  # fmt: skip


def test_bench_open(tmp_path):
    r = run(float(os.environ.get("BENCH_OPEN_GB", "1.0")), tmp_path, 3000)
    report(r)
    assert r["packed_bytes"] >= 1 << 30 or os.environ.get("BENCH_OPEN_GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_open"))
    ap.add_argument("--reads", type=int, default=3000, help="random reads per reader and pass")
    args = ap.parse_args()
    report(run(args.gb, args.dir, args.reads))


if __name__ == "__main__":
    main()
