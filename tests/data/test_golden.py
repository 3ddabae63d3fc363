"""Golden packed directory: generated chats, a hand-written byte-level BPE tokenizer, a fixed
seed — the BLAKE3 of every data file is pinned here, so any change of the shuffle RNG, input
order, templating, tokenization or packing shows up as a failure and has to be made on
purpose (update the hashes in the same commit, saying why).

Only the data files are pinned: meta.json also holds the tool version and the tokenizer file's
hash (its JSON layout belongs to the `tokenizers` version), which change for other reasons.
The tokenizer's merges are written out below rather than trained, so a change in the
`tokenizers` trainer cannot move the hashes.
"""

import json

import pytest

from pyfast_tune.data import PackedDataset, pack
from pyfast_tune.demo import SPECIAL_TOKENS, synth_conversations, synth_documents, write_jsonl

# Merges over the generated world's words, applied in this order (rank = position).
WORDS = [
    "the", "cat", "likes", "red", "apples", "in", "morning", "my", "neighbour", "builds", "old",
    "songs", "at", "market", "robot", "paints", "tiny", "boats", "near", "sea", "teacher",
    "remembers", "prime", "numbers", "after", "school", "our", "team", "counts", "stars", "on",
    "Mondays", "river", "follows", "soft", "bread", "she", "explains", "What", "does", "do",
    "Tell", "me", "about", "Where", "is", "Why", "You", "are", "a", "concise", "assistant",
    "The", "My", "A", "Our", "She",
]  # fmt: skip


def byte_level_bpe(out_dir):
    """A byte-level BPE tokenizer (GPT-2 split, no prefix space) whose merges build each word
    of WORDS (with and without a leading space) left to right; ChatML specials, eos
    ``<|im_end|>``, bos ``<|im_start|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for word in WORDS:
        for w in (word, "Ġ" + word):  # "Ġ" is the byte-level form of a space
            left = w[0]
            for c in w[1:]:
                if left + c not in vocab:
                    merges.append((left, c))
                    vocab[left + c] = len(vocab)
                left += c
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir


# BLAKE3 of each data file; see the module docstring before changing one.
GOLDEN = {
    "input_ids.bin": "094b7dd995ab6384a746cf6b7f79e3ecd81e02c3e6b8c3ca4780f6c9f6d106c6",
    "loss_mask.bin": "419e6e90e73c16ab122f378153e0da1cc36d43c47e457cf9e7560afc27d1c2ca",
    "samples.bin": "78c66c56a9e28222f2f7b1108bdb8219745a3c37f0a221f7034421d6cd3e7836",
    "packs.bin": "e6981bb39c1c48b3af62af801b718d14954635932a8c9d9e1c947ddc98488ea8",
    "pack_samples.bin": "c1233cecc71532b9c756fd6b53f6ad8242dbbc59cb46eac8b3643cc5041689e2",
}
GOLDEN_COUNTS = {"num_samples": 240, "num_packs": 47, "num_tokens": 95381}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    tok = byte_level_bpe(d / "tok")
    # Two files in a directory: the engine orders them by relative path, not by listing.
    write_jsonl(synth_conversations(150, seed=11), d / "in" / "b_chats.jsonl")
    write_jsonl(synth_conversations(90, seed=12), d / "in" / "a_chats.jsonl")
    return d, tok


@pytest.mark.parametrize("backend,threads", [("fast", 1), ("fast", None), ("hf", 2)])
def test_packed_bytes_are_pinned(inputs, tmp_path, backend, threads):
    """The same bytes with either tokenizer backend and any thread count."""
    d, tok = inputs
    out = tmp_path / "packed"
    pack([d / "in"], out, tokenizer=tok, max_length=2048, format="openai",
         template="internlm2_chat", seed=1234, tokenizer_backend=backend,
         threads=threads)  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    got = {name: meta["outputs"][name]["blake3"] for name in GOLDEN}
    counts = {k: meta[k] for k in GOLDEN_COUNTS}
    assert (got, counts) == (GOLDEN, GOLDEN_COUNTS)
    assert PackedDataset(out).verify()["split_samples"] == 0


def test_the_pin_sees_the_seed(inputs, tmp_path):
    """Another seed: the same samples (samples.bin keeps input order but records each sample's
    new place), other packs, so the pinned hashes would catch a change of the shuffle."""
    d, tok = inputs
    pack([d / "in"], tmp_path / "p", tokenizer=tok, max_length=2048, format="openai",
         template="internlm2_chat", seed=1235)  # fmt: skip
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["num_samples"] == GOLDEN_COUNTS["num_samples"]
    for name in ("input_ids.bin", "samples.bin", "pack_samples.bin"):
        assert meta["outputs"][name]["blake3"] != GOLDEN[name], name


def test_pretraining_text_bytes_are_pinned(inputs, tmp_path):
    """Plain-text documents (format pretrain): BOS + text + EOS, no template."""
    d, tok = inputs
    write_jsonl(synth_documents(120, seed=13), tmp_path / "docs" / "d.jsonl")
    pack([tmp_path / "docs"], tmp_path / "p", tokenizer=tok, max_length=1024, format="pretrain",
         seed=5)  # fmt: skip
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    got = {name: meta["outputs"][name]["blake3"] for name in GOLDEN}
    assert got == GOLDEN_PRETRAIN


GOLDEN_PRETRAIN = {
    "input_ids.bin": "34193b1a64197aab600be80f522a6ed9fc704608bf02bdcbc4b1dbda580fe438",
    "loss_mask.bin": "4fcda3807c2502a741768efd38fe2659759a2bba98a99fd27bbe9e2f862ca1bf",
    "samples.bin": "5bfe4a5852702ff9710b7d944f285f358536ffe01f87833a488af4434b692b05",
    "packs.bin": "8691466c82f201d55b691daa84826d276c1a381c3e277c34898d215fe444e28b",
    "pack_samples.bin": "bda320dbb908d300ae853ce27d05816fa257e43f04b951144104baa1ce25aebc",
}
