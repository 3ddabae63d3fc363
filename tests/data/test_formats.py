"""XTuner 0.2.0's instruction formats against an independent Python statement of its map_fns,
template_map_fn and encode_fn (tests/data/xtuner_ref.py), on hand-made records that reach every
branch, under every prompt template; plus auto detection, column remapping, the Python map_fn
slow path, LLaVA's image side table, and the shared data turned into alpaca/ShareGPT records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_cases
from xtuner_ref import TEMPLATES, RefTokenizer, reference_samples

from pyfast_tune.cli import main as cli
from pyfast_tune.data import DataFormatError, PackedDataset, formats, pack, templates

IGNORE = -100


# Hand-made records per format; together they reach every branch of the map_fns.
RECORDS = {
    "alpaca_zh": [
        {"instruction_zh": "把它翻译", "input_zh": "", "output_zh": "好的"},
        {"instruction_zh": "加", "input_zh": "1+1", "output_zh": "<nooutput>"},
    ],
    "oasst1": [
        {
            "text": "### Human: Can you explain tides? ### Assistant: The moon pulls. "
            "### Human: More? ### Assistant:  Also the sun.  "
        },
        {"text": " ### Human: dangling question only? "},  # odd: input dropped → no turn
        {"text": "### Assistant: leading assistant ### Human: hi ### Assistant: hello ### note"},
        {"text": "junk without markers"},
    ],
    "code_alpaca": [{"prompt": "Reverse a list", "completion": "xs[::-1]"}],
    "medical": [
        {"instruction": "头痛怎么办", "input": "三天了", "output": "多休息"},
        {"instruction": "发烧", "input": None, "output": "量体温"},
    ],
    "tiny_codes": [{"prompt": "fizzbuzz in rust", "response": "fn main() {}"}],
    "default": [{"input": "ping", "output": "pong"}, {"input": "", "output": "empty input"}],
    "wizardlm": [
        {
            "conversations": [
                {"from": "gpt", "value": "lead"},
                {"from": "gpt", "value": None},  # leading gpt messages are not read
                {"from": "human", "value": "q1"},
                {"from": "gpt", "value": "a1"},
                {"from": "human", "value": "q2 part one. "},
                {"from": "human", "value": "Part two"},  # joined with no separator
                {"from": "gpt", "value": "a2"},
                {"from": "gpt", "value": "a3"},  # a turn with an empty input
                {"from": "human", "value": "tail"},  # dropped
            ]
        },
        {"conversations": [{"from": "human", "value": "only"}]},
        {"conversations": []},
    ],
    "alpaca": [
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Add", "input": "1+1", "output": "2"},
        {"instruction": "Drop me", "input": "", "output": "<nooutput>"},
        {"instruction": "Null input", "input": None, "output": "reads None"},
    ],
    "openai": [
        {
            "messages": [
                {"role": "assistant", "content": "skipped"},
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "untrained", "loss": "False"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "null loss is no loss", "loss": None},
                {"role": "user", "content": "d"},
                {"role": "assistant", "content": "trained", "loss": "TRUE"},
                {"role": "user", "content": "dangling"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": None},
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y"},
            ]
        },
    ],
    "conversation": [
        {
            "conversation": [
                {"system": "S", "input": "a", "output": "b"},
                {"input": None, "output": "c", "output_with_loss": "false"},  # truthy
                {"input": "d", "output": "e", "output_with_loss": 0},
            ]
        },
        {"conversation": [{"system": None, "input": "q", "output": "o", "output_with_loss": None}]},
    ],
    "openorca": [
        {"system_prompt": "", "question": "Empty system", "response": "ok"},
        {"system_prompt": "You are terse.", "question": "Why?", "response": "Because."},
    ],
    "stack_exchange": [{"question": "How to exit vim?", "response": ":q"}],
    "arxiv": [{"abstract": "We pack samples.", "title": "Packing"}],
    "colors": [
        {"description": "Color: a calm, deep blue: like ink ", "color": "#123456"},
        {"description": "no colon here", "color": "#000000"},
    ],
    "law_reference": [{"question": "合同无效吗", "answer": "视情况"}],
    "crime_kg_assitant": [{"input": "盗窃罪", "output": "刑法第264条"}],
    "sql": [
        {
            "context": "CREATE TABLE t (a INT)",
            "question": "Count rows",
            "answer": "SELECT COUNT(*) FROM t",
        }
    ],
    "llava": [
        {
            "image": "coco/1.jpg",
            "conversations": [
                {"from": "gpt", "value": "skip me"},
                {"from": "human", "value": "What is shown?\n<image> "},
                {"from": "gpt", "value": "A cat."},
                {"from": "human", "value": "Color?"},
                {"from": "gpt", "value": "Grey."},
            ],
        },
        {
            "conversations": [
                {"from": "human", "value": "text only"},
                {"from": "gpt", "value": "ok"},
            ]
        },
    ],
}


def reference(records, fmt, template, tok, max_length=10**9):
    return reference_samples(records, fmt, template, tok, max_length)


def assert_same(ds: PackedDataset, expected, what):
    assert ds.num_samples == len(expected), what
    for j, (idx, ids, labels) in enumerate(expected):
        s = ds.sample(j)
        assert s["source"][1] == idx, what
        np.testing.assert_array_equal(s["input_ids"], ids, err_msg=f"{what} record {idx}")
        np.testing.assert_array_equal(s["labels"], labels, err_msg=f"{what} record {idx} labels")


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# Every format under four templates (EOS vs SUFFIX_AS_EOS, SUFFIX + EOS, {round}); llava's
# image splitting once.
CASES = [
    (f, t)
    for f in sorted(RECORDS)
    if f != "llava"
    for t in ("qwen_chat", "default", "gemma", "chatglm2")
] + [("llava", "qwen_chat")]


@pytest.mark.parametrize(("fmt", "template"), CASES)
def test_format_matches_xtuner(tmp_path, tiny_tokenizer, fmt, template):
    records = RECORDS[fmt]
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", records)
    stats = pack(
        data,
        tmp_path / "p",
        tokenizer=tiny_tokenizer,
        max_length=4096,
        format=fmt,
        template=template,
    )
    expected = reference(records, fmt, template, RefTokenizer(tiny_tokenizer))
    assert stats.samples == len(expected)
    assert stats.samples + stats.dropped_samples == len(records)
    assert_same(PackedDataset(tmp_path / "p"), expected, f"{fmt}/{template}")


def test_alpaca_zh_keeps_nooutput_but_alpaca_drops_it(tmp_path, tiny_tokenizer):
    zh = write_jsonl(tmp_path / "zh.jsonl", RECORDS["alpaca_zh"])
    assert pack(zh, tmp_path / "a", tokenizer=tiny_tokenizer, format="alpaca_zh").samples == 2
    en = write_jsonl(
        tmp_path / "en.jsonl",
        [
            {"instruction": "I", "input": "", "output": "<nooutput>"},
            {"instruction": "I", "input": "", "output": "O"},
        ],
    )
    st = pack(en, tmp_path / "b", tokenizer=tiny_tokenizer, format="alpaca")
    assert (st.samples, st.dropped_samples) == (1, 1)


def test_llava_image_table(tmp_path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "llava.jsonl", RECORDS["llava"])
    pack(data, tmp_path / "p", tokenizer=tiny_tokenizer, format="auto", template="qwen_chat")
    ds = PackedDataset(tmp_path / "p")
    assert ds.meta["files"][0]["format"] == "llava"
    table = json.loads((tmp_path / "p" / "images.json").read_text())
    s0, s1 = ds.sample(0), ds.sample(1)
    position = int(np.flatnonzero(s0["input_ids"] == -200)[0])  # recorded beside the path
    assert table == {"image_token_id": 0xFFFFFF38, "samples": [[0, "coco/1.jpg", position]]}
    assert s0["image"] == "coco/1.jpg" and s1["image"] is None
    assert (s0["input_ids"] == -200).sum() == 1 and (s1["input_ids"] == -200).sum() == 0
    assert s0["labels"][s0["input_ids"] == -200].tolist() == [IGNORE]
    assert "images.json" in ds.meta["outputs"]
    ds.verify()
    two = write_jsonl(
        tmp_path / "two.jsonl",
        [
            {
                "image": "x.jpg",
                "conversations": [
                    {"from": "human", "value": "<image> a"},
                    {"from": "gpt", "value": "b"},
                    {"from": "human", "value": "again <image>"},
                    {"from": "gpt", "value": "c"},
                ],
            }
        ],
    )
    # one <image> per turn input is fine; two in one input is XTuner's assertion error
    pack(two, tmp_path / "q", tokenizer=tiny_tokenizer, format="llava")
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {
                "image": "x.jpg",
                "conversations": [
                    {"from": "human", "value": "<image> a"},
                    {"from": "human", "value": "<image> b"},
                    {"from": "gpt", "value": "c"},
                ],
            }
        ],
    )
    with pytest.raises(DataFormatError, match="more than one <image>"):
        pack(bad, tmp_path / "r", tokenizer=tiny_tokenizer, format="llava")


AUTO = {
    "conversation": {"conversation": [{"input": "a", "output": "b"}]},
    "openai": {
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    },
    "llava": {
        "image": "i.jpg",
        "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
    },
    "wizardlm": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    "alpaca_zh": {"instruction_zh": "a", "input_zh": "", "output_zh": "b"},
    "alpaca": {"instruction": "a", "input": "", "output": "b"},
    "openorca": {"system_prompt": "", "question": "a", "response": "b"},
    "stack_exchange": {"question": "a", "response": "b"},
    "sql": {"context": "c", "question": "a", "answer": "b"},
    "law_reference": {"question": "a", "answer": "b"},
    "code_alpaca": {"prompt": "a", "completion": "b"},
    "tiny_codes": {"prompt": "a", "response": "b"},
    "arxiv": {"abstract": "a", "title": "b"},
    "colors": {"description": "x: a", "color": "b"},
    "default": {"input": "a", "output": "b"},
    "pretrain": {"text": "a b"},
}


def test_auto_detects_every_format_by_columns(tmp_path, tiny_tokenizer):
    d = tmp_path / "d"
    for name, rec in AUTO.items():
        write_jsonl(d / f"{name}.jsonl", [rec])
    pack(d, tmp_path / "p", tokenizer=tiny_tokenizer, format="auto", template="qwen_chat")
    got = {Path(f["name"]).stem: f["format"] for f in PackedDataset(tmp_path / "p").meta["files"]}
    assert got == {k: k for k in AUTO}
    # preference is auto-detected too, but pairs cannot share a run with single samples:
    # tests/data/test_preference_pack.py packs it with format="auto".
    assert set(AUTO) | {"auto", "medical", "oasst1", "crime_kg_assitant", "preference"} == set(
        formats()
    )


def test_columns_remap_without_code(tmp_path, tiny_tokenizer):
    recs = [{"question": "What is 2+2?", "context": "", "answer": "4", "id": 7}]
    data = write_jsonl(tmp_path / "qa.jsonl", recs)
    pack(
        data,
        tmp_path / "p",
        tokenizer=tiny_tokenizer,
        format="alpaca",
        template="qwen_chat",
        columns="instruction=question,input=context,output=answer",
    )
    alp = [{"instruction": "What is 2+2?", "input": "", "output": "4"}]
    data2 = write_jsonl(tmp_path / "alpaca.jsonl", alp)
    pack(data2, tmp_path / "q", tokenizer=tiny_tokenizer, format="alpaca", template="qwen_chat")
    a, b = PackedDataset(tmp_path / "p"), PackedDataset(tmp_path / "q")
    np.testing.assert_array_equal(a.sample(0)["input_ids"], b.sample(0)["input_ids"])
    np.testing.assert_array_equal(a.sample(0)["labels"], b.sample(0)["labels"])
    # remapping is a determinant of the bytes: it is in the fingerprint
    assert (
        a.meta["fingerprint_inputs"]["columns"]
        == "instruction=question,input=context,output=answer"
    )
    # auto detection sees the remapped columns; the CLI takes the same flag
    rc = cli(
        [
            "pack",
            str(data),
            "--out",
            str(tmp_path / "c"),
            "--tokenizer",
            str(tiny_tokenizer),
            "--columns",
            "instruction=question,input=context,output=answer",
            "--template",
            "qwen_chat",
            "--quiet",
        ]
    )
    assert rc == 0
    assert PackedDataset(tmp_path / "c").meta["files"][0]["format"] == "alpaca"
    with pytest.raises(Exception, match="FIELD=COLUMN"):
        pack(data, tmp_path / "x", tokenizer=tiny_tokenizer, columns="nonsense")


def test_python_map_fn_slow_path(tmp_path, tiny_tokenizer):
    recs = [{"q": "hi", "a": "hello"}, {"q": "drop me", "a": ""}, {"q": "bye", "a": "ciao"}]
    data = write_jsonl(tmp_path / "custom.jsonl", recs)

    def to_conv(r):
        if not r["a"]:
            return None
        return {"conversation": [{"input": r["q"], "output": r["a"]}]}

    st = pack(
        data,
        tmp_path / "p",
        tokenizer=tiny_tokenizer,
        format="conversation",
        template="qwen_chat",
        map_fn=to_conv,
    )
    assert (st.samples, st.dropped_samples) == (2, 1)
    ds = PackedDataset(tmp_path / "p")
    # record indices and the file name survive the detour through Python
    assert [ds.sample(j)["source"][1] for j in range(2)] == [0, 2]
    assert ds.sample(0)["source"][0].endswith("custom.jsonl")
    as_default = [{"input": r["q"], "output": r["a"]} for r in (recs[0], recs[2])]
    expected = reference(as_default, "default", "qwen_chat", RefTokenizer(tiny_tokenizer))
    np.testing.assert_array_equal(ds.sample(1)["input_ids"], expected[1][1])


def test_wizardlm_unknown_from_is_a_named_record_error(tmp_path, tiny_tokenizer):
    two_humans = {
        "conversations": [
            {"from": "human", "value": "a"},
            {"from": "human", "value": "b"},
            {"from": "gpt", "value": "c"},
        ]
    }
    system = {
        "conversations": [
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
            {"from": "system", "value": "s"},
        ]
    }
    bad = write_jsonl(tmp_path / "w.jsonl", [two_humans, system])
    with pytest.raises(
        DataFormatError, match=r'w.jsonl:2 \(record 1\).*conversations\[2\].*"system"'
    ):
        pack(bad, tmp_path / "p", tokenizer=tiny_tokenizer, format="wizardlm")
    st = pack(bad, tmp_path / "p", tokenizer=tiny_tokenizer, format="sharegpt", skip_bad=True)
    assert (st.samples, st.skipped_records) == (1, 1)
    # two human messages in a row are one input, as in XTuner
    tok = RefTokenizer(tiny_tokenizer)
    ds = PackedDataset(tmp_path / "p")
    want = tok.encode("<|User|>:ab\n<|Bot|>:")
    assert ds.sample(0)["input_ids"][: len(want)].tolist() == want


def test_alpaca_has_no_system_prompt(tmp_path, tiny_tokenizer):
    """XTuner removed the task system prompt from alpaca_map_fn; a sample must equal the
    default format's {"input": f"{instruction}\\n{input}"}."""
    recs = [{"instruction": "Say hi", "input": "politely", "output": "Hello."}]
    pack(write_jsonl(tmp_path / "a.jsonl", recs), tmp_path / "a", tokenizer=tiny_tokenizer,
         format="alpaca", template="default")  # fmt: skip
    same = [{"input": "Say hi\npolitely", "output": "Hello."}]
    pack(write_jsonl(tmp_path / "d.jsonl", same), tmp_path / "d", tokenizer=tiny_tokenizer,
         format="default", template="default")  # fmt: skip
    a, d = PackedDataset(tmp_path / "a").sample(0), PackedDataset(tmp_path / "d").sample(0)
    np.testing.assert_array_equal(a["input_ids"], d["input_ids"])
    np.testing.assert_array_equal(a["labels"], d["labels"])
    assert not RefTokenizer(tiny_tokenizer).tok.decode(a["input_ids"].tolist()).count("<|System|>")


def test_templates_are_xtuners(tmp_path):
    """Every PROMPT_TEMPLATE entry of XTuner 0.2.0, string for string, and nothing else."""
    ours = {t["name"]: t for t in templates()}
    assert set(ours) == set(TEMPLATES)
    for name, x in TEMPLATES.items():
        t = ours[name]
        got = (t["system"], t["instruction"], t["suffix"], t["suffix_as_eos"], t["sep"])
        want = (
            x.get("SYSTEM"),
            x["INSTRUCTION"],
            x.get("SUFFIX", ""),
            x.get("SUFFIX_AS_EOS", False),
            x.get("SEP", ""),
        )
        assert got == want, name
        assert t["stop_words"] == x.get("STOP_WORDS", []), name


MULTI_TURN = [
    {
        "conversation": [
            {"system": "Be brief.", "input": "Hi {round} {input}", "output": "Hello"},
            {"input": "Again", "output": "Sure"},
        ]
    },
    {"conversation": [{"input": "One", "output": "Two"}]},
]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_encodes_like_xtuner(tmp_path, tiny_tokenizer, template):
    records = MULTI_TURN
    if "SYSTEM" not in TEMPLATES[template]:
        # XTuner's template_map_fn fails on a system text under a template without SYSTEM
        data = write_jsonl(tmp_path / "sys.jsonl", records)
        with pytest.raises(DataFormatError, match=rf"record 0\).*{template}.*no SYSTEM"):
            pack(data, tmp_path / "x", tokenizer=tiny_tokenizer, format="conversation",
                 template=template)  # fmt: skip
        records = [{"conversation": [dict(t, system="") for t in r["conversation"]]}
                   for r in records]  # fmt: skip
    data = write_jsonl(tmp_path / "c.jsonl", records)
    pack(data, tmp_path / "p", tokenizer=tiny_tokenizer, format="conversation", template=template)
    expected = reference(records, "conversation", template, RefTokenizer(tiny_tokenizer))
    assert_same(PackedDataset(tmp_path / "p"), expected, template)


def _chitchat_as(kind: str, chats: list[dict]) -> list[dict]:
    """Real chats in another dataset shape: ShareGPT (user -> human, assistant -> gpt) or
    alpaca (first user message, the third message as input, the first answer as output)."""
    out = []
    for chat in chats:
        m = chat["messages"]
        if kind == "sharegpt":
            role = {"user": "human", "assistant": "gpt"}
            out.append({"conversations": [{"from": role[x["role"]], "value": x["content"]}
                                          for x in m]})  # fmt: skip
        else:
            third = m[2]["content"] if len(m) > 2 else ""
            out.append({"instruction": m[0]["content"], "input": third,
                        "output": m[1]["content"] if len(m) > 1 else "<nooutput>"})  # fmt: skip
    return out


@pytest.mark.parametrize("kind", shared_cases(["sharegpt", "alpaca"]))
def test_shared_chats_as_sharegpt_and_alpaca_match_xtuner(tmp_path, shared_data, kind):
    """All of chitchat (4,017 real chats; 7 have two messages of one speaker in a row, many
    end on the user) reshaped as ShareGPT or alpaca, with the SmolLM2 tokenizer, against the
    oracle: the records that stopped a pack before (two humans in a row) or got the removed
    alpaca system prompt."""
    chats = [json.loads(line) for line in shared_data("chitchat.jsonl").open()]
    tok_dir = shared_data("tokenizers", "smollm2")
    records = _chitchat_as(kind, chats)
    if kind == "sharegpt":
        runs = sum(
            any(a["from"] == b["from"] == "human" for a, b in zip(c, c[1:]))
            for c in (r["conversations"] for r in records)
        )
        assert runs > 0  # the consecutive-human branch is exercised by real data
    data = write_jsonl(tmp_path / f"{kind}.jsonl", records)
    fmt = "wizardlm" if kind == "sharegpt" else "alpaca"
    pack(data, tmp_path / "p", tokenizer=tok_dir, max_length=4096, format=fmt,
         template="qwen_chat")  # fmt: skip
    expected = reference_samples(records, fmt, "qwen_chat", RefTokenizer(tok_dir), 4096)
    assert len(expected) > 3900
    assert_same(PackedDataset(tmp_path / "p"), expected, f"chitchat as {kind}")


def test_cli_lists_formats_and_templates_with_examples(capsys):
    assert cli(["formats"]) == 0
    out = capsys.readouterr().out
    for name in formats():
        line = next(ln for ln in out.splitlines() if ln.startswith(name + ":"))
        assert len(line) > len(name) + 10, line
    assert "tokens" in out and ".bin" in out
    assert cli(["templates"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 28 and "\nhf:" in out
