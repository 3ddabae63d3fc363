"""Preference pairs packed as one unit: every input form (TRL conversational, standard strings,
implicit prompt, column map) gives the ids and labels of an independent computation — XTuner's
encode_fn over hand-built turns (tests/data/xtuner_ref.py) for an XTuner template, transformers'
``apply_chat_template`` for ``--template hf`` — and the pairs are adjacent in one pack, with
pair id and role read from ``pairs.bin``."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pyfast_tune.data import PackedDataset, pack
from pyfast_tune.inspect_data import render_sample

sys.path.insert(0, str(Path(__file__).parent))
from xtuner_ref import TEMPLATES, RefTokenizer, encode_fn, template_map_fn  # noqa: E402

S, Q1, A1, Q2 = "Be brief.", "the red cat", "it sleeps", "where does it run"
# "<|endoftext|>" is id 0 of the tiny tokenizer (as Qwen's "!" is): trained like any id.
C, R = "far away<|endoftext|> ok", "nowhere"


def msg(role, content):
    return {"role": role, "content": content}


# Each form as a record, and the turns (system, input, output, trained) it means.
FORMS = {
    "conversational": (
        {
            "prompt": [msg("system", S), msg("user", Q1), msg("assistant", A1), msg("user", Q2)],
            "chosen": [msg("assistant", C)],
            "rejected": [msg("assistant", R)],
        },
        [(S, Q1, A1, False), ("", Q2, None, True)],
        None,
    ),
    "standard": ({"prompt": Q2, "chosen": C, "rejected": R}, [("", Q2, None, True)], None),
    "implicit": (
        {
            "chosen": [msg("user", Q1), msg("assistant", A1), msg("user", Q2), msg("assistant", C)],
            "rejected": [
                msg("user", Q1),
                msg("assistant", A1),
                msg("user", Q2),
                msg("assistant", R),
            ],
        },
        [("", Q1, A1, False), ("", Q2, None, True)],
        None,
    ),
    "columns": (
        {"system": S, "question": Q2, "chosen": C, "rejected": R},
        [(S, Q2, None, True)],
        "prompt=question",
    ),
}


def xtuner_expected(turns, completion, tok_dir, template):
    conv = [
        {"system": s, "input": i, "output": completion if o is None else o, "output_with_loss": t}
        for s, i, o, t in turns
    ]
    conv = template_map_fn({"conversation": conv}, TEMPLATES[template])
    enc = encode_fn(conv, RefTokenizer(tok_dir), 10**9)
    return enc["input_ids"], enc["labels"]


@functools.cache
def load_hf(path):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def hf_expected(turns, completion, tok_dir):
    """transformers' rendering; labels: the completion's content and the <|im_end|> after it."""
    hf = load_hf(tok_dir)
    messages = []
    for s, i, o, _ in turns:
        if s:
            messages.append(msg("system", s))
        messages += [msg("user", i), msg("assistant", completion if o is None else o)]
    text = hf.apply_chat_template(messages, tokenize=False)
    start = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    end = start + len(completion) + len("<|im_end|>")
    assert text[start:end] == completion + "<|im_end|>"
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [i if a < end and b > start else -100 for i, (a, b) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def pack_form(tmp_path, form, tok_dir, template, n=6):
    record, turns, columns = FORMS[form]
    data = tmp_path / f"{form}.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for _ in range(n)))
    out = tmp_path / f"{form}-{template}"
    opts = {"columns": columns} if columns else {}
    st = pack(data, out, tokenizer=tok_dir, max_length=4096, template=template, **opts)
    return st, PackedDataset(out), turns


def check_pairs_adjacent(ds):
    """Every pair id names a chosen then a rejected sample, adjacent in one pack."""
    assert ds.pairs is not None and ds.pairs.shape == (ds.num_samples, 2)
    for pair in np.unique(ds.pairs[:, 0]):
        members = np.flatnonzero(ds.pairs[:, 0] == pair)
        assert len(members) == 2
        c, r = sorted(members, key=lambda k: ds.pairs[k, 1])
        assert (ds.pairs[c, 1], ds.pairs[r, 1]) == (0, 1)
        assert ds.samples[c, 2] == ds.samples[r, 2], "pair split across packs"
        assert ds.samples[c, 0] + ds.samples[c, 1] == ds.samples[r, 0], "not adjacent"


@pytest.mark.parametrize("form", sorted(FORMS))
def test_forms_with_an_xtuner_template(tmp_path, tiny_tokenizer, form):
    st, ds, turns = pack_form(tmp_path, form, tiny_tokenizer, "qwen_chat")
    assert (st.pairs, st.samples, st.dropped_pairs, st.truncated_pairs) == (6, 12, 0, 0)
    assert ds.meta["outputs"]["pairs.bin"]["size"] == 12 * 16
    check_pairs_adjacent(ds)
    assert ds.verify()["pairs"] == 6
    assert ds.meta["files"][0]["format"] == "preference"  # found by format="auto"
    for j in range(ds.num_samples):
        s = ds.sample(j)
        completion = C if s["role"] == "chosen" else R
        ids, labels = xtuner_expected(turns, completion, tiny_tokenizer, "qwen_chat")
        np.testing.assert_array_equal(s["input_ids"], ids)
        np.testing.assert_array_equal(s["labels"], labels)
    chosen = ds.sample(int(np.flatnonzero(ds.pairs[:, 1] == 0)[0]))
    assert 0 in chosen["labels"][chosen["labels"] != -100], "id 0 in a completion is trained"


@pytest.mark.parametrize("form", sorted(FORMS))
def test_forms_with_the_hf_template(tmp_path, tiny_tokenizer, form):
    st, ds, turns = pack_form(tmp_path, form, tiny_tokenizer, "hf")
    assert (st.pairs, st.samples) == (6, 12)
    check_pairs_adjacent(ds)
    for j in (0, 1, 11):
        s = ds.sample(j)
        ids, labels = hf_expected(turns, C if s["role"] == "chosen" else R, tiny_tokenizer)
        np.testing.assert_array_equal(s["input_ids"], ids)
        np.testing.assert_array_equal(s["labels"], labels)


def test_long_pairs_are_cut_or_dropped_and_counted(tmp_path, tiny_tokenizer):
    tok = RefTokenizer(tiny_tokenizer)
    long = " ".join(["the red cat runs far"] * 40)
    records = [
        {"prompt": Q2, "chosen": C, "rejected": R},  # fits
        {"prompt": Q2, "chosen": long, "rejected": R},  # chosen cut
        {"prompt": long, "chosen": C, "rejected": R},  # two prompts cannot fit: dropped
    ]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    max_length = 2 * len(tok.encode(long)) // 3
    st = pack(
        data, tmp_path / "o", tokenizer=tiny_tokenizer, max_length=max_length, template="qwen_chat"
    )
    assert (st.records, st.pairs, st.truncated_pairs, st.dropped_pairs) == (3, 2, 1, 1)
    assert (st.samples, st.truncated_samples, st.dropped_samples) == (4, 1, 2)
    ds = PackedDataset(tmp_path / "o")
    check_pairs_adjacent(ds)
    cut = [j for j in range(4) if ds.sample(j)["source"][1] == 1]
    c, r = (ds.sample(j) for j in cut)
    assert len(c["input_ids"]) + len(r["input_ids"]) == max_length
    full, _ = xtuner_expected([("", Q2, None, True)], long, tiny_tokenizer, "qwen_chat")
    np.testing.assert_array_equal(c["input_ids"], full[: len(c["input_ids"])])
    assert st.truncated_tokens == len(full) - len(c["input_ids"])


def test_inspect_shows_both_sides_marked(tmp_path, tiny_tokenizer):
    _, ds, _ = pack_form(tmp_path, "standard", tiny_tokenizer, "qwen_chat", n=2)
    text = render_sample(ds, 3)
    assert text.startswith("pair 1:")
    chosen_at, rejected_at = text.index("chosen sample 2"), text.index("rejected sample 3")
    assert chosen_at < rejected_at
    assert f"⟦{C}<|im_end|>⟧" in text and f"⟦{R}<|im_end|>⟧" in text


def test_sft_packs_have_no_pairs(tmp_path, tiny_tokenizer):
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": [msg("user", Q2), msg("assistant", C)]}) + "\n")
    st = pack(data, tmp_path / "o", tokenizer=tiny_tokenizer, template="qwen_chat")
    ds = PackedDataset(tmp_path / "o")
    assert ds.pairs is None and "pair" not in ds.sample(0) and st.pairs == 0
    assert "pairs" not in ds.meta["stats"] and "pairs.bin" not in ds.meta["outputs"]


def test_margins_survive_shards_and_merge(tmp_path, tiny_tokenizer):
    """Pairs with a `margin`: margins.bin (per sample, its pair's) from 2 shards merged is
    byte-identical to one pack's; pairs without one hold 0."""
    from pyfast_tune.data import merge_packs

    src = tmp_path / "data"
    src.mkdir()
    for f in range(2):
        rows = [{"prompt": f"question {f} {i}", "chosen": "yes " * (1 + i % 4),
                 "rejected": "no", **({"margin": i / 4} if i % 2 else {})}
                for i in range(12)]  # fmt: skip
        (src / f"p{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(tokenizer=tiny_tokenizer, max_length=64, format="preference", seed=3)
    pack([src], tmp_path / "one", **kw)
    for i in range(2):
        pack([src], tmp_path / f"part{i}", shard=(i, 2), **kw)
    merge_packs([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    for name in ("margins.bin", "pairs.bin", "samples.bin", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes()
    # The merge that scales plans pairs from lengths too (a pair is the unit of a pack).
    from pyfast_tune.data.executor import merge_ranged, write_range

    _, steps = merge_ranged([tmp_path / "part0", tmp_path / "part1"], tmp_path / "ranged", 2,
                            lambda st, k: [write_range(st, i) for i in range(k)],
                            block_tokens=1024)  # fmt: skip
    assert steps["write"] > 0  # not merged serially
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ranged").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ranged" / name).read_bytes()
    ds = PackedDataset(tmp_path / "merged")
    samples = np.asarray(ds.samples)
    expect = [(r % 2) * r / 4 for r in samples[:, 4]]
    assert ds.margins.tolist() == pytest.approx(expect)
    assert ds.verify()["ok"]


def test_a_column_map_names_the_margin(tmp_path, tiny_tokenizer):
    src = tmp_path / "scored.jsonl"
    src.write_text(json.dumps({"question": "q", "chosen": "a", "rejected": "b", "score": 0.5}))
    pack([src], tmp_path / "out", tokenizer=tiny_tokenizer, max_length=64, format="preference",
         columns={"prompt": "question", "margin": "score"})  # fmt: skip
    ds = PackedDataset(tmp_path / "out")
    assert ds.margins.tolist() == [0.5, 0.5]
    assert render_sample(ds, 1).startswith("pair 0 (margin 0.5):")  # inspect shows it
