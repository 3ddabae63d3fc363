"""`--template hf`: the tokenizer's own Jinja chat template rendered in Rust (minijinja) equals
transformers' `apply_chat_template`, the ids equal the tokenizer's on that text, and the loss
covers exactly the assistant content (+ the EOS written right after it)."""

from __future__ import annotations

import functools
import json
import re
import shutil

import numpy as np
import pytest

from pyfast_tune.data import PackedDataset, TokenizerError, pack, render_chat

CHATML_ASSISTANT = re.compile(
    r"<\|im_start\|>assistant\n(?:<think>\n\n</think>\n\n)?(.*?)<\|im_end\|>", re.S
)

HAND_MADE = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "empty system"},
        {"role": "assistant", "content": "ok"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "loss": False},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": " 6 \n"},
    ],
    [
        {"role": "assistant", "content": "leading assistant"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a ünïcödé 漢字 🙂"},
    ],
    [
        {"role": "user", "content": "say im_end"},
        {"role": "assistant", "content": "Hello\n\n  world"},
    ],
]


@functools.cache
def load_hf(path):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def expected_mask(text: str, offsets, messages) -> list[int]:
    """Independent ChatML reading: assistant content is what sits between
    '<|im_start|>assistant\\n' (+ Qwen3's empty think block) and '<|im_end|>'; trained when
    its message has loss; the '<|im_end|>' after it is trained too."""
    trained = [m.get("loss", True) for m in messages if m["role"] == "assistant"]
    spans = [(m.start(1), m.end()) for m in CHATML_ASSISTANT.finditer(text)]
    assert len(spans) == len(trained)
    spans = [s for s, t in zip(spans, trained) if t]
    return [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]


def check(tok_dir, conversations):
    """Render all conversations in Rust; compare each with transformers. Returns, per
    conversation, (decoded trained text, assistant contents + EOS)."""
    hf = load_hf(tok_dir)
    out = []
    for messages, (text, ids, mask) in zip(conversations, render_chat(tok_dir, conversations)):
        clean = [{k: v for k, v in m.items() if k != "loss"} for m in messages]
        assert text == hf.apply_chat_template(clean, tokenize=False), json.dumps(messages)
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == enc["input_ids"]
        assert mask == expected_mask(text, enc["offset_mapping"], messages), json.dumps(messages)
        trained = hf.decode([i for i, m in zip(ids, mask) if m])
        want = "".join(
            m["content"] + "<|im_end|>"
            for m in messages
            if m["role"] == "assistant" and m.get("loss", True)
        )
        out.append((trained, want))
    return out


def test_render_equals_apply_chat_template_generated(tiny_tokenizer_bos):
    """The generated tokenizer's ChatML template on hand-made and generated chats; the real
    tokenizers' templates (Qwen3's think blocks, SmolLM2's) are in test_real_data.py."""
    from pyfast_tune.demo import synth_conversations

    chats = HAND_MADE + [r["messages"] for r in synth_conversations(100, seed=31)]
    for trained, want in check(tiny_tokenizer_bos, chats):
        assert trained == want  # ChatML copies content verbatim


def pack_with_hf_template(tmp_path, tok_dir, records):
    """``records`` (at least 80) + HAND_MADE packed with ``--template hf``: ids are the
    tokenizer's on transformers' rendering, labels the assistant spans; other formats go
    through the template as system/user/assistant messages."""
    hf = load_hf(tok_dir)
    records = records[:80] + [{"messages": m} for m in HAND_MADE]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    st = pack(data, tmp_path / "p", tokenizer=tok_dir, max_length=4096, template="hf")
    ds = PackedDataset(tmp_path / "p", template="hf")
    assert st.samples == len(records)
    assert ds.meta["fingerprint_inputs"]["chat_template"]
    for j in (0, 17, 79, 80, 82, 83):
        msgs = records[j]["messages"]
        text = hf.apply_chat_template(
            [{k: v for k, v in m.items() if k != "loss"} for m in msgs], tokenize=False
        )
        s = ds.sample(j)
        np.testing.assert_array_equal(
            s["input_ids"], hf(text, add_special_tokens=False)["input_ids"]
        )
        _, ids, mask = render_chat(tok_dir, [msgs])[0]
        np.testing.assert_array_equal(s["labels"], np.where(np.array(mask) == 1, ids, -100))
    # other formats go through the chat template as system/user/assistant messages
    alp = tmp_path / "a.jsonl"
    alp.write_text(json.dumps({"instruction": "Add", "input": "1+1", "output": "2"}) + "\n")
    pack(alp, tmp_path / "q", tokenizer=tok_dir, template="hf")
    s = PackedDataset(tmp_path / "q").sample(0)
    text = hf.decode(s["input_ids"])  # alpaca has no system prompt (XTuner 0.2.0)
    assert "<|im_start|>user\nAdd\n1+1<|im_end|>" in text and "Below is an" not in text
    assert hf.decode(s["input_ids"][s["labels"] >= 0]) == "2<|im_end|>"


def test_pack_with_hf_template_generated(tmp_path, tiny_tokenizer_bos):
    from pyfast_tune.demo import synth_conversations

    pack_with_hf_template(tmp_path, tiny_tokenizer_bos, synth_conversations(80, seed=32))


def test_hf_template_needs_a_chat_template(tmp_path, tiny_tokenizer):
    data = tmp_path / "c.jsonl"
    data.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
        )
        + "\n"
    )
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(tiny_tokenizer / "tokenizer.json", tok)
    cfg = json.loads((tiny_tokenizer / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="no chat_template.jinja"):
        pack(data, tmp_path / "p", tokenizer=tok, template="hf")
    # a chat_template.jinja beside tokenizer.json is used (and beats the config's)
    (tok / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% if m.role == 'assistant' %}"
        "{{ eos_token }}{% endif %}{% endfor %}"
    )
    pack(data, tmp_path / "p", tokenizer=tok, template="hf")
    s = PackedDataset(tmp_path / "p").sample(0)
    assert (s["labels"] >= 0).sum() >= 1
