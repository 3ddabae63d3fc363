"""A JSON array file is read element by element, like JSONL: the same records give the same
packed bytes whether they come as JSONL or as a JSON array (plain, .gz, .zst), and errors name
the element (its record index and the line it starts on). Peak memory is in
bench/bench_json_array.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from pyfast_tune.data import DataFormatError, PackedDataset, pack


def _records(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.open()][:n]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def _packed_bytes(d: Path) -> dict[str, bytes]:
    """Every file of a packed directory but meta.json (which names and hashes the inputs)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "meta.json"}


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_json_array_packs_the_bytes_of_its_jsonl(tmp_path, tiny_tokenizer, generated_chats, suffix):
    recs = _records(generated_chats, 300)
    jsonl = "".join(json.dumps(r) + "\n" for r in recs).encode()
    # an exporter's layout: BOM, indentation, elements over several lines
    array = ("\ufeff" + json.dumps(recs, indent=2, ensure_ascii=False) + "\n").encode()
    a = _write(tmp_path / f"in/a.jsonl{suffix}", jsonl)
    b = _write(tmp_path / f"in/b.json{suffix}", array)
    kw = dict(tokenizer=tiny_tokenizer, max_length=512, template="qwen_chat", seed=3)
    sa = pack(a, tmp_path / "pa", **kw)
    sb = pack(b, tmp_path / "pb", **kw)
    assert (sa.samples, sa.tokens, sa.packs) == (sb.samples, sb.tokens, sb.packs)
    assert sa.samples > 250
    assert _packed_bytes(tmp_path / "pa") == _packed_bytes(tmp_path / "pb")
    ma, mb = PackedDataset(tmp_path / "pa").meta, PackedDataset(tmp_path / "pb").meta
    assert ma["files"][0]["records"] == mb["files"][0]["records"] == len(recs)
    assert mb["files"][0]["format"] == "openai"


def test_array_errors_name_the_element(tmp_path, tiny_tokenizer):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    kw = dict(tokenizer=tiny_tokenizer, format="openai")
    # a record of the wrong shape: its index and the line it starts on
    shape = [good, good, {"messages": "not a list"}, good]
    text = json.dumps(shape, indent=1)
    line = 1 + text[: text.rindex("{", 0, text.index('"not a list"'))].count("\n")
    bad = _write(tmp_path / "shape.json", text.encode())
    with pytest.raises(
        DataFormatError, match=rf"shape.json:{line} \(record 2\): .*expected an array"
    ):
        pack(bad, tmp_path / "p1", **kw)
    st = pack(bad, tmp_path / "p1", skip_bad=True, **kw)
    assert (st.samples, st.skipped_records) == (3, 1)
    # an element that is not valid JSON is one bad record, as a JSONL line would be
    text = '[\n{"messages": []},\n{"messages": [tru]},\n' + json.dumps(good) + "\n]"
    bad = _write(tmp_path / "syntax.json", text.encode())
    with pytest.raises(DataFormatError, match=r"syntax.json:3: invalid JSON: record 1: "):
        pack(bad, tmp_path / "p2", **kw)
    assert pack(bad, tmp_path / "p2", skip_bad=True, **kw).skipped_records == 1
    # a truncated array (a download cut short): the element where it breaks off
    text = "[\n" + ",\n".join([json.dumps(good)] * 5) + "\n]\n"  # element i on line i + 2
    cut, line = text[: text.rindex('{"messages"') + 20], 6
    bad = _write(tmp_path / "cut.json.gz", cut.encode())
    with pytest.raises(
        DataFormatError, match=rf"cut.json.gz:{line}: invalid JSON: record 4: .*no closing"
    ):
        pack(bad, tmp_path / "p3", **kw)
    st = pack(bad, tmp_path / "p3", skip_bad=True, **kw)
    assert (st.samples, st.skipped_records) == (4, 1)
    # an empty array is an empty file, as before
    empty = _write(tmp_path / "empty.json", b" [ ]\n")
    with pytest.raises(DataFormatError, match="empty file"):
        pack(empty, tmp_path / "p4", **kw)
