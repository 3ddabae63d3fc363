"""Crash safety and fault injection for `pyfast-tune pack`.

Each test injects one fault a shared cluster produces — SIGKILL at a random moment, two jobs
writing the same output, a file-size limit (disk full behaves the same: the write fails) — and
checks the promise of docs/RELIABILITY.md: the output path holds either nothing or a whole,
verifying packed directory (the previous one or the new one), and the error names the file.

`PYFAST_KILLS=N` sets the kill-loop length (default 12; docs/RELIABILITY.md reports a long run).
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyfast_tune.data import CorruptDataError, PackedDataset
from pyfast_tune.demo import synth_conversations, write_jsonl

CLI = [sys.executable, "-m", "pyfast_tune.cli"]


def pack_cmd(inp: Path, out: Path, tok: Path, *extra: str) -> list[str]:
    return [*CLI, "pack", str(inp), "--out", str(out), "--tokenizer", str(tok),
            "--max-length", "512", "--template", "qwen_chat", *extra]  # fmt: skip


def staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def assert_whole_or_absent(out: Path, allowed_seeds: set[int] | None = None) -> str:
    """The output path is absent, or a packed directory that opens and verifies."""
    if not out.exists():
        return "absent"
    ds = PackedDataset(out)
    ds.verify()
    if allowed_seeds is not None:
        assert ds.meta["seed"] in allowed_seeds
    return "whole"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~1 s of packing work: enough for a kill to land in every stage."""
    d = tmp_path_factory.mktemp("corpus")
    return write_jsonl(synth_conversations(4000, seed=5), d / "chats.jsonl")


def test_sigkill_at_random_moments_leaves_no_partial_output(tmp_path, corpus, tiny_tokenizer):
    out = tmp_path / "packed"
    t0 = time.monotonic()
    subprocess.run(pack_cmd(corpus, tmp_path / "timing", tiny_tokenizer), check=True,
                   capture_output=True)  # fmt: skip
    full = time.monotonic() - t0
    rng = random.Random(9)
    kills = int(os.environ.get("PYFAST_KILLS", "12"))
    outcomes = {"absent": 0, "whole": 0}
    previous = None
    for i in range(kills):
        seed = i % 3
        # Half the kills land anywhere, half in the last stretch where packing, writing and
        # the commit happen.
        delay = rng.uniform(0, full * 1.1) if i % 2 else rng.uniform(full * 0.6, full * 1.05)
        p = subprocess.Popen(pack_cmd(corpus, out, tiny_tokenizer, "--seed", str(seed)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        rc = p.wait()
        state = assert_whole_or_absent(out, {0, 1, 2})
        if previous is not None:
            # A kill never loses the previous whole output: it is still there (or replaced
            # by the new, whole one when the kill came after the commit).
            assert state == "whole"
        if state == "whole":
            seen = PackedDataset(out).meta["seed"]
            assert seen == seed or (rc == -signal.SIGKILL and seen == previous), (seen, rc)
            previous = seen
        outcomes[state] += 1
    assert sum(outcomes.values()) == kills
    print(f"kill loop: {kills} SIGKILLs, output afterwards {outcomes}")
    # The next complete run cleans up the staging directories the killed runs left.
    subprocess.run(pack_cmd(corpus, out, tiny_tokenizer, "--seed", "7"), check=True,
                   capture_output=True)  # fmt: skip
    assert staging_dirs(out) == []
    assert PackedDataset(out, seed=7).verify()["ok"]


def test_concurrent_packers_give_one_whole_result(tmp_path, corpus, tiny_tokenizer):
    out = tmp_path / "packed"
    for rnd in range(2):
        seeds = [10 * rnd + k for k in range(3)]
        procs = [subprocess.Popen(pack_cmd(corpus, out, tiny_tokenizer, "--seed", str(s)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for s in seeds]  # fmt: skip
        errors = [p.communicate()[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errors
        assert assert_whole_or_absent(out, set(seeds)) == "whole"
        assert staging_dirs(out) == []


def _limit_file_size(limit: int):
    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


@pytest.mark.parametrize("limit", [64 * 1024, 1024 * 1024])
def test_failing_write_is_a_clear_error_and_leaves_no_output(tmp_path, corpus, tiny_tokenizer,
                                                             limit):  # fmt: skip
    """`ulimit -f`: every write past the limit fails with EFBIG (Python ignores SIGXFSZ, so
    the process is not killed), as a full disk fails with ENOSPC."""
    out = tmp_path / "packed"
    r = subprocess.run(pack_cmd(corpus, out, tiny_tokenizer), capture_output=True, text=True,
                       preexec_fn=_limit_file_size(limit))  # fmt: skip
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert "File too large" in err, r.stderr
    assert f"{out.parent}/.{out.name}.tmp-" in err, err  # names the file being written
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert staging_dirs(out) == []


def test_failing_write_keeps_previous_output(tmp_path, corpus, tiny_tokenizer):
    out = tmp_path / "packed"
    subprocess.run(pack_cmd(corpus, out, tiny_tokenizer, "--seed", "3"), check=True,
                   capture_output=True)  # fmt: skip
    before = (out / "meta.json").read_bytes()
    r = subprocess.run(pack_cmd(corpus, out, tiny_tokenizer, "--seed", "4"), capture_output=True,
                       text=True, preexec_fn=_limit_file_size(256 * 1024))  # fmt: skip
    assert r.returncode != 0 and "File too large" in r.stderr
    assert (out / "meta.json").read_bytes() == before
    assert PackedDataset(out, seed=3).verify()["ok"]
    assert staging_dirs(out) == []


def test_output_over_a_foreign_directory_is_refused(tmp_path, corpus, tiny_tokenizer):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    r = subprocess.run(pack_cmd(corpus, out, tiny_tokenizer), capture_output=True, text=True)
    assert r.returncode != 0 and "refusing to replace" in r.stderr
    assert (out / "thesis.tex").read_text() == "years of work"
    assert staging_dirs(out) == []


def test_staging_dir_is_never_a_packed_dir_name(tmp_path, corpus, tiny_tokenizer):
    """A staging directory is hidden (leading dot), so directory inputs and globs skip it."""
    out = tmp_path / "packed"
    p = subprocess.Popen(pack_cmd(corpus, out, tiny_tokenizer), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while not staging_dirs(out) and time.monotonic() < deadline:
        time.sleep(0.01)
    found = staging_dirs(out)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert found and all(s.name.startswith(".") for s in found)
    with pytest.raises(CorruptDataError, match="missing"):
        PackedDataset(out)
    # Named after its owner, so the next run knows the owner is dead and removes it.
    assert all(f"-{p.pid}-" in s.name for s in found)
