"""The fast tokenizer backend changes the speed of ``pack``, never its output: directories
packed with ``tokenizer_backend="hf"`` and ``"fast"`` are byte-identical, on a tokenizer trained
here and on the four shared tokenizers (Qwen3 and SmolLM2: byte-level BPE; Mistral v0.3:
SentencePiece-style BPE with Metaspace and byte fallback; DeepSeek-V3: byte-level BPE behind
three Splits) with real data. Token-level identity on whole corpora, random Unicode and every
supported pre-tokenizer step is tested in Rust (``rust/packer/tests/fastbpe_identity.rs``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_cases, shared_path

from pyfast_tune.cli import main as cli
from pyfast_tune.data import PackConfigError, TokenizerError, fingerprint, pack
from pyfast_tune.demo import synth_conversations


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def pack_both(tmp_path: Path, data, tokenizer, **kw) -> tuple[dict, dict]:
    outs = []
    for backend in ("hf", "fast"):
        out = tmp_path / f"out_{backend}"
        pack(data, out, tokenizer=tokenizer, tokenizer_backend=backend, **kw)
        outs.append(dir_bytes(out))
    return outs[0], outs[1]


def test_backends_byte_identical_on_trained_tokenizer(tmp_path, tiny_tokenizer):
    # Text with the cases the fast path special-cases: added tokens inside content,
    # contractions, whitespace runs, non-ASCII.
    recs = synth_conversations(500, seed=11)
    recs.append(
        {
            "messages": [
                {
                    "role": "user",
                    "content": "it's  <|im_end|> 'LL  \t\n\n  x  café 東京 😀 12345  ",
                },
                {"role": "assistant", "content": "<|im_start|>ok<|im_end|>   \n"},
            ]
        }
    )
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    hf, fast = pack_both(tmp_path, data, tiny_tokenizer, max_length=512, template="qwen_chat")
    assert hf == fast
    assert len(hf["input_ids.bin"]) > 100_000


SHARED_TOKENIZERS = ["qwen3", "smollm2", "mistral-v3", "deepseek-v3"]


@pytest.mark.parametrize(
    "tok,data,template,max_length",
    shared_cases(
        [
            (tok, *case)
            for case in [("chitchat.jsonl", "qwen_chat", 4096), ("pydoc.jsonl", "none", 32768)]
            for tok in SHARED_TOKENIZERS
        ]
    ),
)
def test_backends_byte_identical_on_shared_data(tmp_path, tok, data, template, max_length):
    tokenizer = shared_path("tokenizers", tok)
    hf, fast = pack_both(
        tmp_path, shared_path(data), tokenizer, max_length=max_length, template=template
    )
    assert hf.keys() == fast.keys()
    for name in hf:
        assert hf[name] == fast[name], f"{name} differs between tokenizer backends"
    assert len(hf["input_ids.bin"]) > 4 * 1_000_000


@pytest.mark.parametrize("tok", shared_cases(["qwen3", "smollm2", "deepseek-v3"]))
def test_backends_byte_identical_with_hf_template(tmp_path, tok):
    # The fast backend does not build Hugging Face's tokenizer at load; the hf template needs
    # its offsets and builds it on first use, from the worker threads.
    tokenizer = shared_path("tokenizers", tok)
    lines = shared_path("chitchat.jsonl").read_text().splitlines()[:300]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    hf, fast = pack_both(tmp_path, data, tokenizer, max_length=4096, template="hf")
    assert hf == fast
    assert len(hf["input_ids.bin"]) > 100_000


def test_backend_is_not_in_the_fingerprint(tmp_path, tiny_tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synth_conversations(20, seed=1)))
    fps = {
        b: fingerprint(data, tokenizer=tiny_tokenizer, tokenizer_backend=b)
        for b in ("auto", "hf", "fast")
    }
    assert len(set(fps.values())) == 1
    with pytest.raises(PackConfigError, match="unknown tokenizer backend"):
        fingerprint(data, tokenizer=tiny_tokenizer, tokenizer_backend="tiktoken")


def test_fast_refuses_what_it_cannot_reproduce(tmp_path, tiny_tokenizer, capfd):
    spec = json.loads((tiny_tokenizer / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    (tok / "tokenizer_config.json").write_text(
        (tiny_tokenizer / "tokenizer_config.json").read_text()
    )
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synth_conversations(50, seed=2)))
    with pytest.raises(TokenizerError, match="cannot reproduce.*Lowercase"):
        pack(data, tmp_path / "o", tokenizer=tok, tokenizer_backend="fast")
    # auto falls back to tokenizers, says why in one line, and gives what hf gives
    capfd.readouterr()
    pack(data, tmp_path / "auto", tokenizer=tok, tokenizer_backend="auto")
    notes = [ln for ln in capfd.readouterr().err.splitlines() if "fast path" in ln]
    assert len(notes) == 1 and "Lowercase" in notes[0], notes
    pack(data, tmp_path / "hf", tokenizer=tok, tokenizer_backend="hf")
    assert dir_bytes(tmp_path / "auto") == dir_bytes(tmp_path / "hf")


def test_cli_tokenizer_backend(tmp_path, tiny_tokenizer, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synth_conversations(50, seed=3)))
    outs = []
    for backend in ("hf", "fast"):
        out = tmp_path / backend
        rc = cli(
            [
                "pack",
                str(data),
                "--out",
                str(out),
                "--tokenizer",
                str(tiny_tokenizer),
                "--max-length",
                "512",
                "--tokenizer-backend",
                backend,
                "--quiet",
            ]
        )
        assert rc in (0, None)
        outs.append(dir_bytes(out))
    assert outs[0] == outs[1]
    with pytest.raises(SystemExit):
        cli(
            [
                "pack",
                str(data),
                "--out",
                str(tmp_path / "x"),
                "--tokenizer",
                str(tiny_tokenizer),
                "--tokenizer-backend",
                "bogus",
            ]
        )
    assert "invalid choice" in capsys.readouterr().err
