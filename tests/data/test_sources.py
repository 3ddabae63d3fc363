"""Parquet, Arrow IPC (file and stream, `datasets.save_to_disk` folders) and CSV/TSV inputs
give the packed bytes of the same records as JSONL, and `pack --shard I/N` splits inside a
single file of each kind with `merge-packs` still equal to one machine's `pack`."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow writes the Parquet/Arrow inputs ([dev] extra)")
import pyarrow.parquet as pq  # noqa: E402

from pyfast_tune.data import (  # noqa: E402
    DataFormatError,
    PackedDataset,
    merge_packs,
    pack,
)
from pyfast_tune.demo import synth_conversations  # noqa: E402

# Everything of a packed directory that depends on the records only (samples.bin holds the
# file index and record of each sample: equal too when the inputs are one file each).
BINARY = ("input_ids.bin", "loss_mask.bin", "samples.bin", "packs.bin", "pack_samples.bin")


def chats(n: int, seed: int) -> list[dict]:
    """OpenAI chats where some assistant messages carry `"loss": false` and others have no
    `loss` key: in Arrow the absent key is a null, which must read as absent again."""
    rng = random.Random(seed)
    recs = synth_conversations(n, seed=seed)
    for r in recs:
        for m in r["messages"]:
            if m["role"] == "assistant" and rng.random() < 0.2:
                m["loss"] = False
    return recs


def alpaca(n: int, seed: int) -> list[dict]:
    """Alpaca records whose cells need CSV quoting: commas, quotes, tabs, line breaks."""
    rng = random.Random(seed)
    words = ["alpha", "beta, gamma", 'say "hi"', "tab\there", "two\nlines", "ünïcode", "x"]
    return [
        {
            "instruction": " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))),
            "input": "" if rng.random() < 0.3 else rng.choice(words),
            "output": " ".join(rng.choice(words) for _ in range(rng.randint(1, 30))),
        }
        for _ in range(n)
    ]


def write_jsonl(records, path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def write_parquet(records, path: Path, rows_per_group: int = 64) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=rows_per_group)
    return path


def write_arrow(records, path: Path, stream: bool, rows_per_batch: int = 64) -> Path:
    table = pa.Table.from_pylist(records)
    new = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=rows_per_batch):
            w.write_batch(batch)
    return path


def write_csv(records, path: Path, delimiter: str) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(records)
    return path


def same_output(a: Path, b: Path, names=BINARY) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma = json.loads((a / "meta.json").read_text())
    mb = json.loads((b / "meta.json").read_text())
    assert {k: ma["outputs"][k] for k in names} == {k: mb["outputs"][k] for k in names}
    # Statistics too, but the fingerprint: it hashes the input files themselves.
    assert {**ma["stats"], "fingerprint": ""} == {**mb["stats"], "fingerprint": ""}
    if names != BINARY:
        return
    assert [f["records"] for f in ma["files"]] == [f["records"] for f in mb["files"]]
    assert [f["format"] for f in ma["files"]] == [f["format"] for f in mb["files"]]


KW = dict(max_length=512, template="qwen_chat", seed=3)


@pytest.fixture(scope="module")
def chat_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_sources")
    recs = chats(700, seed=11)
    return {
        "jsonl": write_jsonl(recs, d / "c.jsonl"),
        "parquet": write_parquet(recs, d / "c.parquet"),
        "arrow_file": write_arrow(recs, d / "cf.arrow", False),
        "arrow_stream": write_arrow(recs, d / "cs.arrow", True),
    }


@pytest.mark.parametrize("kind", ["parquet", "arrow_file", "arrow_stream"])
def test_columnar_chats_pack_like_jsonl(tmp_path, tiny_tokenizer, chat_sources, kind):
    ref = pack(chat_sources["jsonl"], tmp_path / "ref", tokenizer=tiny_tokenizer, **KW)
    got = pack(chat_sources[kind], tmp_path / "got", tokenizer=tiny_tokenizer, **KW)
    assert got.records == ref.records == 700
    assert (got.samples, got.tokens, got.loss_tokens) == (ref.samples, ref.tokens, ref.loss_tokens)
    same_output(tmp_path / "ref", tmp_path / "got")
    meta = json.loads((tmp_path / "got" / "meta.json").read_text())
    assert meta["files"][0]["format"] == "openai"  # --format auto detected from the columns
    PackedDataset(tmp_path / "got").verify()


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_csv_and_tsv_pack_like_jsonl(tmp_path, tiny_tokenizer, delimiter):
    recs = alpaca(500, seed=4)
    jsonl = write_jsonl(recs, tmp_path / "a.jsonl")
    table = write_csv(recs, tmp_path / ("a.csv" if delimiter == "," else "a.tsv"), delimiter)
    ref = pack(jsonl, tmp_path / "ref", tokenizer=tiny_tokenizer, **KW)
    got = pack(table, tmp_path / "got", tokenizer=tiny_tokenizer, **KW)
    assert got.records == 500 and got.samples == ref.samples > 0
    same_output(tmp_path / "ref", tmp_path / "got")
    # A quoted cell spans lines: records name the line the row starts on.
    sample = PackedDataset(tmp_path / "got").sample(3)
    assert sample["source"] == (str(table), 3)


def test_columns_remap_a_parquet_file(tmp_path, tiny_tokenizer):
    recs = alpaca(200, seed=8)
    renamed = [
        {"question": r["instruction"], "ctx": r["input"], "answer": r["output"]} for r in recs
    ]
    write_parquet(renamed, tmp_path / "q.parquet")
    write_jsonl(recs, tmp_path / "a.jsonl")
    cols = "instruction=question,input=ctx,output=answer"
    pack(tmp_path / "a.jsonl", tmp_path / "ref", tokenizer=tiny_tokenizer, format="alpaca", **KW)
    pack(tmp_path / "q.parquet", tmp_path / "got", tokenizer=tiny_tokenizer, format="alpaca",
         columns=cols, **KW)  # fmt: skip
    for name in BINARY:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "got" / name).read_bytes()


def test_save_to_disk_folder_reads_its_data_files_in_order(tmp_path, tiny_tokenizer):
    datasets = pytest.importorskip("datasets", reason="datasets writes save_to_disk folders")
    recs = chats(300, seed=21)
    write_jsonl(recs, tmp_path / "c.jsonl")
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "saved"), num_shards=3)
    names = json.loads((tmp_path / "saved" / "state.json").read_text())["_data_files"]
    assert len(names) == 3
    ref = pack(tmp_path / "c.jsonl", tmp_path / "ref", tokenizer=tiny_tokenizer, **KW)
    got = pack(tmp_path / "saved", tmp_path / "got", tokenizer=tiny_tokenizer, **KW)
    assert (got.records, got.samples, got.tokens) == (ref.records, ref.samples, ref.tokens)
    same_output(tmp_path / "ref", tmp_path / "got", names=BINARY[:2] + BINARY[3:])
    ds = PackedDataset(tmp_path / "got")
    assert ds.files == [n["filename"] for n in names]  # not state.json, not dataset_info.json
    # The samples' records, counted across the three files, are the JSONL's.
    sizes = [f["records"] for f in ds.meta["files"]]
    starts = np.cumsum([0, *sizes])
    ref_ds = PackedDataset(tmp_path / "ref")
    for j in (0, 150, ds.num_samples - 1):
        f, r = ds.sample(j)["source"]
        assert starts[ds.files.index(f)] + r == ref_ds.sample(j)["source"][1]
    # A DatasetDict folder names its splits instead of mixing them.
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs[:10])}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(FileNotFoundError, match="give one split's folder"):
        pack(tmp_path / "dd", tmp_path / "x", tokenizer=tiny_tokenizer, **KW)


def test_a_schema_that_does_not_fit_names_file_column_and_expectation(tmp_path, tiny_tokenizer):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"messages": ["not a list"] * 5}), bad)
    with pytest.raises(
        DataFormatError,
        match=r'bad\.parquet:1 \(record 0\): "messages": expected an array, got a string',
    ):
        pack(bad, tmp_path / "o", tokenizer=tiny_tokenizer, **KW)
    # A column no JSON value can hold: the file and the column are named up front.
    odd = tmp_path / "odd.arrow"  # (Parquet cannot hold an interval; Arrow can)
    table = pa.table({"text": ["a"], "span": pa.array([pa.MonthDayNano([1, 2, 3])])})
    with pa.OSFile(str(odd), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(DataFormatError, match=r'odd\.arrow: .*column "span": Arrow type') as e:
        pack(odd, tmp_path / "o", tokenizer=tiny_tokenizer, **KW)
    # A file-level fault names the file, not a made-up line 0 / record 0.
    assert e.value.path == str(odd) and e.value.line is None and "(record" not in str(e.value)
    torn = tmp_path / "torn.parquet"
    torn.write_bytes(b"PAR1" + bytes(64))
    with pytest.raises(DataFormatError, match=r"torn\.parquet: not a readable Parquet file"):
        pack(torn, tmp_path / "o", tokenizer=tiny_tokenizer, **KW)
    assert not (tmp_path / "o").exists()


def test_skip_bad_counts_bad_rows(tmp_path, tiny_tokenizer):
    recs = chats(100, seed=5)
    for k in (3, 40, 41):
        recs[k]["messages"][-1]["content"] = None  # null content: a missing "content"
    write_parquet(recs, tmp_path / "c.parquet")
    with pytest.raises(
        DataFormatError, match=r'c\.parquet:4 \(record 3\): messages\[\d+\]\. ?missing "content"'
    ):
        pack(tmp_path / "c.parquet", tmp_path / "o", tokenizer=tiny_tokenizer, **KW)
    st = pack(tmp_path / "c.parquet", tmp_path / "o", tokenizer=tiny_tokenizer, skip_bad=True, **KW)
    assert (st.records, st.skipped_records) == (100, 3)
    assert st.skipped_examples[0].startswith(f"{tmp_path / 'c.parquet'}:4 (record 3)")
    # CSV: a row with a cell too many is a bad row, named by its line.
    rows = 'instruction,input,output\na,b,c\nd,e,f,g\n"h\nh",i,j\n'
    (tmp_path / "t.csv").write_text(rows)
    with pytest.raises(
        DataFormatError, match=r"t\.csv:3 \(record 1\): the row has 4 cells, the header 3"
    ):
        pack(tmp_path / "t.csv", tmp_path / "o2", tokenizer=tiny_tokenizer, **KW)
    st = pack(tmp_path / "t.csv", tmp_path / "o2", tokenizer=tiny_tokenizer, skip_bad=True, **KW)
    assert (st.records, st.skipped_records, st.samples) == (3, 1, 2)
    assert PackedDataset(tmp_path / "o2").sample(1)["source"][1] == 2


SHARD_KINDS = ["jsonl", "parquet", "arrow_file", "arrow_stream", "csv"]


@pytest.fixture(scope="module")
def big_sources(tmp_path_factory):
    """One file of each kind holding 3,000 records (many lines, row groups and batches)."""
    d = tmp_path_factory.mktemp("big_sources")
    recs = chats(3000, seed=13)
    tab = alpaca(3000, seed=13)
    return {
        "jsonl": write_jsonl(recs, d / "c.jsonl"),
        "parquet": write_parquet(recs, d / "c.parquet", rows_per_group=40),
        "arrow_file": write_arrow(recs, d / "cf.arrow", False, rows_per_batch=40),
        "arrow_stream": write_arrow(recs, d / "cs.arrow", True, rows_per_batch=40),
        "csv": write_csv(tab, d / "a.csv", ","),
    }


@pytest.mark.parametrize("kind", SHARD_KINDS)
def test_shards_split_one_file_evenly_and_merge_to_one_machine(
    tmp_path, tiny_tokenizer, big_sources, kind
):
    src = big_sources[kind]
    n = 3
    one = pack(src, tmp_path / "one", tokenizer=tiny_tokenizer, **KW)
    parts = [
        pack(src, tmp_path / f"p{i}", tokenizer=tiny_tokenizer, shard=(i, n), **KW)
        for i in range(n)
    ]
    assert sum(p.records for p in parts) == one.records == 3000
    share = one.tokens / n
    for p in parts:  # each machine encodes about a third of the file
        assert abs(p.tokens - share) < 0.05 * share, [q.tokens for q in parts]
    merged = merge_packs([tmp_path / f"p{i}" for i in (2, 0, 1)], tmp_path / "m")
    for name in BINARY + ("meta.json",):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "m" / name).read_bytes(), name
    assert merged.fingerprint == one.fingerprint


def test_shards_mix_split_and_whole_files(tmp_path, tiny_tokenizer, big_sources):
    """A big splittable file between small and compressed ones; a bad record and an empty file
    with skip_bad: one fault, counted once."""
    import gzip

    d = tmp_path / "data"
    d.mkdir()
    small = chats(30, seed=2)
    write_jsonl(small, d / "a.jsonl")
    (d / "b.parquet").write_bytes(big_sources["parquet"].read_bytes())
    (d / "c.jsonl.gz").write_bytes(gzip.compress(write_jsonl(small, tmp_path / "x").read_bytes()))
    (d / "d.jsonl").write_text("\n\n")  # no record: an empty file
    text = big_sources["jsonl"].read_text().replace("\n", "\n{broken\n", 7)
    (d / "e.jsonl").write_text(text)
    kw = dict(KW, skip_bad=True)
    one = pack(d, tmp_path / "one", tokenizer=tiny_tokenizer, **kw)
    assert (one.skipped_files, one.skipped_records) == (1, 7)
    for n in (2, 4):
        for i in range(n):
            pack(d, tmp_path / f"n{n}p{i}", tokenizer=tiny_tokenizer, shard=(i, n), **kw)
        merged = merge_packs([tmp_path / f"n{n}p{i}" for i in range(n)], tmp_path / f"m{n}")
        for name in BINARY + ("meta.json",):
            assert (tmp_path / "one" / name).read_bytes() == (
                tmp_path / f"m{n}" / name
            ).read_bytes(), (n, name)
        assert (merged.skipped_files, merged.skipped_examples) == (
            one.skipped_files,
            one.skipped_examples,
        )


@pytest.mark.parametrize("kind", ["parquet", "arrow_file", "arrow_stream", "csv"])
def test_python_map_fn_reads_every_source_like_jsonl(tmp_path, tiny_tokenizer, kind):
    # The map_fn slow path reads rows in Python; it must hand map_fn the records the engine
    # would read (CSV cells as strings, Arrow nulls as absent keys).
    recs = alpaca(60, seed=9)
    for r in recs[3::7]:  # (not the first: pyarrow takes the columns from the first row)
        del r["input"]  # a key some records lack: a null column cell in Parquet/Arrow
    writers = {
        "parquet": lambda p: write_parquet(recs, p.with_suffix(".parquet")),
        "arrow_file": lambda p: write_arrow(recs, p.with_suffix(".arrow"), False),
        "arrow_stream": lambda p: write_arrow(recs, p.with_suffix(".arrow"), True),
        "csv": lambda p: write_csv([{"input": "", **r} for r in recs], p.with_suffix(".csv"), ","),
    }
    jsonl = write_jsonl(recs, tmp_path / "a.jsonl")
    other = writers[kind](tmp_path / "b")
    seen = []

    def to_chat(rec):
        seen.append(rec)
        text = rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")
        return {"conversation": [{"input": text, "output": rec["output"]}]}

    kw = dict(tokenizer=tiny_tokenizer, format="conversation", map_fn=to_chat, **KW)
    ref = pack(jsonl, tmp_path / "ref", **kw)
    n = len(seen)
    got = pack(other, tmp_path / "got", **kw)
    assert n == len(seen) - n == 60
    assert (got.samples, got.tokens, got.loss_tokens) == (ref.samples, ref.tokens, ref.loss_tokens)
    same_output(tmp_path / "ref", tmp_path / "got", names=BINARY[:2])
