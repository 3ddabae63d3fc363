"""Property tests of `pack` / `PackedDataset` with generated records: whatever the
records, packing either succeeds with a dataset whose every invariant holds, or raises one of
the typed `PackError`s — never another exception, never a crash of the process."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyfast_tune import pack
from pyfast_tune.data import PackedDataset, PackError

SETTINGS = settings(max_examples=int(os.environ.get("PYFAST_FUZZ_EXAMPLES", "25")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip

text = st.text(st.characters(codec="utf-8"), max_size=80) | st.sampled_from(
    ["", " ", "<|im_end|>", "{input}", "{round}", "\u2028", "\n\n", "<image>", "héllo wörld"]
)
turn = st.fixed_dictionaries({"input": text, "output": text},
                             optional={"system": text, "output_with_loss": st.booleans()})  # fmt: skip
records = st.one_of(
    st.builds(lambda t: {"conversation": t}, st.lists(turn, min_size=1, max_size=4)),
    st.builds(
        lambda m: {"messages": m},
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": text},
                optional={"loss": st.booleans()},
            ),
            min_size=1,
            max_size=5,
        ),
    ),  # fmt: skip
    st.fixed_dictionaries({"instruction": text, "input": text, "output": text}),
)


def _check_dataset(ds: PackedDataset, max_length: int, n_records: int) -> None:
    assert ds.verify()["ok"]
    assert ds.num_samples <= n_records
    seen = []
    for i in range(len(ds)):
        p = ds[i]
        n = p["input_ids"].size
        assert 0 < n <= max_length
        assert p["cu_seqlens"][0] == 0 and p["cu_seqlens"][-1] == n
        assert np.all(np.diff(p["cu_seqlens"]) > 0)
        starts = p["cu_seqlens"][:-1]
        assert np.all(p["position_ids"][starts] == 0)
        trained = p["labels"] != -100
        assert np.array_equal(p["labels"][trained], p["input_ids"][trained])
        seen.extend(ds.pack_sample_ids(i).tolist())
    assert sorted(seen) == list(range(ds.num_samples))
    # Every sample has a trained token and points back at a record of the input.
    for j in range(ds.num_samples):
        s = ds.sample(j)
        assert (s["labels"] != -100).any()
        assert 0 <= s["source"][1] < n_records


@SETTINGS
@given(recs=st.lists(records, min_size=1, max_size=12), max_length=st.sampled_from([8, 64, 512]),
       template=st.sampled_from(["qwen_chat", "llama3_chat", "default", "internlm2_chat"]),
       seed=st.integers(0, 3))  # fmt: skip
def test_pack_generated_records(tiny_tokenizer, recs, max_length, template, seed):
    d = Path(tempfile.mkdtemp())
    try:
        inp = d / "in.jsonl"
        inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        try:
            stats = pack(inp, d / "out", tokenizer=tiny_tokenizer, max_length=max_length,
                         template=template, seed=seed, format="auto")  # fmt: skip
        except PackError as e:
            # Allowed: records of a shape a format refuses (the message names the file), or
            # no record left with a trained token (the message gives the counts).
            assert str(inp) in str(e) or "no trainable samples" in str(e), e
            return
        ds = PackedDataset(d / "out", max_length=max_length, template=template, seed=seed)
        assert stats.samples == ds.num_samples
        _check_dataset(ds, max_length, len(recs))
    finally:
        shutil.rmtree(d)


@SETTINGS
@given(data=st.binary(max_size=300) | st.lists(
    st.sampled_from([b'{"text": "a"}', b"[", b"]", b"{", b"}", b",", b"\n", b'"', b"\xff",
                     b'{"messages": []}', b'{"instruction": 1, "output": null}', b"\xef\xbb\xbf"]),
    max_size=20).map(b"".join),  # fmt: skip
       name=st.sampled_from(["x.jsonl", "x.json"]))  # fmt: skip
def test_pack_arbitrary_bytes_raises_typed_errors_only(tiny_tokenizer, data, name):
    d = Path(tempfile.mkdtemp())
    try:
        inp = d / name
        inp.write_bytes(data)
        try:
            pack(inp, d / "out", tokenizer=tiny_tokenizer, max_length=64, template="none")
        except PackError as e:
            assert str(inp) in str(e) or "no trainable samples" in str(e), e
            assert not (d / "out").exists()
            return
        _check_dataset(PackedDataset(d / "out"), 64, len(data) + 1)
    finally:
        shutil.rmtree(d)
