"""Function-calling data with `--template hf`: a record's `tools` column reaches the chat
template as `apply_chat_template(messages, tools=tools)` passes it, `tool` messages are packed
untrained, and an assistant turn that calls tools is trained on what the template writes for
it. Checked against transformers' own rendering of the same template."""

import json
import shutil

import pytest

from pyfast_tune import DataFormatError, PackedDataset, pack

# A Qwen2.5-style template: tool schemas in a system turn, calls written from `tool_calls`
# with `tojson` (key order as in the data, as Python's json.dumps keeps it), tool results
# as user turns.
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' }}{%- for tool in tools %}"
    "{{- '\\n' }}{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if message.content %}{{- message.content + '\\n' }}"
    "{%- endif %}{%- for call in message.tool_calls %}{{- '<tool_call>\\n' }}"
    "{{- call.function | tojson }}{{- '\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response>"
    "<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"unit": {"type": "string"}, "city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def record(tools_as_text: bool) -> dict:
    return {
        "tools": json.dumps(TOOLS) if tools_as_text else TOOLS,
        "messages": [
            {"role": "user", "content": "Is the cat in Oslo wet?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        # keys deliberately not sorted: the rendering must keep their order
                        "function": {
                            "name": "get_weather",
                            "arguments": {"unit": "c", "city": "Oslo"},
                        },
                    }
                ],
            },
            {"role": "tool", "content": "rain, 7 degrees"},
            {"role": "assistant", "content": "Yes, the cat is wet."},
        ],
    }


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("tool_tok")
    shutil.copy(tiny_tokenizer / "tokenizer.json", d / "tokenizer.json")
    config = json.loads((tiny_tokenizer / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    config["eos_token"] = "<|im_end|>"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("tools_as_text", [False, True], ids=["list", "json-text"])
def test_tools_render_as_transformers_and_calls_are_trained(
    tool_tokenizer, tmp_path, tools_as_text
):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    hf = transformers.AutoTokenizer.from_pretrained(str(tool_tokenizer))
    rec = record(tools_as_text)
    (tmp_path / "calls.jsonl").write_text(json.dumps(rec) + "\n")
    pack(
        tmp_path / "calls.jsonl",
        tmp_path / "p",
        tokenizer=tool_tokenizer,
        template="hf",
        format="openai",
        max_length=4096,
    )
    s = PackedDataset(tmp_path / "p").sample(0)
    text = hf.apply_chat_template(rec["messages"], tools=TOOLS, tokenize=False)
    assert '"arguments": {"unit": "c", "city": "Oslo"}' in text
    assert list(s["input_ids"]) == hf(text, add_special_tokens=False)["input_ids"]
    trained = hf.decode(s["input_ids"][s["labels"] >= 0])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c", "city": "Oslo"}}\n</tool_call><|im_end|>'
    assert trained == call + "Yes, the cat is wet.<|im_end|>"
    assert "rain, 7 degrees" not in trained and "Oslo wet" not in trained


def test_records_without_tools_render_as_before(tool_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    hf = transformers.AutoTokenizer.from_pretrained(str(tool_tokenizer))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "plain.jsonl").write_text(json.dumps({"messages": msgs, "tools": None}) + "\n")
    pack(tmp_path / "plain.jsonl", tmp_path / "p", tokenizer=tool_tokenizer, template="hf")
    s = PackedDataset(tmp_path / "p").sample(0)
    text = hf.apply_chat_template(msgs, tokenize=False)
    assert "# Tools" not in text
    assert list(s["input_ids"]) == hf(text, add_special_tokens=False)["input_ids"]


def test_tools_need_the_models_own_template(tool_tokenizer, tmp_path):
    (tmp_path / "calls.jsonl").write_text(json.dumps(record(False)) + "\n")
    with pytest.raises(DataFormatError, match="pack with --template hf") as e:
        pack(
            tmp_path / "calls.jsonl",
            tmp_path / "p",
            tokenizer=tool_tokenizer,
            template="qwen_chat",
            format="openai",
        )
    assert "calls.jsonl" in str(e.value)
    bad = {
        "messages": record(False)["messages"][:1] + [{"role": "assistant", "content": "x"}],
        "tools": "[{not json",
    }
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError, match="not JSON"):
        pack(tmp_path / "bad.jsonl", tmp_path / "q", tokenizer=tool_tokenizer, template="hf")
