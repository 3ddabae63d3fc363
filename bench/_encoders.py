"""Other encoders that bench_tokenize.py times beside ours, on the same texts: tiktoken (rank
based, built from the tokenizer's own vocabulary and regex) and, when installed, fastokens and
gigatoken (neither is a dependency: a missing one is a note in the output, not a failure).

Each adapter is ``(name, build, encode_batch)``: ``build(tokenizer_dir)`` returns the encoder
or a reason it cannot be had; ``encode_batch(encoder, texts, threads)`` returns one id list per
text. Not a benchmark itself: pytest does not collect it.
"""

from __future__ import annotations

import json
from pathlib import Path


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies are spelled in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = {}, 0
    for b in range(256):
        if b in bs:
            cs[b] = chr(b)
        else:
            cs[b] = chr(256 + n)
            n += 1
    return [cs[b] for b in range(256)]


def build_tiktoken(tok_dir: Path):
    """tiktoken's rank-based encoder from the same vocabulary and pattern (added tokens
    ignored), or why not. Its ids are not always Hugging Face's: the vocabularies list one
    merge per token, tiktoken merges any pair whose concatenation is a token."""
    try:
        import tiktoken
    except ImportError:
        return "tiktoken not installed"
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    pre = spec["pre_tokenizer"] or {}
    steps = pre.get("pretokenizers", [pre])
    if [s.get("type") for s in steps] not in (["ByteLevel"], ["Split", "ByteLevel"]):
        return "not byte-level BPE behind one regex: no tiktoken equivalent"
    char_byte = {c: b for b, c in enumerate(_bytes_to_unicode())}
    ranks = {
        bytes(char_byte[c] for c in t): i
        for t, i in spec["model"]["vocab"].items()
        if all(c in char_byte for c in t)
    }
    split = next((s for s in steps if s["type"] == "Split"), None)
    pattern = (
        split["pattern"]["Regex"]
        if split
        else r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    )
    return tiktoken.Encoding(
        name=tok_dir.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
    )


def _tiktoken_batch(enc, texts: list[str], threads: int) -> list[list[int]]:
    return enc.encode_ordinary_batch(texts, num_threads=threads)


def _ids(out) -> list[list[int]]:
    """Id lists from a batch result: lists of ints, or Hugging Face-like objects with ``.ids``."""
    return [list(getattr(e, "ids", e)) for e in out]


def build_fastokens(tok_dir: Path):
    """fastokens' tokenizer from the same tokenizer.json, or why not."""
    try:
        import fastokens
    except ImportError:
        return "fastokens not installed (pip install fastokens to compare)"
    try:
        return fastokens.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    except Exception as e:  # an API or tokenizer it does not take: say which
        return f"fastokens cannot load it: {type(e).__name__}: {e}"


def _fastokens_batch(enc, texts: list[str], threads: int) -> list[list[int]]:
    if hasattr(enc, "encode_batch"):
        return _ids(enc.encode_batch(texts))
    return _ids(enc.encode(t) for t in texts)


def build_gigatoken(tok_dir: Path):
    """gigatoken in its Hugging Face compatibility mode (the mode that promises HF's ids) over
    the same tokenizer.json, or why not."""
    try:
        import gigatoken as gt
        from tokenizers import Tokenizer
    except ImportError:
        return "gigatoken not installed (pip install gigatoken to compare)"
    try:
        return gt.Tokenizer(Tokenizer.from_file(str(tok_dir / "tokenizer.json"))).as_hf()
    except Exception as e:
        return f"gigatoken cannot load it: {type(e).__name__}: {e}"


def _gigatoken_batch(enc, texts: list[str], threads: int) -> list[list[int]]:
    if not hasattr(enc, "encode_batch"):  # 0.10's HFCompat: transformers' __call__ only
        return _ids(enc(texts, add_special_tokens=False)["input_ids"])
    try:
        return _ids(enc.encode_batch(texts, add_special_tokens=False))
    except TypeError:  # a compatibility layer without the keyword: no special tokens either way
        return _ids(enc.encode_batch(texts))


ENCODERS = [
    ("tiktoken", build_tiktoken, _tiktoken_batch),
    ("fastokens", build_fastokens, _fastokens_batch),
    ("gigatoken", build_gigatoken, _gigatoken_batch),
]
