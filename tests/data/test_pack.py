"""The packing engine end to end: XTuner-exact encoding, packing invariants, determinism,
input handling and errors, on generated data and a tokenizer trained here. The same checks on
the real corpora and tokenizers of ../shared/data are in test_real_data.py."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from xtuner_ref import RefTokenizer, reference_samples

from pyfast_tune.cli import main as cli
from pyfast_tune.data import (
    CorruptDataError,
    DataFormatError,
    FingerprintMismatch,
    PackConfigError,
    PackedDataset,
    TokenizerError,
    fingerprint,
    pack,
)
from pyfast_tune.demo import synth_conversations


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def read_jsonl(path: Path, limit: int) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) == limit:
                break
    return out


def assert_matches_reference(ds: PackedDataset, expected) -> None:
    assert ds.num_samples == len(expected)
    for j, (record, ids, labels) in enumerate(expected):
        s = ds.sample(j)
        assert s["source"][1] == record, f"sample {j}: record {s['source'][1]} != {record}"
        np.testing.assert_array_equal(s["input_ids"], ids, err_msg=f"ids of record {record}")
        np.testing.assert_array_equal(s["labels"], labels, err_msg=f"labels of record {record}")


def check_packs(ds: PackedDataset, max_length: int) -> None:
    seen = np.zeros(ds.num_samples, dtype=np.int64)
    for i in range(len(ds)):
        p = ds[i]
        n = len(p["input_ids"])
        assert 0 < n <= max_length
        cu = p["cu_seqlens"]
        assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == n
        sids = ds.pack_sample_ids(i)
        np.testing.assert_array_equal(np.diff(cu), ds.sample_lengths[sids])
        for k, sid in enumerate(sids):
            seen[sid] += 1
            a, b = cu[k], cu[k + 1]
            np.testing.assert_array_equal(p["position_ids"][a:b], np.arange(b - a))
            np.testing.assert_array_equal(p["input_ids"][a:b], ds.sample(sid)["input_ids"])
            np.testing.assert_array_equal(p["labels"][a:b], ds.sample(sid)["labels"])
    assert (seen == 1).all(), "every sample in exactly one pack"


TEMPLATES = ["default", "internlm2_chat", "qwen_chat", "llama3_chat", "none"]


# --- XTuner semantics on generated data (no ../shared needed) --------------------------------

BRANCH_RECORDS = [
    {
        "messages": [
            {"role": "assistant", "content": "leading assistant is skipped"},
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi {round} {input}"},
            {"role": "user", "content": " again"},
            {"role": "assistant", "content": "Not trained", "loss": False},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "Trained", "loss": "True"},
            {"role": "user", "content": "dangling question"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "only untrained"},
            {"role": "assistant", "content": "x", "loss": False},
        ]
    },
    {"messages": [{"role": "user", "content": "no answer"}]},
    {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "e"},
            {"role": "assistant", "content": ""},
        ]
    },
]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("bos", [None, "<|endoftext|>"])
def test_generated_matches_xtuner(tmp_path, tiny_tokenizer, template, bos):
    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer, tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["bos_token"] = bos
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    records = BRANCH_RECORDS + synth_conversations(60, seed=3)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    stats = pack(data, tmp_path / "p", tokenizer=tok_dir, max_length=200, template=template)
    expected = reference_samples(records, "openai", template, RefTokenizer(tok_dir), 200)
    ds = PackedDataset(tmp_path / "p")
    assert_matches_reference(ds, expected)
    check_packs(ds, 200)
    # record 1 trains nothing, record 2 has no conversation: both dropped and counted
    assert stats.dropped_samples >= 2
    assert stats.records == stats.samples + stats.dropped_samples
    if bos is not None:
        assert ds.sample(0)["input_ids"][0] == RefTokenizer(tok_dir).bos[0]


def test_generated_pretrain_matches_xtuner(tmp_path, generated_tokenizer):
    """Plain-text documents: BOS (when the tokenizer has one) + text + EOS, never templated
    (qwen_chat is ignored for pretraining text), truncated at max_length and counted."""
    from pyfast_tune.demo import synth_documents

    records = synth_documents(60, seed=4)
    data = write_jsonl(tmp_path / "docs.jsonl", records)
    stats = pack(
        data, tmp_path / "p", tokenizer=generated_tokenizer, max_length=256, template="qwen_chat"
    )
    expected = reference_samples(
        records, "pretrain", "none", RefTokenizer(generated_tokenizer), 256
    )
    ds = PackedDataset(tmp_path / "p")
    assert_matches_reference(ds, expected)
    assert ds.meta["files"][0]["format"] == "pretrain"
    assert stats.truncated_samples > 0 and stats.fill > 0.9
    check_packs(ds, 256)


def test_alpaca_and_conversation_formats(tmp_path, tiny_tokenizer):
    alpaca = [
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Skip", "input": "", "output": "<nooutput>"},
    ]
    conv = [
        {
            "conversation": [
                {"system": "S", "input": "a", "output": "b", "output_with_loss": False},
                {"input": "c", "output": "d"},
            ]
        }
    ]
    write_jsonl(tmp_path / "d" / "a.jsonl", alpaca)
    write_jsonl(tmp_path / "d" / "b.jsonl", conv)
    stats = pack(
        tmp_path / "d",
        tmp_path / "p",
        tokenizer=tiny_tokenizer,
        max_length=128,
        template="internlm2_chat",
    )
    tok = RefTokenizer(tiny_tokenizer)
    expected = reference_samples(alpaca, "alpaca", "internlm2_chat", tok, 128)
    expected += reference_samples(conv, "conversation", "internlm2_chat", tok, 128)
    ds = PackedDataset(tmp_path / "p")
    assert ds.num_samples == len(expected) == 2
    for j, (_, ids, labels) in enumerate(expected):
        np.testing.assert_array_equal(ds.sample(j)["input_ids"], ids)
        np.testing.assert_array_equal(ds.sample(j)["labels"], labels)
    assert [f["format"] for f in ds.meta["files"]] == ["alpaca", "conversation"]
    assert stats.dropped_samples == 1


# --- determinism ------------------------------------------------------------------------------


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_threads_give_byte_identical_output(tmp_path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", synth_conversations(3000, seed=5))
    outs = []
    for threads in (1, 2, 3):
        out = tmp_path / f"p{threads}"
        pack(
            data,
            out,
            tokenizer=tiny_tokenizer,
            max_length=512,
            template="qwen_chat",
            threads=threads,
            seed=7,
        )
        outs.append(dir_bytes(out))
    assert outs[0] == outs[1] == outs[2]
    assert set(outs[0]) == {
        "input_ids.bin",
        "loss_mask.bin",
        "samples.bin",
        "packs.bin",
        "pack_samples.bin",
        "meta.json",
    }


def test_token_files_of_many_blocks_by_threads_give_the_bytes_of_one(
    tmp_path, tiny_tokenizer, monkeypatch
):
    """The token files are copied by one thread per range of whole 4 Mi-token blocks, written
    with O_DIRECT where the filesystem allows (aligned 1 MiB buffers, the unaligned tail
    through the page cache) and hashed in blocks folded into each file's BLAKE3; with
    PYFAST_TUNE_DIRECT_IO=0 and one thread, one range through the page cache. Same bytes either
    way, the hashes those of the files (verify), and a mix's trained tokens (each copy's as
    its part counted them when staging) those of the loss mask."""
    data = write_jsonl(tmp_path / "d.jsonl", synth_conversations(24000, seed=2))
    kw = dict(tokenizer=tiny_tokenizer, max_length=512, template="qwen_chat", seed=3)
    mix = [{"path": str(data), "name": "a", "weight": 1.5}]
    two = pack(mix, tmp_path / "direct", threads=2, **kw)
    monkeypatch.setenv("PYFAST_TUNE_DIRECT_IO", "0")
    one = pack(mix, tmp_path / "plain", threads=1, **kw)
    ids = tmp_path / "direct" / "input_ids.bin"
    assert ids.stat().st_size > 4 * (4 << 20)  # more than one block: two ranges
    assert ids.stat().st_size % 4096 != 0  # a tail too
    assert dir_bytes(tmp_path / "direct") == dir_bytes(tmp_path / "plain")
    PackedDataset(tmp_path / "direct").verify()
    mask = np.fromfile(tmp_path / "direct" / "loss_mask.bin", dtype=np.uint8)
    assert two.loss_tokens == one.loss_tokens == int(np.count_nonzero(mask)) > 0
    assert two.mix[0]["loss_tokens"] == two.loss_tokens


def test_seed_changes_order_only(tmp_path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", synth_conversations(500, seed=2))
    a = pack(data, tmp_path / "a", tokenizer=tiny_tokenizer, max_length=512, seed=0)
    b = pack(data, tmp_path / "b", tokenizer=tiny_tokenizer, max_length=512, seed=1)
    da, db = PackedDataset(tmp_path / "a"), PackedDataset(tmp_path / "b")
    assert (tmp_path / "a/input_ids.bin").read_bytes() != (
        tmp_path / "b/input_ids.bin"
    ).read_bytes()
    assert a.tokens == b.tokens and a.samples == b.samples and a.fingerprint != b.fingerprint
    for j in range(0, da.num_samples, 37):
        np.testing.assert_array_equal(da.sample(j)["input_ids"], db.sample(j)["input_ids"])


def test_fingerprint_matches_pack_and_tracks_inputs(tmp_path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", synth_conversations(50, seed=2))
    fp = fingerprint(data, tokenizer=tiny_tokenizer, max_length=256, template="qwen_chat")
    stats = pack(
        data, tmp_path / "p", tokenizer=tiny_tokenizer, max_length=256, template="qwen_chat"
    )
    assert stats.fingerprint == fp == PackedDataset(tmp_path / "p").meta["fingerprint"]
    with data.open("a") as f:
        f.write(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "x"},
                        {"role": "assistant", "content": "y"},
                    ]
                }
            )
            + "\n"
        )
    assert fingerprint(data, tokenizer=tiny_tokenizer, max_length=256, template="qwen_chat") != fp
    assert fingerprint(data, tokenizer=tiny_tokenizer, max_length=255, template="qwen_chat") != fp


# --- inputs ------------------------------------------------------------------------------------


def test_inputs_dirs_globs_compression_arrays_and_order(tmp_path, tiny_tokenizer):
    recs = synth_conversations(40, seed=9)
    root = tmp_path / "data"
    write_jsonl(root / "b" / "z.jsonl", recs[:10])
    (root / "a.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "a.json").write_text(json.dumps(recs[10:20], indent=1))
    with gzip.open(root / "b" / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs[20:30])
    import zstandard

    (root / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(
            "".join(json.dumps(r) + "\n" for r in recs[30:]).encode()
        )
    )
    pack(root, tmp_path / "p", tokenizer=tiny_tokenizer, max_length=4096)
    ds = PackedDataset(tmp_path / "p")
    assert ds.files == ["a.json", "b/a.jsonl.gz", "b/z.jsonl", "c.jsonl.zst"]
    assert [f["records"] for f in ds.meta["files"]] == [10, 10, 10, 10]
    assert ds.sample(0)["source"] == ("a.json", 0) and ds.sample(39)["source"] == ("c.jsonl.zst", 9)

    pack(str(root / "b" / "*.jsonl*"), tmp_path / "g", tokenizer=tiny_tokenizer, max_length=4096)
    assert [Path(f).name for f in PackedDataset(tmp_path / "g").files] == ["a.jsonl.gz", "z.jsonl"]

    order = root / "order.txt"
    order.write_text("c.jsonl.zst\nb/z.jsonl\n")
    pack(root, tmp_path / "o", tokenizer=tiny_tokenizer, max_length=4096, data_order=order)
    assert PackedDataset(tmp_path / "o").files == ["c.jsonl.zst", "b/z.jsonl"]
    order.write_text("../outside.jsonl\n")
    with pytest.raises(DataFormatError, match="outside|relative"):
        pack(root, tmp_path / "o2", tokenizer=tiny_tokenizer, data_order=order)


def test_jsonl_keeps_unicode_line_separators(tmp_path, tiny_tokenizer):
    rec = {"text": "one\u2028two\u2029three"}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(rec, ensure_ascii=False) + "\n")
    stats = pack(data, tmp_path / "p", tokenizer=tiny_tokenizer, max_length=64, template="none")
    assert stats.records == 1 and stats.samples == 1


# --- errors ------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def test_malformed_line_names_file_and_line(tmp_path, tiny_tokenizer):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n\n" + '{"messages": [\n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataFormatError) as e:
        pack(data, tmp_path / "p", tokenizer=tiny_tokenizer)
    assert e.value.path == str(data) and e.value.line == 3
    assert f"{data}:3" in str(e.value)
    assert not (tmp_path / "p").exists(), "no partial output"
    assert list(tmp_path.iterdir()) == [data], "staging directory removed"


def test_wrong_shape_record_names_record(tmp_path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "w.jsonl", [GOOD, {"messages": [{"role": "user", "content": 5}]}])
    with pytest.raises(
        DataFormatError, match=r"w\.jsonl:2 \(record 1\).*content.*expected a string"
    ):
        pack(data, tmp_path / "p", tokenizer=tiny_tokenizer, format="openai")
    data = write_jsonl(tmp_path / "u.jsonl", [{"question": "?"}])
    with pytest.raises(DataFormatError, match="cannot detect the format"):
        pack(data, tmp_path / "p", tokenizer=tiny_tokenizer)


def test_empty_file_and_missing_tokenizer(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataFormatError, match="empty.jsonl: empty file"):
        pack(empty, tmp_path / "p", tokenizer=tiny_tokenizer)
    good = write_jsonl(tmp_path / "g.jsonl", [GOOD])
    with pytest.raises(TokenizerError, match="nope"):
        pack(good, tmp_path / "p", tokenizer=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        pack(tmp_path / "missing.jsonl", tmp_path / "p", tokenizer=tiny_tokenizer)
    with pytest.raises(PackConfigError, match="unknown template"):
        pack(good, tmp_path / "p", tokenizer=tiny_tokenizer, template="qwen-chat")


def test_long_sample_truncated_and_counted(tmp_path, tiny_tokenizer):
    long = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "word " * 500},
        ]
    }
    data = write_jsonl(tmp_path / "l.jsonl", [GOOD, long])
    stats = pack(data, tmp_path / "p", tokenizer=tiny_tokenizer, max_length=64)
    ref = reference_samples([GOOD, long], "openai", "default", RefTokenizer(tiny_tokenizer), 10**9)
    full_len = len(ref[1][1])
    assert stats.truncated_samples == 1 and stats.truncated_tokens == full_len - 64
    ds = PackedDataset(tmp_path / "p")
    assert ds.sample(1)["input_ids"].tolist() == ref[1][1][:64]
    # samples whose trained part is entirely cut away are dropped; nothing left is an error,
    # not an empty dataset
    with pytest.raises(PackConfigError, match="no trainable samples.*2 dropped"):
        pack(data, tmp_path / "q", tokenizer=tiny_tokenizer, max_length=3)
    assert not (tmp_path / "q").exists()


def test_skip_bad_counts(tmp_path, tiny_tokenizer):
    d = tmp_path / "d"
    write_jsonl(d / "a.jsonl", [GOOD, {"messages": 3}, GOOD])
    (d / "b.jsonl").write_text('{"messages": [}\n' + json.dumps(GOOD) + "\n")
    (d / "c.jsonl").write_text("")
    with pytest.raises(DataFormatError):
        pack(d, tmp_path / "p", tokenizer=tiny_tokenizer)
    stats = pack(d, tmp_path / "p", tokenizer=tiny_tokenizer, skip_bad=True)
    assert (stats.samples, stats.skipped_records, stats.skipped_files) == (3, 2, 1)
    assert any("a.jsonl:2" in m for m in stats.skipped_examples)
    assert any("b.jsonl:1" in m for m in stats.skipped_examples)


def test_cli_pack_summary_and_errors(tmp_path, tiny_tokenizer, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synth_conversations(30, seed=1))
    rc = cli(
        [
            "pack",
            "--in",
            str(data),
            "--out",
            str(tmp_path / "p"),
            "--tokenizer",
            str(tiny_tokenizer),
            "--max-length",
            "256",
            "--template",
            "qwen_chat",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "30 samples" in out and "fill" in out and "tokens/s" in out
    assert cli(["verify", str(tmp_path / "p")]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    rc = cli(["pack", str(bad), "--out", str(tmp_path / "q"), "--tokenizer", str(tiny_tokenizer)])
    assert rc == 2 and f"{bad}:1" in capsys.readouterr().err


# --- the packed directory ----------------------------------------------------------------------


def test_fingerprint_mismatch_and_corruption_refused(tmp_path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", synth_conversations(40, seed=4))
    pack(data, tmp_path / "p", tokenizer=tiny_tokenizer, max_length=256, template="qwen_chat")
    PackedDataset(tmp_path / "p", tokenizer=tiny_tokenizer, max_length=256, template="qwen_chat")
    with pytest.raises(FingerprintMismatch, match="max_length 256"):
        PackedDataset(tmp_path / "p", max_length=512)
    with pytest.raises(FingerprintMismatch, match="template 'qwen_chat'"):
        PackedDataset(tmp_path / "p", template="default")
    other = tmp_path / "tok2"
    shutil.copytree(tiny_tokenizer, other)
    (other / "tokenizer_config.json").write_text(
        (other / "tokenizer_config.json").read_text().replace("<|im_end|>", "<|endoftext|>")
    )
    with pytest.raises(FingerprintMismatch, match="tokenizer"):
        PackedDataset(tmp_path / "p", tokenizer=other)

    ids = tmp_path / "p" / "input_ids.bin"
    raw = bytearray(ids.read_bytes())
    raw[11] ^= 0xFF
    ids.write_bytes(raw)
    PackedDataset(tmp_path / "p")  # opening is O(1): sizes only
    with pytest.raises(CorruptDataError, match="input_ids.bin.*hash"):
        PackedDataset(tmp_path / "p").verify()
    ids.write_bytes(raw[:-4])
    with pytest.raises(CorruptDataError, match="input_ids.bin"):
        PackedDataset(tmp_path / "p")


def test_output_replaced_atomically_and_foreign_dirs_refused(tmp_path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", synth_conversations(20, seed=4))
    out = tmp_path / "p"
    pack(data, out, tokenizer=tiny_tokenizer, max_length=256)
    first = PackedDataset(out).meta["fingerprint"]
    pack(data, out, tokenizer=tiny_tokenizer, max_length=300)
    assert PackedDataset(out).meta["fingerprint"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "p"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(PackConfigError, match="refusing to replace"):
        pack(data, foreign, tokenizer=tiny_tokenizer)
    assert (foreign / "notes.txt").read_text() == "keep me"
