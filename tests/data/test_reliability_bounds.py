"""Resource bounds and security of the data path: many small files, one huge record,
paths that try to leave the data root, and the code-level rules (no unpickling, no shell
strings, no remote code unless asked)."""

from __future__ import annotations

import ast
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from pyfast_tune import pack
from pyfast_tune.data import PackConfigError, PackedDataset, PackError

ROOT = Path(__file__).resolve().parents[2]


def _many_files(root: Path, n: int) -> None:
    for i in range(n):
        d = root / f"{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"{i:06d}.jsonl").write_text(json.dumps({"text": f"file {i} says hello"}) + "\n")


def _pack_many(tmp_path: Path, tok: Path, n: int) -> None:
    root = tmp_path / "many"
    _many_files(root, n)
    out = tmp_path / "out"
    stats = pack(root, out, tokenizer=tok, max_length=256, format="pretrain", template="none")
    ds = PackedDataset(out)
    assert ds.num_samples == n == stats.samples
    # Files are read in sorted relative-path order, whatever the filesystem returns.
    assert ds.files[0] == "000/000000.jsonl" and ds.files[-1].endswith(f"{n - 1:06d}.jsonl")
    src = ds.sample(n - 1)["source"]
    assert src == (ds.files[-1], 0)
    assert ds.verify()["ok"]


def test_ten_thousand_small_files(tmp_path, tiny_tokenizer):
    _pack_many(tmp_path, tiny_tokenizer, 10_000)


@pytest.mark.slow  # reason: writes and packs 100k files (~1 min on 2 shared cores)
def test_hundred_thousand_small_files(tmp_path, tiny_tokenizer):
    _pack_many(tmp_path, tiny_tokenizer, 100_000)


def _huge_record(
    tmp_path: Path, tok: Path, mb: int, mem_limit: int | None
) -> subprocess.CompletedProcess:
    inp = tmp_path / "huge.jsonl"
    word = "the river remembers soft bread "
    with open(inp, "w") as f:
        f.write('{"text": "')
        chunk = word * (1 << 15)
        for _ in range(mb * (1 << 20) // len(chunk)):
            f.write(chunk)
        f.write('"}\n{"text": "small"}\n')
    out = tmp_path / "out"

    def pre() -> None:
        if mem_limit:
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    return subprocess.run([sys.executable, "-m", "pyfast_tune.cli", "pack", str(inp), "--out", str(out),
                           "--tokenizer", str(tok), "--max-length", "512", "--format", "pretrain",
                           "--template", "none"], capture_output=True, text=True, preexec_fn=pre)  # fmt: skip


def test_large_single_record_is_truncated_and_counted(tmp_path, tiny_tokenizer):
    r = _huge_record(tmp_path, tiny_tokenizer, 16, None)
    assert r.returncode == 0, r.stderr
    ds = PackedDataset(tmp_path / "out")
    assert ds.num_samples == 2 and ds.meta["stats"]["truncated_samples"] == 1
    assert ds.meta["stats"]["truncated_tokens"] > 1_000_000
    assert ds.sample(0)["input_ids"].size == 512


@pytest.mark.slow  # reason: tokenizes a 300 MB record (minutes on 2 shared cores)
def test_record_of_hundreds_of_mb_handled_or_refused_clearly(tmp_path, tiny_tokenizer):
    r = _huge_record(tmp_path, tiny_tokenizer, 300, 8 << 30)
    if r.returncode == 0:
        assert PackedDataset(tmp_path / "out").meta["stats"]["truncated_samples"] == 1
    else:
        assert "Traceback" not in r.stderr and "error" in r.stderr, r.stderr


# --- paths leaving the data root ----------------------------------------------------------


def test_symlink_out_of_directory_input_refused(tmp_path, tiny_tokenizer):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.jsonl").write_text('{"text": "a"}\n')
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "private"}\n')
    os.symlink(secret, root / "b.jsonl")
    with pytest.raises(PackConfigError, match="outside the data root"):
        pack(root, tmp_path / "out", tokenizer=tiny_tokenizer, max_length=64, template="none")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "entry", ["../secret.jsonl", "/etc/hostname", "link.jsonl", "sub/../../secret.jsonl"]
)
def test_data_order_entries_cannot_leave_root(tmp_path, tiny_tokenizer, entry):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "secret.jsonl").write_text('{"text": "private"}\n')
    os.symlink(tmp_path / "secret.jsonl", root / "link.jsonl")
    order = tmp_path / "order.txt"
    order.write_text(f"a.jsonl\n{entry}\n")
    with pytest.raises(PackError, match=r"order.txt:2: .*(data root|not a relative)"):
        pack(root, tmp_path / "out", tokenizer=tiny_tokenizer, max_length=64, template="none",
             data_order=order)  # fmt: skip


# --- code-level rules ---------------------------------------------------------------------


def _python_sources() -> list[Path]:
    return sorted((ROOT / "pyfast_tune").rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_unpickling_of_files():
    """torch.load only with weights_only=True; no pickle/marshal/shelve/np.load(allow_pickle)."""
    bad = []
    for f in _python_sources():
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(
                    n.split(".")[0] in {"pickle", "cPickle", "dill", "shelve", "marshal"}
                    for n in names
                ):
                    bad.append(f"{f}:{node.lineno}: imports {names}")
        for call, name in _calls(tree):
            kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name.endswith("torch.load") and kw.get("weights_only") != "True":
                bad.append(f"{f}:{call.lineno}: torch.load without weights_only=True")
            if name in {"np.load", "numpy.load"} and kw.get("allow_pickle") not in (None, "False"):
                bad.append(f"{f}:{call.lineno}: np.load(allow_pickle=...)")
    assert not bad, "\n".join(bad)


def test_no_shell_strings():
    """Subprocesses take argument lists, never a shell string (data could hold `; rm -rf`)."""
    bad = []
    for f in _python_sources():
        tree = ast.parse(f.read_text())
        for call, name in _calls(tree):
            kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name in {
                "os.system",
                "os.popen",
                "subprocess.getoutput",
                "subprocess.getstatusoutput",
            }:
                bad.append(f"{f}:{call.lineno}: {name}")
            if kw.get("shell") not in (None, "False"):
                bad.append(f"{f}:{call.lineno}: shell={kw['shell']}")
            if name in {"eval", "exec"}:
                bad.append(f"{f}:{call.lineno}: {name}")
    assert not bad, "\n".join(bad)


def test_trust_remote_code_off_unless_asked():
    """Every `trust_remote_code=` passes a variable or False, and every default is False."""
    bad = []
    for f in _python_sources():
        tree = ast.parse(f.read_text())
        for call, _ in _calls(tree):
            for k in call.keywords:
                if k.arg == "trust_remote_code" and ast.unparse(k.value) == "True":
                    bad.append(f"{f}:{call.lineno}: trust_remote_code=True")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (
                    len(node.args.args) - len(node.args.defaults)
                ) + node.args.defaults
                defaults += node.args.kw_defaults
                for a, d in zip(args, defaults):
                    if a.arg == "trust_remote_code" and d is not None and ast.unparse(d) != "False":
                        bad.append(
                            f"{f}:{node.lineno}: {node.name}(trust_remote_code default not False)"
                        )
            if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "trust_remote_code":
                if node.value is None or ast.unparse(node.value) != "False":
                    bad.append(f"{f}:{node.lineno}: config default trust_remote_code not False")
    assert not bad, "\n".join(bad)
