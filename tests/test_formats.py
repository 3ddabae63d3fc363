"""XTuner's open-source instruction formats (issue 6) against an independent Python statement
of their map_fns, run through XTuner's template_map_fn and encode_fn (tests/xtuner_ref.py),
on hand-made records that reach every branch; plus auto detection, column remapping, the
Python map_fn slow path and LLaVA's image side table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from xtuner_ref import TEMPLATES, RefTokenizer, encode_fn, template_map_fn

from pyfast_tune.cli import main as cli
from pyfast_tune.data import DataFormatError, PackedDataset, formats, pack

IGNORE = -100
CODER = (
    "You are a professional programer. Please provide the corresponding code based on "
    "the description of Human.\n"
)
MEDICAL = "如果你是一名医生，请根据患者的描述回答医学问题。\n"
ARXIV = (
    "If you are an expert in writing papers, please generate a good paper title for this "
    "paper based on other authors' descriptions of their abstracts.\n"
)
COLORIST = (
    "You are a professional color designer. Please provide the corresponding colors "
    "based on the description of Human.\n"
)
LAWYER = "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n"
SQL = (
    "If you are an expert in SQL, please generate a good SQL Query for Question based on the "
    "CREATE TABLE statement.\n"
)


def one(system, inp, out):
    turn = {"input": inp, "output": out}
    if system is not None:
        turn["system"] = system
    return {"conversation": [turn]}


def oasst1(e):
    data = []
    for sentence in e["text"].strip().split("###"):
        sentence = sentence.strip()
        if sentence[:6] == "Human:":
            data.append(sentence[6:].strip())
        elif sentence[:10] == "Assistant:":
            data.append(sentence[10:].strip())
    if len(data) % 2:
        data.pop()
    return {
        "conversation": [{"input": data[i], "output": data[i + 1]} for i in range(0, len(data), 2)]
    }


def wizardlm(e):
    data = e["conversations"]
    while data and data[0]["from"] != "human":
        data = data[1:]
    if len(data) % 2:
        data = data[:-1]
    conv = []
    for i in range(0, len(data), 2):
        assert data[i]["from"] == "human" and data[i + 1]["from"] == "gpt"
        conv.append({"input": data[i]["value"], "output": data[i + 1]["value"]})
    return {"conversation": conv}


def llava(e):
    msgs, inp, conv = e["conversations"], "", []
    while msgs and msgs[0]["from"] == "gpt":
        msgs = msgs[1:]
    for m in msgs:
        if m["from"] == "human":
            v = m["value"]
            if "<image>" in v:
                v = ("<image>\n" + v.replace("<image>", "").strip()).strip()
            inp += v
        elif m["from"] == "gpt":
            conv.append({"input": inp, "output": m["value"]})
            inp = ""
        else:
            raise NotImplementedError
    return {"conversation": conv}


MAP_FNS = {
    "alpaca_zh": lambda e: one(None, f"{e['instruction_zh']}\n{e['input_zh']}", e["output_zh"]),
    "oasst1": oasst1,
    "code_alpaca": lambda e: one(CODER, e["prompt"], e["completion"]),
    "medical": lambda e: one(MEDICAL, "{instruction}\n{input}".format(**e), e["output"]),
    "tiny_codes": lambda e: one(CODER, e["prompt"], e["response"]),
    "default": lambda e: one(None, e["input"], e["output"]),
    "wizardlm": wizardlm,
    "openorca": lambda e: one(e["system_prompt"], e["question"], e["response"]),
    "stack_exchange": lambda e: one(None, e["question"], e["response"]),
    "arxiv": lambda e: one(ARXIV, e["abstract"], e["title"]),
    "colors": lambda e: one(
        COLORIST, ":".join(e["description"].split(":")[1:]).strip(), e["color"]
    ),
    "law_reference": lambda e: one(LAWYER, e["question"], e["answer"]),
    "crime_kg_assitant": lambda e: one(LAWYER, e["input"], e["output"]),
    "sql": lambda e: one(SQL, "{context}\n{question}".format(**e), e["answer"]),
    "llava": llava,
}

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
                {"from": "human", "value": "q1"},
                {"from": "gpt", "value": "a1"},
                {"from": "human", "value": "q2"},
                {"from": "gpt", "value": "a2"},
                {"from": "human", "value": "tail"},
            ]
        },
        {"conversations": [{"from": "human", "value": "only"}]},
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

EXTRA_TEMPLATES = {
    # SUFFIX without SUFFIX_AS_EOS (output gets the suffix and the EOS)
    "gemma": dict(
        SYSTEM="<start_of_turn>system\n{system}<end_of_turn>\n",
        INSTRUCTION="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
        SUFFIX="<end_of_turn>",
        SUFFIX_AS_EOS=False,
        SEP="\n",
    ),
    # {round} in the instruction
    "chatglm2": dict(
        SYSTEM="{system}\n", INSTRUCTION="[Round {round}]\n\n问：{input}\n\n答：", SEP="\n\n"
    ),
}


def reference(records, fmt, template, tok, max_length=10**9):
    out = []
    tmpl = TEMPLATES.get(template) or EXTRA_TEMPLATES.get(template)
    for idx, rec in enumerate(records):
        conv = MAP_FNS[fmt](json.loads(json.dumps(rec)))
        if not conv["conversation"]:
            continue
        if tmpl is not None:
            conv = template_map_fn(conv, tmpl)
        if fmt == "llava":
            enc = llava_encode(conv, tok, max_length)
        else:
            enc = encode_fn(conv, tok, max_length)
        if any(x >= 0 for x in enc["labels"]):
            out.append((idx, enc["input_ids"], enc["labels"]))
    return out


def llava_encode(conv, tok, max_length):
    """XTuner's encode_fn with with_image_token=True: an input holding '<image>' is split
    there, both halves tokenized alone, IMAGE_TOKEN_INDEX (-200) between them."""
    ids, labels, needs_bos = [], [], True
    for turn in conv["conversation"]:
        if "<image>" in turn["input"]:
            chunks = [tok.encode(c) for c in turn["input"].split("<image>")]
            assert len(chunks) == 2
            enc = chunks[0] + [-200] + chunks[1]
        else:
            enc = tok.encode(turn["input"])
        if needs_bos:
            ids += tok.bos
            labels += [IGNORE] * len(tok.bos)
        ids += enc
        labels += [IGNORE] * len(enc)
        out = tok.encode(turn["output"])
        ids += out
        labels += out
        needs_bos = turn.get("need_eos_token", True)
        if needs_bos:
            ids += tok.eos
            labels += tok.eos
        if turn.get("sep", ""):
            sep = tok.encode(turn["sep"])
            ids += sep
            labels += [IGNORE] * len(sep)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


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
    for f in sorted(MAP_FNS)
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
    assert table == {"image_token_id": 0xFFFFFF38, "samples": [[0, "coco/1.jpg"]]}
    s0, s1 = ds.sample(0), ds.sample(1)
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
    assert set(AUTO) | {"auto", "medical", "oasst1", "crime_kg_assitant"} == set(formats())


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


def test_wizardlm_out_of_order_roles_is_a_named_record_error(tmp_path, tiny_tokenizer):
    bad = write_jsonl(
        tmp_path / "w.jsonl",
        [
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        ],
    )
    with pytest.raises(DataFormatError, match=r"w.jsonl:2 \(record 1\).*alternating"):
        pack(bad, tmp_path / "p", tokenizer=tiny_tokenizer, format="wizardlm")
    st = pack(bad, tmp_path / "p", tokenizer=tiny_tokenizer, format="sharegpt", skip_bad=True)
    assert (st.samples, st.skipped_records) == (1, 1)


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
