"""`pyfast-tune inspect`: the statistics are recomputed from the arrays, the decoded sample
marks exactly the trained tokens, and the PNG's bars are the sample-length histogram."""

import json

import numpy as np
import pytest

from pyfast_tune.cli import main as cli
from pyfast_tune.data import PackedDataset, pack
from pyfast_tune.demo import synth_conversations, write_jsonl
from pyfast_tune.inspect_data import (
    TRAINED_CLOSE,
    TRAINED_OPEN,
    length_histogram,
    plot_lengths,
    render_sample,
    summarize,
    trained_spans,
)

MAX_LENGTH = 256


@pytest.fixture(scope="module")
def packed(tiny_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect")
    records = synth_conversations(300, seed=3)
    records[0] = {
        "messages": [
            {"role": "user", "content": "Say {hello}."},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "Hello again."},
        ]
    }
    src = write_jsonl(records, d / "chat.jsonl")
    pack([src], d / "packed", tokenizer=tiny_tokenizer, max_length=MAX_LENGTH,
         format="openai", template="internlm2_chat")  # fmt: skip
    return d / "packed"


def _naive_counts(lengths, edges):
    return [sum(1 for n in lengths if a <= n < b) for a, b in zip(edges[:-1], edges[1:])]


def test_histogram_counts_every_length_in_its_bin():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4097, size=5000)
    lengths[:3] = [1, 4096, 82]  # both ends and a bin boundary
    counts, edges = length_histogram(lengths, max_length=4096, bins=50)
    assert len(counts) == 50 and edges[0] == 1 and edges[-1] > 4096
    assert np.all(np.diff(edges) == 82)  # ceil(4096 / 50): equal integer widths
    assert counts.tolist() == _naive_counts(lengths.tolist(), edges.tolist())
    assert counts.sum() == 5000


def test_histogram_small_ranges_and_errors():
    counts, edges = length_histogram(np.array([1, 2, 3, 10]), max_length=10, bins=4)
    assert edges.tolist() == [1, 4, 7, 10, 13] and counts.tolist() == [3, 0, 0, 1]
    counts, edges = length_histogram(np.array([5, 5, 6]), max_length=8, bins=50)
    assert edges.tolist() == list(range(1, 10)) and counts.tolist() == [0, 0, 0, 0, 2, 1, 0, 0]
    with pytest.raises(ValueError, match=">= 1"):
        length_histogram(np.array([0, 3]), max_length=8)


def test_summary_is_recomputed_from_the_samples(packed):
    ds = PackedDataset(packed)
    r = summarize(ds)
    samples = [ds.sample(j) for j in range(ds.num_samples)]
    lengths = [len(s["input_ids"]) for s in samples]
    assert r["samples"] == len(samples) == ds.meta["stats"]["samples"]
    assert r["tokens"] == sum(lengths)
    assert r["loss_tokens"] == sum(int((s["labels"] != -100).sum()) for s in samples)
    assert r["loss_tokens"] == ds.meta["stats"]["loss_tokens"]
    assert r["fill"] == pytest.approx(sum(lengths) / (r["packs"] * MAX_LENGTH))
    assert r["sample_length"]["max"] == max(lengths) and r["sample_length"]["min"] == min(lengths)
    assert r["fingerprint"] == ds.meta["fingerprint"] and len(r["fingerprint"]) == 64
    h = r["histogram"]
    assert h["counts"] == _naive_counts(lengths, h["edges"])
    assert r["truncated_samples"] == ds.meta["stats"]["truncated_samples"] > 0  # 256-token cap


def test_decoded_sample_marks_exactly_the_trained_spans(packed, tiny_tokenizer):
    from tokenizers import Tokenizer

    ds = PackedDataset(packed)
    j = next(j for j in range(ds.num_samples) if ds.sample(j)["source"][1] == 0)
    text = render_sample(ds, j)
    body = text.split("\n", 1)[1]
    # internlm2_chat: the template's suffix <|im_end|> is the EOS, trained with the answer.
    assert f"{TRAINED_OPEN}Hello there.<|im_end|>{TRAINED_CLOSE}" in body
    assert f"{TRAINED_OPEN}Hello again.<|im_end|>{TRAINED_CLOSE}" in body
    assert body.startswith("<|im_start|>user\nSay {hello}.<|im_end|>\n<|im_start|>assistant\n")
    assert body.count(TRAINED_OPEN) == 2
    # Removing the markers gives the plain decode of the whole sample.
    tok = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    plain = body.replace(TRAINED_OPEN, "").replace(TRAINED_CLOSE, "")
    assert plain == tok.decode(ds.sample(j)["input_ids"].tolist(), skip_special_tokens=False)


def test_trained_spans_runs():
    labels = np.array([-100, -100, 5, 6, -100, 7])
    assert trained_spans(labels) == [(0, 2, False), (2, 4, True), (4, 5, False), (5, 6, True)]
    assert trained_spans(np.array([], dtype=np.int64)) == []


def test_png_bars_are_the_length_histogram(packed, tmp_path):
    ds = PackedDataset(packed)
    drawn = plot_lengths(ds, tmp_path / "lengths.png", bins=20)
    png = (tmp_path / "lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    lengths = [len(ds.sample(j)["input_ids"]) for j in range(ds.num_samples)]
    edges = [round(x) for x in drawn["lefts"]] + [round(drawn["lefts"][-1] + drawn["widths"][-1])]
    assert drawn["heights"] == _naive_counts(lengths, edges)
    assert sum(drawn["heights"]) == ds.num_samples


def test_cli_inspect_prints_stats_sample_and_writes_png(packed, tmp_path, capsys):
    png = tmp_path / "h.png"
    assert cli(["inspect", str(packed), "--sample", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    ds = PackedDataset(packed)
    assert f"{ds.num_samples} samples in {ds.num_packs} packs" in out
    assert f"fingerprint {ds.meta['fingerprint']}" in out
    assert "sample 1 (" in out and TRAINED_OPEN in out
    assert png.stat().st_size > 5000
    assert cli(["inspect", str(packed), "--json", "--sample", "-1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["tokens"] == ds.num_tokens and sum(report["histogram"]["counts"]) == ds.num_samples
    )


def test_cli_inspect_refuses_a_non_packed_dir(tmp_path, capsys):
    assert cli(["inspect", str(tmp_path)]) == 2
    assert "not a packed directory" in capsys.readouterr().err
