"""Tests about the real corpora and tokenizers of ../shared/data: XTuner-exact encoding of
real chats and documents with the Qwen3 and SmolLM2 tokenizers, fill on a real length
distribution, their own Jinja chat templates, InternEVO data made from real chats.

The same code paths run on generated data and a tokenizer trained in the session in
test_pack.py, test_hf_template.py and test_pretok.py, so a clone without ../shared loses only
the real-data evidence: this module then skips once, with the reason.
"""

from __future__ import annotations

import json

import pytest
from conftest import NO_SHARED, SHARED, shared_path

if not SHARED.exists():
    pytest.skip(
        f"{NO_SHARED}; every test in this module is about the real corpora or tokenizers",
        allow_module_level=True,
    )

from test_hf_template import HAND_MADE, check, pack_with_hf_template  # noqa: E402
from test_pack import (  # noqa: E402
    TEMPLATES,
    assert_matches_reference,
    check_packs,
    read_jsonl,
    write_jsonl,
)
from test_pretok import internevo_round_trip  # noqa: E402
from xtuner_ref import RefTokenizer, reference_samples  # noqa: E402

from pyfast_tune.data import PackedDataset, pack  # noqa: E402

# --- XTuner semantics on real tokenizers and data -------------------------------------------


@pytest.mark.parametrize("tokenizer", ["qwen3", "smollm2"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_chitchat_matches_xtuner_encode_fn(tmp_path, tokenizer, template):
    tok_dir = shared_path("tokenizers", tokenizer)
    records = read_jsonl(shared_path("chitchat.jsonl"), 150)
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    # 512 truncates some chats, so truncation is checked too.
    for max_length in (4096, 512):
        out = tmp_path / f"packed{max_length}"
        stats = pack(data, out, tokenizer=tok_dir, max_length=max_length, template=template)
        expected = reference_samples(records, "openai", template, RefTokenizer(tok_dir), max_length)
        ds = PackedDataset(out, tokenizer=tok_dir, max_length=max_length, template=template)
        assert_matches_reference(ds, expected)
        assert stats.samples == len(expected) and stats.split_samples == 0
    assert stats.truncated_samples > 0


@pytest.mark.parametrize("tokenizer", ["qwen3", "smollm2"])
def test_pydoc_pretrain_matches_xtuner(tmp_path, tokenizer):
    tok_dir = shared_path("tokenizers", tokenizer)
    records = read_jsonl(shared_path("pydoc.jsonl"), 40)
    data = write_jsonl(tmp_path / "docs.jsonl", records)
    stats = pack(data, tmp_path / "p", tokenizer=tok_dir, max_length=4096, template="qwen_chat")
    expected = reference_samples(records, "pretrain", "none", RefTokenizer(tok_dir), 4096)
    ds = PackedDataset(tmp_path / "p")
    assert_matches_reference(ds, expected)
    assert ds.meta["files"][0]["format"] == "pretrain"
    assert stats.truncated_samples > 0 and stats.fill > 0.9
    check_packs(ds, 4096)


def test_chitchat_fill_and_no_split(tmp_path):
    tok_dir = shared_path("tokenizers", "smollm2")
    data = shared_path("chitchat.jsonl")
    stats = pack(data, tmp_path / "p", tokenizer=tok_dir, max_length=4096, template="qwen_chat")
    ds = PackedDataset(tmp_path / "p")
    report = ds.verify()
    assert report["split_samples"] == 0 and stats.split_samples == 0
    assert stats.fill >= 0.998, stats.summary()
    assert stats.records == 4017 == stats.samples + stats.dropped_samples + stats.skipped_records


# --- the real tokenizers' own chat templates (--template hf) ---------------------------------


@pytest.mark.parametrize("name", ["qwen3", "smollm2"])
def test_render_equals_apply_chat_template_hand_made(name):
    tok_dir = shared_path("tokenizers", name)
    for trained, want in check(tok_dir, HAND_MADE):
        if name == "smollm2":  # copies content verbatim: the trained text is exactly it
            assert trained == want


@pytest.mark.parametrize("name", ["qwen3", "smollm2"])
def test_render_equals_apply_chat_template_on_shared_chats(name):
    tok_dir = shared_path("tokenizers", name)
    chats = shared_path("chitchat.jsonl").read_text().splitlines()[:200]
    check(tok_dir, [json.loads(line)["messages"] for line in chats])


def test_pack_with_hf_template(tmp_path):
    records = [json.loads(x) for x in shared_path("chitchat.jsonl").read_text().splitlines()[:80]]
    pack_with_hf_template(tmp_path, shared_path("tokenizers", "qwen3"), records)


# --- pre-tokenized InternEVO data made from real chats ---------------------------------------


def test_internevo_from_tokenized_shared_data(tmp_path):
    tok_dir = shared_path("tokenizers", "qwen3")
    records = [json.loads(x) for x in shared_path("chitchat.jsonl").read_text().splitlines()[:400]]
    internevo_round_trip(tmp_path, tok_dir, records)
