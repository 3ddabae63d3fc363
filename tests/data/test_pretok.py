"""Pre-tokenized InternEVO/XTuner data (`X.bin` JSON lines of tokens + `X.bin.meta`, np.save
N×2 of byte offset and token count) and data-order files, against an independent Python
statement of XTuner's JsonlDataset and get_data_order.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from xtuner_ref import RefTokenizer, reference_samples

from pyfast_tune.cli import main as cli
from pyfast_tune.data import CorruptDataError, PackedDataset, data_order, merge_packs, pack

IGNORE = -100


def write_bin(path: Path, rows: list[list[int]], meta: bool = True) -> Path:
    """What InternEVO's tokenizer writes: one JSON line per document, and the .meta."""
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets, counts, buf = [], [], b""
    for tokens in rows:
        offsets.append(len(buf))
        counts.append(len(tokens))
        buf += (json.dumps({"tokens": tokens}) + "\n").encode()
    path.write_bytes(buf)
    if meta:
        with open(f"{path}.meta", "wb") as f:
            np.save(f, np.array([offsets, counts], dtype=np.int64).T.reshape(-1, 2))
    return path


def jsonl_dataset(path: Path, min_length: int):
    """XTuner's JsonlDataset, independently: meta rows filtered by length >= min_length; each
    line's tokens → input_ids |x|, labels x if x > 0 else -100. Returns (row, ids, labels)."""
    meta = np.load(f"{path}.meta")
    data = path.read_bytes()
    out = []
    for row, (offset, length) in enumerate(zip(meta[:, 0], meta[:, -1])):
        if min_length > 0 and length < min_length:
            continue
        line = data[offset : data.index(b"\n", offset) + 1]
        tokens = json.loads(line)["tokens"]
        out.append((row, [abs(x) for x in tokens], [x if x > 0 else IGNORE for x in tokens]))
    return out


def gen_rows(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        k = int(rng.integers(1, 120))
        ids = rng.integers(0, 500, size=k)
        sign = np.where(rng.random(k) < 0.4, -1, 1)
        rows.append([int(x) for x in ids * sign])
    rows.append([-5, -6, -7])  # nothing trained: dropped (and counted) like any such sample
    rows.append([0, 3, -0])  # id 0 never has loss (XTuner: label = id only if id > 0)
    return rows


def check_against_xtuner(ds: PackedDataset, files: list[Path], min_length: int, max_length: int):
    j = 0
    for fi, path in enumerate(files):
        for row, ids, labels in jsonl_dataset(path, min_length):
            ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE for x in labels):
                continue
            s = ds.sample(j)
            assert s["source"] == (ds.files[fi], row)
            assert s["input_ids"].tolist() == ids, (path, row)
            assert s["labels"].tolist() == labels, (path, row)
            j += 1
    assert j == ds.num_samples


def test_bin_meta_read_back_equals_jsonl_dataset(tmp_path, tiny_tokenizer):
    d = tmp_path / "evo"
    files = [
        write_bin(d / "b" / "1.bin", gen_rows(300, 1)),
        write_bin(d / "a" / "0.bin", gen_rows(200, 2)),
    ]
    files.sort(key=lambda p: p.relative_to(d).as_posix().encode())
    (d / "a" / "notes.jsonl").write_text('{"text": "not picked: --file-type .bin"}\n')
    for min_length, max_length in [(0, 4096), (50, 64)]:
        st = pack(
            d,
            tmp_path / "p",
            tokenizer=tiny_tokenizer,
            max_length=max_length,
            file_type=".bin",
            min_length=min_length,
            template="none",
        )
        ds = PackedDataset(tmp_path / "p")
        assert ds.files == ["a/0.bin", "b/1.bin"]
        check_against_xtuner(ds, files, min_length, max_length)
        assert st.records == 504
        short = sum(1 for f in files for n in np.load(f"{f}.meta")[:, 1] if n < min_length)
        assert st.samples + st.dropped_samples == 504
        assert st.dropped_samples >= short + (2 if min_length == 0 else 0)
        if max_length == 64:
            assert st.truncated_samples > 0
        assert ds.meta["files"][0]["format"] == "pretokenized"
        assert ds.meta["fingerprint_inputs"]["inputs"][0]["meta_blake3"]
        ds.verify()


def test_missing_and_inconsistent_meta(tmp_path, tiny_tokenizer):
    b = write_bin(tmp_path / "d" / "x.bin", gen_rows(20, 3), meta=False)
    with pytest.raises(CorruptDataError, match=r"x\.bin\.meta: missing.*--rebuild-meta"):
        pack(b, tmp_path / "p", tokenizer=tiny_tokenizer)
    pack(b, tmp_path / "p", tokenizer=tiny_tokenizer, rebuild_meta=True)
    rebuilt = np.load(f"{b}.meta")  # numpy reads what we wrote
    write_bin(tmp_path / "ref" / "x.bin", gen_rows(20, 3))
    np.testing.assert_array_equal(rebuilt, np.load(tmp_path / "ref" / "x.bin.meta"))
    # a stale meta (counts off by one) is caught with the row and offset named ...
    bad = rebuilt.copy()
    bad[4, 1] += 1
    np.save(open(f"{b}.meta", "wb"), bad)
    with pytest.raises(CorruptDataError, match=r"row 4 says \d+ tokens at byte offset \d+"):
        pack(b, tmp_path / "q", tokenizer=tiny_tokenizer)
    # ... an offset past the end too, and a non-npy file
    bad = rebuilt.copy()
    bad[2, 0] = 10**9
    np.save(open(f"{b}.meta", "wb"), bad)
    with pytest.raises(CorruptDataError, match="row 2"):
        pack(b, tmp_path / "q", tokenizer=tiny_tokenizer)
    Path(f"{b}.meta").write_bytes(b"garbage")
    with pytest.raises(CorruptDataError, match="not a valid .npy"):
        pack(b, tmp_path / "q", tokenizer=tiny_tokenizer)
    # --rebuild-meta repairs it
    assert (
        cli(
            [
                "pack",
                str(b),
                "--out",
                str(tmp_path / "q"),
                "--tokenizer",
                str(tiny_tokenizer),
                "--rebuild-meta",
                "--quiet",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(f"{b}.meta"), rebuilt)


def test_int32_meta_and_fortran_order_are_read(tmp_path, tiny_tokenizer):
    b = write_bin(tmp_path / "x.bin", gen_rows(10, 4))
    meta = np.load(f"{b}.meta")
    np.save(open(f"{b}.meta", "wb"), np.asfortranarray(meta.astype(np.int32)))
    pack(b, tmp_path / "p", tokenizer=tiny_tokenizer)
    check_against_xtuner(PackedDataset(tmp_path / "p"), [b], 0, 4096)


def internevo_round_trip(tmp_path, tok_dir, records, template="qwen_chat"):
    """Write .bin/.meta from ``records`` tokenized with ``tok_dir`` (user tokens negative = no
    loss), read them back and pack: ids and labels equal XTuner's JsonlDataset and the
    encoding they came from."""
    ref = reference_samples(records, "openai", template, RefTokenizer(tok_dir), 10**9)
    rows = [[i if lab != IGNORE else -i for i, lab in zip(ids, labels)] for _, ids, labels in ref]
    d = tmp_path / "evo"
    cut = len(rows) * 5 // 8
    files = [
        write_bin(d / "part-00000.bin", rows[:cut]),
        write_bin(d / "part-00001.bin", rows[cut:]),
    ]
    order = tmp_path / "data_order.txt"
    assert cli(["order", str(d), "--out", str(order)]) == 0
    assert order.read_text() == "part-00000.bin\npart-00001.bin\n"
    st = pack(
        d, tmp_path / "p", tokenizer=tok_dir, max_length=4096, file_type=".bin", data_order=order
    )
    ds = PackedDataset(tmp_path / "p")
    check_against_xtuner(ds, files, 0, 4096)
    # and the same tokens the JSON pipeline produced (id 0 aside, which never has loss here)
    for j in range(0, ds.num_samples, 37):
        s = ds.sample(j)
        _, ids, labels = ref[j]
        assert s["input_ids"].tolist() == ids
        assert s["labels"].tolist() == [lab if i != 0 else IGNORE for i, lab in zip(ids, labels)]
    assert st.fill > 0.95


def test_internevo_from_tokenized_chats(tmp_path, tiny_tokenizer_bos):
    """Generated chats and the tiny tokenizer (with a BOS); the same on the real chats and
    the Qwen3 tokenizer is in test_real_data.py."""
    from pyfast_tune.demo import synth_conversations

    internevo_round_trip(tmp_path, tiny_tokenizer_bos, synth_conversations(400, seed=21))


def test_order_is_truly_sorted_and_data_order_packs_those_files(tmp_path, tiny_tokenizer):
    d = tmp_path / "data"
    names = ["b/2.bin", "a-1/0.bin", "a/9.bin", "a/10.bin", "c.bin", ".hidden/0.bin", "a/x.jsonl"]
    for i, n in enumerate(names):
        write_bin(d / n, gen_rows(3, i)) if n.endswith(".bin") else (d / n).write_text("{}\n")
    # XTuner's get_data_order.py walks directories first (a/ before a-1/, filesystem order
    # between roots); ours is sorted by the whole relative path, identical everywhere.
    assert data_order(d, ".bin") == ["a-1/0.bin", "a/10.bin", "a/9.bin", "b/2.bin", "c.bin"]
    out = tmp_path / "order.txt"
    assert cli(["order", str(d), "--out", str(out), "--file-type", ".bin"]) == 0
    assert out.read_text().splitlines() == data_order(d, ".bin")
    # an XTuner-written order file (any order, subset) is followed exactly
    (tmp_path / "x.txt").write_text("c.bin\na/9.bin\n")
    pack(d, tmp_path / "p", tokenizer=tiny_tokenizer, data_order=tmp_path / "x.txt")
    assert PackedDataset(tmp_path / "p").files == ["c.bin", "a/9.bin"]
    (tmp_path / "bad.txt").write_text("../data/c.bin\n")
    with pytest.raises(Exception, match="not a relative path inside the data root"):
        pack(d, tmp_path / "q", tokenizer=tiny_tokenizer, data_order=tmp_path / "bad.txt")
    assert os.path.exists(tmp_path / "p")


def test_narrow_and_wide_ids_through_shards_and_both_merges(tmp_path, tiny_tokenizer):
    """A sample whose ids all fit 16 bits is staged as `<u2`, any other as `<u4` (part
    format 4): rows of both kinds (ids up to 200,000, and 65,535 / 65,536 at the edge) in
    three files, long enough that samples cross the ranged merge's blocks and chunks, give
    XTuner's ids in one pack, and the same bytes through three shards and either merge."""
    from pyfast_tune.data.executor import merge_ranged, write_range

    rng = np.random.default_rng(11)
    d = tmp_path / "evo"
    files = []
    for f in range(3):
        rows = []
        for _ in range(160):
            k = int(rng.integers(1, 700))
            top = 60_000 if rng.random() < 0.5 else 200_000
            rows.append([int(x) for x in rng.integers(1, top, size=k)])
        rows.append([65_535] * 5)  # narrow
        rows.append([3, 65_536, 4])  # wide
        files.append(write_bin(d / f"{f}.bin", rows))
    kw = dict(tokenizer=tiny_tokenizer, max_length=512, file_type=".bin", template="none", seed=3)
    one = pack(d, tmp_path / "one", **kw)
    ds = PackedDataset(tmp_path / "one")
    check_against_xtuner(ds, files, 0, 512)
    assert one.tokens > 2 * (1 << 16)  # more than two of the ranged merge's 64 Ki-token chunks
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, p in enumerate(parts):
        pack(d, p, shard=(i, 3), **kw)
    names = sorted(x.name for x in (tmp_path / "one").iterdir())

    def same(other: Path) -> None:
        assert sorted(x.name for x in other.iterdir()) == names
        for n in names:
            assert (tmp_path / "one" / n).read_bytes() == (other / n).read_bytes(), n

    merge_packs(parts, tmp_path / "serial")
    same(tmp_path / "serial")
    merge_ranged(parts, tmp_path / "ranged", 3,
                 lambda staging, k: [write_range(staging, i) for i in range(k)],
                 block_tokens=1024)  # fmt: skip
    same(tmp_path / "ranged")
