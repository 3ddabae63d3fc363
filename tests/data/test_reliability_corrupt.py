"""Corruption refused: every file of a packed directory is damaged in turn —
truncated, a byte flipped, deleted, meta.json rewritten — and both `PackedDataset` (cheap size
checks, O(1) open) and `pyfast-tune verify` (hashes and invariants) must refuse it and name
the file at fault."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyfast_tune import cli, pack
from pyfast_tune.data import CorruptDataError, FingerprintMismatch, PackedDataset
from pyfast_tune.demo import synth_conversations, write_jsonl

BINARY = ["input_ids.bin", "loss_mask.bin", "samples.bin", "packs.bin", "pack_samples.bin"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("packed")
    inp = write_jsonl(synth_conversations(200, seed=3), d / "in.jsonl")
    out = d / "out"
    pack(inp, out, tokenizer=tiny_tokenizer, max_length=512, template="qwen_chat")
    return out


@pytest.fixture
def copy(packed, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(packed, dst)
    return dst


def assert_verify_names(path: Path, name: str) -> None:
    """`pyfast-tune verify` (in process: the CLI's main, as the console script runs it)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["verify", str(path)])
    assert rc == 2, err.getvalue()
    assert f"{path}/{name}" in err.getvalue(), err.getvalue()


def test_intact_directory_verifies(copy):
    r = subprocess.run([sys.executable, "-m", "pyfast_tune.cli", "verify", str(copy)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stderr
    (copy / "packs.bin").unlink()
    r = subprocess.run([sys.executable, "-m", "pyfast_tune.cli", "verify", str(copy)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and f"{copy}/packs.bin: missing" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("cut", ["one_byte", "empty"])
def test_truncated_file_refused_on_open_and_by_verify(copy, name, cut):
    f = copy / name
    size = f.stat().st_size
    os.truncate(f, {"one_byte": size - 1, "half": size // 2, "empty": 0}[cut])
    with pytest.raises(CorruptDataError, match=f"{name}: .*truncated or foreign"):
        PackedDataset(copy)
    assert_verify_names(copy, name)


@pytest.mark.parametrize("name", BINARY)
def test_flipped_byte_found_by_verify(copy, name):
    f = copy / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the least a disk or a bad copy does
    f.write_bytes(bytes(data))
    # Opening is O(1) by design (sizes only), so it accepts the flip; verify must not.
    PackedDataset(copy)
    with pytest.raises(CorruptDataError, match=f"{name}: content hash differs"):
        PackedDataset(copy).verify()
    assert_verify_names(copy, name)


@pytest.mark.parametrize("name", [*BINARY, "meta.json"])
def test_missing_file_named(copy, name):
    (copy / name).unlink()
    with pytest.raises(CorruptDataError, match=f"{name}: missing"):
        PackedDataset(copy)
    assert_verify_names(copy, name)


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_meta_counts_disagreeing_with_files_refused(copy):
    _edit_meta(copy, lambda m: m.update(num_tokens=m["num_tokens"] + 1))
    with pytest.raises(CorruptDataError, match="input_ids.bin: .* bytes, expected"):
        PackedDataset(copy)


def test_meta_hash_rewritten_refused_by_verify(copy):
    _edit_meta(copy, lambda m: m["outputs"]["packs.bin"].update(blake3="0" * 64))
    PackedDataset(copy)
    assert_verify_names(copy, "packs.bin")


@pytest.mark.parametrize(
    "garbage", [b"", b"{", b"\xff\xfe", b"[]", b'{"format_version": 99}', b'{"format_version": 1}']
)
def test_unreadable_meta_refused(copy, garbage):
    (copy / "meta.json").write_bytes(garbage)
    with pytest.raises(CorruptDataError, match="meta.json"):
        PackedDataset(copy)
    assert_verify_names(copy, "meta.json")


def test_fingerprint_mismatch_names_what_differs(copy, tmp_path):
    meta = PackedDataset(copy).meta
    with pytest.raises(FingerprintMismatch, match="max_length 512 \\(asked 1024\\)"):
        PackedDataset(copy, max_length=1024)
    with pytest.raises(FingerprintMismatch, match="template 'qwen_chat'"):
        PackedDataset(copy, template="llama3_chat")
    other_tok = tmp_path / "tok"
    shutil.copytree(Path(meta["tokenizer"]["path"]).parent if Path(meta["tokenizer"]["path"]).is_file()
                    else Path(meta["tokenizer"]["path"]), other_tok)  # fmt: skip
    tj = other_tok / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"hello"', '"hellp"', 1) + " ")
    with pytest.raises(FingerprintMismatch, match="tokenizer"):
        PackedDataset(copy, tokenizer=other_tok)


def test_open_is_constant_time_in_size(copy, tmp_path):
    """A 16 GB directory (sparse files: no disk used) opens as fast as the small one: opening
    reads meta.json and stats the files, never their contents."""
    big = tmp_path / "big"
    shutil.copytree(copy, big)
    n_tok, n_samp, n_pack = 4 << 30, 1 << 20, 1 << 18
    sizes = {"input_ids.bin": 4 * n_tok, "loss_mask.bin": n_tok, "samples.bin": 40 * n_samp,
             "packs.bin": 16 * (n_pack + 1), "pack_samples.bin": 8 * n_samp}  # fmt: skip
    for name, size in sizes.items():
        os.truncate(big / name, size)

    def edit(m):
        m.update(num_tokens=n_tok, num_samples=n_samp, num_packs=n_pack)
        for name, size in sizes.items():
            m["outputs"][name]["size"] = size

    _edit_meta(big, edit)

    def best(path: Path) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            PackedDataset(path)
            times.append(time.perf_counter() - t)
        return min(times)

    small_s, big_s = best(copy), best(big)
    assert len(PackedDataset(big)) == n_pack
    assert big_s < 0.010, f"open took {big_s * 1e3:.2f} ms"
    assert big_s < 5 * small_s + 0.002, (small_s, big_s)
