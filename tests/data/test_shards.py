"""Scale: streamed JSONL (batches, compression) gives the bytes of a whole-file read, and
`pack --shard I/N` on N machines + `merge-packs` equals one machine, byte for byte."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import zstandard

from pyfast_tune.cli import main as cli
from pyfast_tune.data import CorruptDataError, PackConfigError, PackedDataset, merge_packs, pack
from pyfast_tune.demo import synth_conversations

FILES = (
    "input_ids.bin",
    "loss_mask.bin",
    "samples.bin",
    "packs.bin",
    "pack_samples.bin",
    "meta.json",
)


def make_data(d: Path) -> Path:
    """Files of very different sizes and kinds (plain, gz, zst, a JSON array, a bad record)
    so shard boundaries fall in odd places."""
    convs = synth_conversations(900, seed=3)
    sizes = [400, 3, 150, 1, 90, 200, 56]
    start = 0
    for i, n in enumerate(sizes):
        recs = convs[start : start + n]
        start += n
        text = "".join(json.dumps(r) + "\n" for r in recs)
        if i == 2:
            text = text.replace("\n", "\n{broken\n", 1)  # one bad record: skip_bad counts it
        p = d / f"{i % 3}" / f"part{i}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        if i == 1:
            (d / "1" / "arr.json").write_text(json.dumps(recs))
        elif i == 4:
            Path(f"{p}.gz").write_bytes(gzip.compress(text.encode()))
        elif i == 5:
            Path(f"{p}.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
        else:
            p.write_text(text)
    return d


def same_bytes(a: Path, b: Path, extra=()) -> None:
    for name in FILES + tuple(extra):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_three_shards_and_merge_equal_one_machine(tmp_path, tiny_tokenizer):
    data = make_data(tmp_path / "data")
    kw = dict(tokenizer=tiny_tokenizer, max_length=512, template="qwen_chat", seed=7, skip_bad=True)
    one = pack(data, tmp_path / "one", **kw)
    parts = []
    for i in range(3):
        st = pack(data, tmp_path / f"part{i}", shard=(i, 3), **kw)
        assert 0 < st.samples < one.samples
        parts.append(tmp_path / f"part{i}")
    merged = merge_packs([parts[2], parts[0], parts[1]], tmp_path / "merged")
    same_bytes(tmp_path / "one", tmp_path / "merged")
    assert (merged.samples, merged.packs, merged.fingerprint, merged.skipped_records) == (
        one.samples,
        one.packs,
        one.fingerprint,
        one.skipped_records,
    )
    assert merged.skipped_examples == one.skipped_examples
    PackedDataset(tmp_path / "merged").verify()
    # the CLI spelling does the same
    for i in range(3):
        assert (
            cli(
                [
                    "pack",
                    str(data),
                    "--shard",
                    f"{i}/3",
                    "--out",
                    str(tmp_path / f"c{i}"),
                    "--tokenizer",
                    str(tiny_tokenizer),
                    "--max-length",
                    "512",
                    "--template",
                    "qwen_chat",
                    "--seed",
                    "7",
                    "--skip-bad",
                    "--quiet",
                ]
            )
            == 0
        )
    assert (
        cli(
            [
                "merge-packs",
                *(str(tmp_path / f"c{i}") for i in range(3)),
                "--out",
                str(tmp_path / "cm"),
                "--quiet",
            ]
        )
        == 0
    )
    same_bytes(tmp_path / "one", tmp_path / "cm")


def test_merge_refuses_incomplete_or_mixed_parts(tmp_path, tiny_tokenizer):
    data = make_data(tmp_path / "data")
    kw = dict(tokenizer=tiny_tokenizer, max_length=512, skip_bad=True)
    for i in range(2):
        pack(data, tmp_path / f"p{i}", shard=(i, 2), **kw)
    pack(data, tmp_path / "s1", shard=(1, 2), seed=1, **kw)
    with pytest.raises(PackConfigError, match=r"need shards 0\.\.2 exactly once"):
        merge_packs([tmp_path / "p0"], tmp_path / "m")
    with pytest.raises(PackConfigError, match="different runs"):
        merge_packs([tmp_path / "p0", tmp_path / "s1"], tmp_path / "m")
    with pytest.raises(PackConfigError, match="I/N"):
        pack(data, tmp_path / "bad", shard=(2, 2), **kw)
    # a part of the layout before format 2 (ids and mask staged in two files)
    shutil.copytree(tmp_path / "p1", tmp_path / "old1")
    doc = json.loads((tmp_path / "old1" / "part.json").read_text())
    del doc["format"]
    (tmp_path / "old1" / "part.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptDataError, match=r"part of format 1 .*pack this shard again"):
        merge_packs([tmp_path / "p0", tmp_path / "old1"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_streamed_batches_equal_whole_file_read(tmp_path, tiny_tokenizer):
    """10,000 records (several 4096-record batches) as JSONL, JSONL.zst and one JSON array
    (read whole): same samples, same packs."""
    recs = [{"text": f"record {i} " + "word " * (i % 37)} for i in range(10_000)]
    text = "".join(json.dumps(r) + "\n" for r in recs)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "d.jsonl").write_text(text)
    (tmp_path / "b" / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    (tmp_path / "c" / "d.json").write_text(json.dumps(recs))
    out = {}
    for k in "abc":
        st = pack(tmp_path / k, tmp_path / f"o{k}", tokenizer=tiny_tokenizer, max_length=1024)
        assert st.records == 10_000
        out[k] = tmp_path / f"o{k}"
    for name in FILES[:5]:
        assert (
            (out["a"] / name).read_bytes()
            == (out["b"] / name).read_bytes()
            == (out["c"] / name).read_bytes()
        ), name


def test_map_fn_packs_in_shards_too(tmp_path, tiny_tokenizer):
    # The Python map_fn path hands every option to the engine: sharded, each part encodes
    # only its share and the merge equals one machine.
    convs = synth_conversations(300, seed=5)
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"dialog": c["messages"]}) + "\n" for c in convs))

    def to_openai(rec):
        return {"messages": rec["dialog"]}

    kw = dict(tokenizer=tiny_tokenizer, max_length=512, template="qwen_chat", format="openai",
              map_fn=to_openai)  # fmt: skip
    one = pack(src, tmp_path / "one", **kw)
    parts = [pack(src, tmp_path / f"p{i}", shard=(i, 2), **kw) for i in range(2)]
    assert 0 < parts[0].samples < one.samples and parts[0].samples + parts[1].samples == one.samples
    merge_packs([tmp_path / "p0", tmp_path / "p1"], tmp_path / "merged")
    same_bytes(tmp_path / "one", tmp_path / "merged")


def test_a_mix_of_llava_sources_merges_in_ranges_to_one_pack(tmp_path, tiny_tokenizer):
    """Two LLaVA sources mixed by weight (one drawn 2.5 times, one halved): each copy of a
    sample keeps its image. Three shards give one pack's bytes through the serial merge and
    through the merge in ranges, which plans the mix (and each copy's image at its training
    size) from the parts' rows, without handing the run to the serial merge."""
    import numpy as np

    from pyfast_tune.data.executor import merge_ranged, write_range
    from pyfast_tune.vision.tiny import make_llava_records

    a = make_llava_records(tmp_path / "a", 16, text_only=4, seed=1)
    b = make_llava_records(tmp_path / "b", 12, text_only=6, seed=2)
    mix = [{"path": str(a), "name": "a", "weight": 2.5},
           {"path": str(b), "name": "b", "weight": 0.5}]  # fmt: skip
    kw = dict(tokenizer=tiny_tokenizer, max_length=64, format="llava", template="vicuna",
              seed=3, image_tokens=4, pack_length=128)  # fmt: skip
    one = pack(mix, tmp_path / "one", **kw)
    assert one.samples == 20 * 2 + 10 + 9  # a: 20 twice, 10 of them three times; b: 9 of 18
    ds = PackedDataset(tmp_path / "one")
    # Every copy of an image sample carries its image: as many images as image samples.
    images = json.loads((tmp_path / "one" / "images.json").read_text())
    with_image = [j for j in range(ds.num_samples) if -200 in np.asarray(ds.sample(j)["input_ids"])]
    assert sorted(row[0] for row in images["samples"] if row[2] >= 0) == with_image
    assert len(with_image) >= 16 * 2  # a's 16 image samples at least twice each
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, p in enumerate(parts):
        pack(mix, p, shard=(i, 3), **kw)
    merge_packs(parts, tmp_path / "serial")
    ranged, steps = merge_ranged(parts, tmp_path / "ranged", 3,
                                 lambda st, k: [write_range(st, i) for i in range(k)],
                                 block_tokens=1024)  # fmt: skip
    assert steps["write"] > 0  # planned from lengths, not merged serially
    assert (ranged.samples, ranged.mix) == (one.samples, one.mix)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    for other in ("serial", "ranged"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == names
        for name in names:
            a_, b_ = (tmp_path / "one" / name).read_bytes(), (tmp_path / other / name).read_bytes()
            assert a_ == b_, (other, name)


@pytest.mark.parametrize("image_tokens", [0, 4])
def test_llava_shards_merge_to_one_pack_in_ranges_too(tmp_path, tiny_tokenizer, image_tokens):
    """LLaVA records (images and text-only) in three files: three shards give one pack's
    bytes through the serial merge and through the merge in ranges, which plans each image
    at its training size (`image_tokens`, packs of `pack_length`) from the positions the
    parts recorded, without reading a token."""
    from pyfast_tune.data.executor import merge_ranged, write_range
    from pyfast_tune.vision.tiny import make_llava_records

    data = tmp_path / "data"
    for k in range(3):
        make_llava_records(data / f"s{k}", 14, text_only=5, seed=k)
    kw = dict(tokenizer=tiny_tokenizer, max_length=64, format="llava", template="vicuna", seed=5)
    if image_tokens:
        kw.update(image_tokens=image_tokens, pack_length=128)
    one = pack([data], tmp_path / "one", **kw)
    assert one.samples == 57
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, p in enumerate(parts):
        pack([data], p, shard=(i, 3), **kw)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "images.json" in names
    merge_packs(parts, tmp_path / "serial")
    _, steps = merge_ranged(parts, tmp_path / "ranged", 3,
                            lambda st, k: [write_range(st, i) for i in range(k)],
                            block_tokens=1024)  # fmt: skip
    assert steps["write"] > 0  # planned from lengths, not merged serially
    for other in ("serial", "ranged"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == names
        for name in names:
            a, b = (tmp_path / "one" / name).read_bytes(), (tmp_path / other / name).read_bytes()
            assert a == b, (other, name)
