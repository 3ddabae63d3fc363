"""Shards of a large JSONL object in S3 (a local moto server) read only their byte ranges:
the merged parts are the bytes of one local pack, each shard downloads about its share,
a bad record deep in a shard's range is named by its URL and its line in the whole object,
and no shard reads a byte it did not ask for."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_object_store import BUCKET, _local_bytes, _opts, s3  # noqa: F401 (fixture)

from pyfast_tune.data import DataFormatError, merge_packs, pack, storage
from pyfast_tune.demo import synth_conversations

N = 3


@pytest.fixture(scope="module")
def big(s3, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """A JSONL object of about 3.2 MB (3,000 chats) at s3://bucket/ranges-big/, and its local copy."""
    d = tmp_path_factory.mktemp("big") / "big"
    d.mkdir()
    lines = [json.dumps(r) for r in synth_conversations(3000, seed=41)]
    (d / "chats.jsonl").write_text("\n".join(lines) + "\n")
    s3.put(str(d), f"{BUCKET}/ranges-big", recursive=True)
    return d, lines


@pytest.fixture
def gets(s3, monkeypatch):  # noqa: F811
    """Every ranged or whole read of an object: (object path, bytes returned)."""
    seen = []
    # fsspec's sync methods: on the instance
    cat_file, cat_ranges, get_file = s3.cat_file, s3.cat_ranges, s3.get_file

    def counting_cat(path, start=None, end=None, **kw):
        data = cat_file(path, start=start, end=end, **kw)
        seen.append((path, len(data)))
        return data

    def counting_ranges(paths, starts, ends, **kw):
        datas = cat_ranges(paths, starts, ends, **kw)
        seen.extend((p, len(d)) for p, d in zip(paths, datas, strict=True))
        return datas

    def counting_get(rpath, lpath, **kw):
        get_file(rpath, lpath, **kw)
        seen.append((rpath, os.path.getsize(lpath)))

    monkeypatch.setattr(s3, "cat_file", counting_cat)
    monkeypatch.setattr(s3, "cat_ranges", counting_ranges)
    monkeypatch.setattr(s3, "get_file", counting_get)
    assert storage.filesystem(f"s3://{BUCKET}/ranges-big")[0] is s3  # the instance storage uses
    return seen


def _shards(url, tmp_path, monkeypatch, gets, **kw):
    """Run the N shards, each with a cache of its own (a machine of its own); the bytes each
    downloaded."""
    fetched = []
    for i in range(N):
        monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path / f"cache{i}"))
        gets.clear()
        pack(url, tmp_path / f"p{i}", shard=(i, N), **kw)
        fetched.append(sum(n for _, n in gets))
    return fetched


def _merged_like_local(d, url, tmp_path, monkeypatch, gets, tok):
    """Pack the local folder ``d`` and the N shards of its copy at ``url``; assert the merged
    parts are the local pack's bytes; the bytes each shard downloaded."""
    pack(str(d), tmp_path / "local", **_opts(tok))
    fetched = _shards(url, tmp_path, monkeypatch, gets, **_opts(tok))
    merge_packs([tmp_path / f"p{i}" for i in range(N)], tmp_path / "merged")
    assert _local_bytes(tmp_path / "merged") == _local_bytes(tmp_path / "local")
    return fetched


def test_shards_of_a_large_object_fetch_about_their_share(big, tiny_tokenizer, tmp_path,
                                                          monkeypatch, gets):  # fmt: skip
    d, _ = big
    size = (d / "chats.jsonl").stat().st_size
    monkeypatch.setattr(storage, "RANGE_BYTES", 256 << 10)  # a share in concurrent GETs
    fetched = _merged_like_local(
        d, f"s3://{BUCKET}/ranges-big", tmp_path, monkeypatch, gets, tiny_tokenizer
    )
    # A share, plus at most: the object's first 64 KiB (its kind and format, and half of
    # the check that all shards read one version), its last 64 KiB, a 64 KiB step past the
    # share's end to finish its last line, and a hash block (16 KiB here). Before, every
    # shard downloaded all of it.
    share = size / N
    assert all(share <= f <= share + 3 * 65536 + 16384 for f in fetched), (size, fetched)
    assert sum(fetched) < 1.2 * size


def test_a_bad_record_deep_in_a_shard_names_its_url_and_line(s3, big, tiny_tokenizer,  # noqa: F811
                                                             tmp_path, monkeypatch, gets):  # fmt: skip
    _, lines = big
    bad = list(lines)
    at = len(bad) * 5 // 6  # in the last shard's share, far from its start
    bad[at] = '{"messages": [{"role": "user"'
    blank = at - 10
    bad[blank] = "  "  # a blank line before it: counted as a line, not as a record
    s3.pipe(f"{BUCKET}/ranges-bad/chats.jsonl", ("\n".join(bad) + "\n").encode())
    url = f"s3://{BUCKET}/ranges-bad/chats.jsonl"
    monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataFormatError) as e:
        pack(f"s3://{BUCKET}/ranges-bad", tmp_path / "p", shard=(N - 1, N), **_opts(tiny_tokenizer))
    assert e.value.path == url and e.value.line == at + 1, str(e.value)
    assert f"{url}:{at + 1}: invalid JSON: record {at - 1}:" in str(e.value)

    # With skip_bad the merged parts name it as one pack does: meta.json is the same bytes.
    local = tmp_path / "bad_local"
    local.mkdir()
    (local / "chats.jsonl").write_text("\n".join(bad) + "\n")
    kw = dict(_opts(tiny_tokenizer), skip_bad=True)
    one = pack(str(local), tmp_path / "one", **kw)
    _shards(f"s3://{BUCKET}/ranges-bad", tmp_path, monkeypatch, gets, **kw)
    merged = merge_packs([tmp_path / f"p{i}" for i in range(N)], tmp_path / "merged")
    # (the examples name the copy each shard read, in its own cache)
    after_name = [m.split("chats.jsonl", 1)[1] for m in merged.skipped_examples]
    assert after_name == [m.split("chats.jsonl", 1)[1] for m in one.skipped_examples]
    assert after_name[0].startswith(f":{at + 1}: invalid JSON: record {at - 1}:"), after_name
    assert (tmp_path / "merged" / "samples.bin").read_bytes() == (
        tmp_path / "one" / "samples.bin"
    ).read_bytes()
    # The ranged merge (the executors') numbers them alike.
    from pyfast_tune.data.executor import merge_ranged, write_range

    parts = [tmp_path / f"p{i}" for i in range(N)]
    merge_ranged(
        parts, tmp_path / "ranged", 2, lambda st, k: [write_range(st, j) for j in range(k)]
    )
    assert _local_bytes(tmp_path / "ranged") == _local_bytes(tmp_path / "merged")


def test_a_shard_reads_no_byte_it_did_not_ask_for(big, tiny_tokenizer, tmp_path, monkeypatch):
    d, _ = big
    monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path / "cache"))
    pack(f"s3://{BUCKET}/ranges-big", tmp_path / "first", shard=(1, N), **_opts(tiny_tokenizer))
    (placeholder,) = [p for p in storage._HAVE if p.endswith("chats.jsonl") and
                      p.startswith(str(tmp_path))]  # fmt: skip
    have = storage._HAVE[placeholder]
    size = os.path.getsize(placeholder)
    assert sum(hi - lo for lo, hi in have) < size * 0.6  # not the whole object
    # Bytes never asked for: junk that would break any record (a read of them without
    # asking — zeros the first time — would change the part or fail).
    with open(placeholder, "r+b") as f:
        for lo, hi in storage._missing(have, 0, size):
            f.seek(lo)
            f.write(b"\x01{" * ((hi - lo) // 2) + b"\x01" * ((hi - lo) % 2))
    pack(f"s3://{BUCKET}/ranges-big", tmp_path / "again", shard=(1, N), **_opts(tiny_tokenizer))
    first, again = _local_bytes(tmp_path / "first"), _local_bytes(tmp_path / "again")
    assert first.keys() == again.keys()
    for name in ("part_samples.bin", "stage_tokens.tmp"):
        assert first[name] == again[name], name
    docs = [json.loads(x["part.json"]) for x in (first, again)]
    for key in ("file_table", "file_entries", "samples", "tokens"):
        assert docs[0][key] == docs[1][key], key
    assert storage._HAVE[placeholder] == have  # nothing more was asked for
    assert Path(placeholder).read_bytes() != (d / "chats.jsonl").read_bytes()


def test_a_large_json_array_is_fetched_whole_by_the_shard_that_reads_it(
    s3,  # noqa: F811
    big,
    tiny_tokenizer,
    tmp_path,
    monkeypatch,
    gets,
):
    _, lines = big
    d = tmp_path / "array"
    d.mkdir()
    (d / "chats.json").write_text("[\n" + ",\n".join(lines) + "\n]\n")
    size = (d / "chats.json").stat().st_size
    s3.put(str(d), f"{BUCKET}/ranges-array", recursive=True)
    fetched = _merged_like_local(
        d, f"s3://{BUCKET}/ranges-array", tmp_path, monkeypatch, gets, tiny_tokenizer
    )
    # An array cannot be split: the shard holding its midpoint reads it all; the others
    # look at its first bytes only (is it an array?).
    assert sorted(fetched)[-1] == size and sorted(fetched)[:-1] == [65536, 65536], fetched


def test_an_object_rewritten_while_a_shard_reads_it_is_refused(s3, big, tiny_tokenizer,  # noqa: F811
                                                                tmp_path, monkeypatch):  # fmt: skip
    """The object is rewritten (same size, other bytes: the sizes agree) after the shard
    listed it and before its ranged GETs: the shard names the URL and writes no part, instead
    of a part mixing two versions. Without the version check it packed the new bytes."""
    d, _ = big
    url = f"s3://{BUCKET}/ranges-big"
    key = f"{BUCKET}/ranges-big/chats.jsonl"
    original = (d / "chats.jsonl").read_bytes()
    changed = original.replace(b"e", b"a")
    assert len(changed) == len(original) and changed != original
    real, rewritten = storage.fetch_range, []

    def rewrite_then_fetch(path, start, end):
        if not rewritten:
            s3.pipe_file(key, changed)
            rewritten.append(True)
        return real(path, start, end)

    monkeypatch.setattr(storage, "fetch_range", rewrite_then_fetch)
    monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path / "cache"))
    try:
        with pytest.raises(Exception, match="changed while it was read") as e:
            pack(url, tmp_path / "part", shard=(1, N), **_opts(tiny_tokenizer))
        assert url in str(e.value)
        assert rewritten and not (tmp_path / "part").exists()
    finally:
        s3.pipe_file(key, original)
        s3.invalidate_cache()


def test_shards_of_a_parquet_object_fetch_its_footer_and_their_row_groups(s3, big, tiny_tokenizer,  # noqa: F811
                                                                          tmp_path, monkeypatch, gets):  # fmt: skip
    """A Parquet object of 30 row groups: each shard reads the footer, its own row groups and
    the first rows (the format), not the whole object, and no byte it did not ask for; the
    merged parts are the bytes of one local pack. Before, each shard downloaded all of it."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _, lines = big
    d = tmp_path / "pq"
    d.mkdir()
    table = pa.Table.from_pylist([json.loads(x) for x in lines])
    # Uncompressed (2.1 MB), so that a share outweighs the fixed reads.
    pq.write_table(table, d / "chats.parquet", row_group_size=100, compression="none")
    assert pq.ParquetFile(d / "chats.parquet").num_row_groups == 30
    size = (d / "chats.parquet").stat().st_size
    s3.put(str(d), f"{BUCKET}/ranges-parquet", recursive=True)
    url = f"s3://{BUCKET}/ranges-parquet"
    fetched = _merged_like_local(d, url, tmp_path, monkeypatch, gets, tiny_tokenizer)
    # A share, plus at most: a row group past it (groups are placed whole), the first row
    # group (the format probe), the object's first and last 64 KiB (the version check; the
    # footer lies in the last), a hash block (16 KiB here) and the footer.
    group = size / 30
    share = size / N
    footer = 32 << 10
    assert all(f <= share + 2 * group + 2 * 65536 + 16384 + footer for f in fetched), (
        size,
        fetched,
    )
    assert sum(fetched) < 1.3 * size, (size, fetched)

    # Bytes never asked for, overwritten with junk, change nothing the shard writes.
    monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path / "cache1"))
    (placeholder,) = [p for p in storage._HAVE if p.endswith("chats.parquet") and
                      p.startswith(str(tmp_path / "cache1"))]  # fmt: skip
    have = storage._HAVE[placeholder]
    with open(placeholder, "r+b") as f:
        for lo, hi in storage._missing(have, 0, size):
            f.seek(lo)
            f.write(b"\x01" * (hi - lo))
    pack(url, tmp_path / "again", shard=(1, N), **_opts(tiny_tokenizer))
    first, again = _local_bytes(tmp_path / "p1"), _local_bytes(tmp_path / "again")
    for name in ("part_samples.bin", "stage_tokens.tmp"):
        assert first[name] == again[name], name
    assert storage._HAVE[placeholder] == have  # nothing more was asked for
