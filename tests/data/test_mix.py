"""Mixing sources by ratio (pack(inputs=[{...}]), `pack --mix FILE`, data.inputs mappings):
exact per-source counts for weights 0.5 / 1 / 2.5 and a sample limit, per-source formats and
columns, the same bytes on any thread count and shard split, and errors that name the source.
The engine's own tests (rust/packer/tests/pack_mix.rs) check the selection rules."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyfast_tune import PackConfigError, PackedDataset, pack
from pyfast_tune.data import fingerprint, merge_packs
from pyfast_tune.demo import synth_conversations, write_jsonl


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    chats = write_jsonl(synth_conversations(120, seed=3), d / "chats" / "a.jsonl")
    write_jsonl(synth_conversations(80, seed=4), d / "chats" / "b.jsonl")
    qa = d / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."}) + "\n"
            for i in range(90)
        )
    )
    docs = d / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": f"Document {i} says the river is {i} miles long."}) + "\n"
            for i in range(40)
        )
    )
    return d, chats.parent, qa, docs


def mix_of(chats, qa, docs):
    return [
        {"path": str(chats), "name": "chats", "weight": 2.5},
        {
            "path": str(qa),
            "name": "qa",
            "format": "alpaca",
            "weight": 0.5,
            "max_samples": 60,
            "columns": {"instruction": "question", "output": "answer"},
        },
        {"path": str(docs), "name": "docs", "format": "pretrain"},
    ]


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_counts_are_exact_and_bytes_do_not_depend_on_threads_or_shards(
    sources, tiny_tokenizer, tmp_path
):
    d, chats, qa, docs = sources
    kw = dict(tokenizer=tiny_tokenizer, max_length=512, template="internlm2_chat", seed=7)
    one = pack(mix_of(chats, qa, docs), tmp_path / "one", threads=1, **kw)
    by_name = {m["name"]: m for m in one.mix}
    assert by_name["chats"]["available_samples"] == 200
    assert by_name["chats"]["samples"] == 2 * 200 + 100
    assert (by_name["qa"]["available_samples"], by_name["qa"]["distinct_samples"]) == (90, 60)
    assert by_name["qa"]["samples"] == 30
    assert by_name["docs"]["samples"] == 40
    assert one.samples == 570 and one.dropped_samples == 0
    assert sum(m["tokens"] for m in one.mix) == one.tokens
    assert sum(m["loss_tokens"] for m in one.mix) == one.loss_tokens
    assert by_name["docs"]["tokens"] == by_name["docs"]["loss_tokens"]

    ds = PackedDataset(tmp_path / "one")
    assert ds.num_samples == 570
    assert [m["samples"] for m in ds.meta["mix"]] == [500, 30, 40]
    # Every chat sample is there 2 or 3 times; 100 of the 200 three times.
    rows = [ds.sample(j)["source"] for j in range(ds.num_samples)]
    chat_rows = [r for r in rows if r[0].startswith(("a.jsonl", "b.jsonl"))]
    counts = np.unique([f"{f}:{i}" for f, i in chat_rows], return_counts=True)[1]
    assert len(counts) == 200 and sorted(set(counts)) == [2, 3] and (counts == 3).sum() == 100
    # The qa rows were remapped into alpaca: the answer is the trained text.
    qa_rows = [j for j, r in enumerate(rows) if r[0].endswith("qa.jsonl")]
    assert len(qa_rows) == 30

    assert one.fingerprint == fingerprint(mix_of(chats, qa, docs), **kw)
    two = pack(mix_of(chats, qa, docs), tmp_path / "two", threads=2, **kw)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
    assert two.fingerprint == one.fingerprint
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"part{i}")
        pack(mix_of(chats, qa, docs), parts[-1], shard=(i, 3), **kw)
    merge_packs(parts, tmp_path / "merged")
    assert files_of(tmp_path / "one") == files_of(tmp_path / "merged")
    # The merge that scales plans a mix from the parts' sample rows (file, record, trained
    # tokens) alone: copies of one staged sample read its tokens again; the per-source
    # statistics come out the same without a token read.
    from pyfast_tune.data.executor import merge_ranged, write_range

    ranged, steps = merge_ranged(parts, tmp_path / "ranged", 3,
                                 lambda st, k: [write_range(st, i) for i in range(k)],
                                 block_tokens=1024)  # fmt: skip
    assert steps["write"] > 0  # planned from lengths, not merged serially
    assert files_of(tmp_path / "one") == files_of(tmp_path / "ranged")
    assert (ranged.mix, ranged.loss_tokens, ranged.samples) == (one.mix, one.loss_tokens, 570)

    heavier = mix_of(chats, qa, docs)
    heavier[1]["max_samples"] = 61
    assert fingerprint(heavier, **kw) != one.fingerprint


def test_weight_one_without_limits_is_every_sample_once(sources, tiny_tokenizer, tmp_path):
    d, chats, qa, docs = sources
    kw = dict(tokenizer=tiny_tokenizer, max_length=512, template="internlm2_chat")
    plain = pack([chats], tmp_path / "plain", **kw)
    mixed = pack([{"path": str(chats)}], tmp_path / "mixed", **kw)
    assert mixed.samples == plain.samples and mixed.tokens == plain.tokens
    a, b = PackedDataset(tmp_path / "plain"), PackedDataset(tmp_path / "mixed")
    assert sorted(a.sample(j)["source"] for j in range(a.num_samples)) == sorted(
        b.sample(j)["source"] for j in range(b.num_samples)
    )


def test_cli_mix_file_equals_the_library(sources, tiny_tokenizer, tmp_path):
    d, chats, qa, docs = sources
    kw = dict(tokenizer=tiny_tokenizer, max_length=512, template="internlm2_chat", seed=7)
    lib = pack(mix_of(chats, qa, docs), tmp_path / "lib", **kw)
    # Relative paths in a mix file are relative to the file.
    mix_file = d / "mix.yaml"
    mix_file.write_text(
        "sources:\n"
        "  - {path: chats, name: chats, weight: 2.5}\n"
        "  - path: qa.jsonl\n    name: qa\n    format: alpaca\n    weight: 0.5\n"
        "    max_samples: 60\n    columns: {instruction: question, output: answer}\n"
        "  - {path: docs.jsonl, name: docs, format: pretrain}\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyfast_tune.cli",
            "pack",
            "--mix",
            str(mix_file),
            "--out",
            str(tmp_path / "cli"),
            "--tokenizer",
            str(tiny_tokenizer),
            "--max-length",
            "512",
            "--template",
            "internlm2_chat",
            "--seed",
            "7",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert files_of(tmp_path / "lib") == files_of(tmp_path / "cli")
    assert "qa: 30 samples (60 distinct of 90, weight 0.5)" in out, out
    assert lib.mix[1]["samples"] == 30
    shown = subprocess.run(
        [sys.executable, "-m", "pyfast_tune.cli", "inspect", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "qa: weight 0.5, max_samples 60: 30 samples (60 distinct of 90)" in shown, shown


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m[1].update(wieght=2), "unknown keys ['wieght']"),
        (lambda m: m[1].update(weight="lots"), "mix source 1: weight must be a number"),
        (lambda m: m[1].update(weight=0), 'mix source 1 ("qa"): weight must be'),
        (lambda m: m[2].update(template="qwen_chat"), "one pack has one template"),
        (lambda m: m[2].update(format="nope"), 'unknown format "nope"'),
        (lambda m: m[2].update(path=m[0]["path"]), "is an input of mix sources 0"),
        (lambda m: m[2].pop("path"), "mix source 2: no path"),
        (lambda m: m[2].update(split="train"), "split and subset choose the files"),
    ],
)
def test_errors_name_the_source(sources, tiny_tokenizer, tmp_path, change, message):
    d, chats, qa, docs = sources
    mix = mix_of(chats, qa, docs)
    change(mix)
    with pytest.raises(PackConfigError, match=None) as e:
        pack(mix, tmp_path / "out", tokenizer=tiny_tokenizer, template="internlm2_chat")
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_mix_takes_no_data_order_or_map_fn(sources, tiny_tokenizer, tmp_path):
    d, chats, qa, docs = sources
    with pytest.raises(PackConfigError, match="data-order file or a map_fn"):
        pack(mix_of(chats, qa, docs), tmp_path / "o", tokenizer=tiny_tokenizer, map_fn=lambda r: r)
