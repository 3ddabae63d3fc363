"""What the engine knows besides packing: its templates and formats, a tokenizer's hash,
and conversations rendered or encoded exactly as ``pack`` encodes them (for chat)."""

from __future__ import annotations

import os
from typing import Any

from pyfast_tune import _packer, hub

# Encodes chat turns as training does (XTuner templates): chat's prompts come from it.
ChatEncoder = _packer.ChatEncoder


def render_chat(
    tokenizer: str | os.PathLike, conversations: list[list[dict]]
) -> list[tuple[str, list[int], list[int]]]:
    """Render each conversation (a list of messages) with the tokenizer's chat template, as
    ``template="hf"`` does: (text, token ids, loss mask) each. The text equals transformers'
    ``apply_chat_template(messages, tokenize=False)``; the mask is 1 on assistant content
    (``loss: false`` messages excepted) and the EOS right after it.

    >>> render_chat("tok/", [[{"role": "user", "content": "Hi"},
    ...                       {"role": "assistant", "content": "Hello"}]])   # doctest: +SKIP
    """
    out = _packer.render_chats(os.fspath(hub.resolve_tokenizer(tokenizer)), list(conversations))
    return [(text, list(ids), list(mask)) for text, ids, mask in out]


def tokenizer_hash(tokenizer: str | os.PathLike) -> str:
    """Hex BLAKE3 of a tokenizer's files (a path or Hub id), as ``meta.json`` records it."""
    return _packer.tokenizer_hash(os.fspath(hub.resolve_tokenizer(tokenizer)))


def templates() -> list[dict[str, Any]]:
    """Every prompt template: name, system, instruction, suffix, suffix_as_eos, sep, stop_words."""
    return _packer.templates()


def formats() -> list[str]:
    """Every dataset format name accepted by ``pack``."""
    return list(_packer.format_names())
