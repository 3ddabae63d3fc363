"""Hugging Face Hub inputs (``hf://datasets/...``) and tokenizer ids, read through
huggingface_hub from a cache laid out exactly as huggingface_hub lays it out (blobs,
snapshots/<commit>/ symlinks, refs/<branch>), built here with HF_HUB_OFFLINE=1: no network.
The same records pack to the same bytes from the Hub cache as from a local JSONL; meta.json
and the fingerprint record the commit; a missing id fails naming it before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from pyfast_tune import hub
from pyfast_tune.data import (
    BINARY_LAYOUT,
    HubError,
    PackConfigError,
    PackedDataset,
    fingerprint,
    pack,
)

huggingface_hub = pytest.importorskip(
    "huggingface_hub", reason="Hub inputs are read through huggingface_hub"
)

REPO = "acme/chats"


def _fake_repo(cache: Path, kind: str, repo_id: str, files: dict, refs=("main",)) -> str:
    """One commit of a repo in huggingface_hub's cache layout: each file's bytes in
    ``blobs/<hash>``, ``snapshots/<commit>/<path>`` a relative symlink to it, and
    ``refs/<name>`` holding the commit hash. Returns the commit hash."""
    folder = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    blobs = {p: d.encode() if isinstance(d, str) else d for p, d in files.items()}
    commit = hashlib.sha1(json.dumps(sorted((p, d.hex()) for p, d in blobs.items())).encode())
    commit = commit.hexdigest()
    for path, data in blobs.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """HF_HOME in tmp_path, offline. huggingface_hub reads its environment once at import,
    so its constants are set too (a subprocess test below goes through the environment)."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@pytest.fixture(scope="module")
def records(generated_chats):
    return [json.loads(line) for line in generated_chats.open()][:90]


def _packed_bytes(d: Path) -> dict[str, bytes]:
    """Every file of a packed directory but meta.json (which names the inputs)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "meta.json"}


def _pack(inputs, out, tok, **kw):
    return pack(inputs, out, tokenizer=tok, max_length=256, template="qwen_chat", **kw)


def test_the_fake_cache_is_what_huggingface_hub_reads(hf_cache, records):
    commit = _fake_repo(hf_cache, "dataset", REPO, {"train.jsonl": _jsonl(records)})
    info = huggingface_hub.scan_cache_dir(hf_cache)
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "dataset")
    (rev,) = repo.revisions
    assert rev.commit_hash == commit and rev.refs == frozenset({"main"})
    cached = huggingface_hub.try_to_load_from_cache(REPO, "train.jsonl", repo_type="dataset")
    assert cached == str(hf_cache / "datasets--acme--chats" / "snapshots" / commit / "train.jsonl")


def test_hub_dataset_packs_the_bytes_of_the_local_jsonl(
    hf_cache, records, tiny_tokenizer, tmp_path
):
    commit = _fake_repo(
        hf_cache, "dataset", REPO, {"README.md": "# chats\n", "train.jsonl": _jsonl(records)}
    )
    local = tmp_path / "train.jsonl"
    local.write_text(_jsonl(records))
    a = _pack(local, tmp_path / "local", tiny_tokenizer)
    b = _pack(f"hf://datasets/{REPO}", tmp_path / "hub", tiny_tokenizer)
    assert b.samples == a.samples == 90
    assert _packed_bytes(tmp_path / "hub") == _packed_bytes(tmp_path / "local")
    meta = PackedDataset(tmp_path / "hub").meta
    assert meta["sources"] == [
        {"repo_id": REPO, "repo_type": "dataset", "revision": commit, "split": "train",
         "subset": None, "files": ["train.jsonl"]}
    ]  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{40}", meta["sources"][0]["revision"])
    assert meta["fingerprint_inputs"]["sources"] == meta["sources"]
    assert "sources" not in PackedDataset(tmp_path / "local").meta
    # fingerprint() resolves the id as pack does, and the recorded source is part of it.
    assert fingerprint(f"hf://datasets/{REPO}", tiny_tokenizer, max_length=256,
                       template="qwen_chat") == b.fingerprint  # fmt: skip
    assert b.fingerprint != a.fingerprint


def test_revision_is_recorded_as_the_commit_and_changes_the_fingerprint(
    hf_cache, records, tiny_tokenizer, tmp_path
):
    old = _fake_repo(hf_cache, "dataset", REPO, {"train.jsonl": _jsonl(records[:40])}, ["v1"])
    new = _fake_repo(hf_cache, "dataset", REPO, {"train.jsonl": _jsonl(records[40:])})
    assert old != new
    s_main = _pack(f"hf://datasets/{REPO}", tmp_path / "main", tiny_tokenizer)
    s_tag = _pack(f"hf://datasets/{REPO}@v1", tmp_path / "tag", tiny_tokenizer)
    s_sha = _pack(f"hf://datasets/{REPO}@{old}", tmp_path / "sha", tiny_tokenizer)
    assert (s_main.samples, s_tag.samples) == (50, 40)
    revisions = [
        PackedDataset(tmp_path / d).meta["sources"][0]["revision"] for d in ("main", "tag", "sha")
    ]
    assert revisions == [new, old, old]  # never "main" or "v1"
    assert s_tag.fingerprint == s_sha.fingerprint != s_main.fingerprint


def test_split_by_the_hub_naming_convention(hf_cache, records, tiny_tokenizer, tmp_path):
    files = {
        "README.md": "# sharded\n",
        "data/train-00000-of-00002.jsonl": _jsonl(records[:30]),
        "data/train-00001-of-00002.jsonl": _jsonl(records[30:70]),
        "data/test-00000-of-00001.jsonl": _jsonl(records[70:]),
    }
    _fake_repo(hf_cache, "dataset", REPO, files)
    train = hub.resolve_dataset(f"hf://datasets/{REPO}")
    assert train.files == ["data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl"]
    assert train.split == "train" and all(Path(p).is_file() for p in train.paths)
    stats = _pack(f"hf://datasets/{REPO}", tmp_path / "test", tiny_tokenizer, split="test")
    assert stats.samples == 20
    ds = PackedDataset(tmp_path / "test")
    assert ds.sample(0)["source"] == (
        train.paths[0].replace("train-00000-of-00002", "test-00000-of-00001"),
        0,
    )
    with pytest.raises(HubError, match=r"acme/chats.*no split 'validation'.*\['train', 'test'\]"):
        hub.resolve_dataset(f"hf://datasets/{REPO}", split="validation")
    # Split names in file and directory names, as datasets reads them.
    _fake_repo(hf_cache, "dataset", "acme/flat", {"my_train.jsonl": "{}\n", "dev.jsonl": "{}\n"})
    assert hub.resolve_dataset("hf://datasets/acme/flat", split="validation").files == ["dev.jsonl"]
    _fake_repo(
        hf_cache, "dataset", "acme/dirs", {"x/train/a.jsonl": "{}\n", "x/eval/b.jsonl": "{}\n"}
    )
    assert hub.resolve_dataset("hf://datasets/acme/dirs", split="test").files == ["x/eval/b.jsonl"]


def test_paths_and_globs_in_the_url(hf_cache, records):
    files = {
        "data/train-00000-of-00002.jsonl": _jsonl(records[:30]),
        "data/train-00001-of-00002.jsonl": _jsonl(records[30:70]),
        "data/test-00000-of-00001.jsonl": _jsonl(records[70:]),
        "extra/notes.jsonl": _jsonl(records[:1]),
        "extra/dataset_info.json": "{}",
    }
    commit = _fake_repo(hf_cache, "dataset", REPO, files)
    one = hub.resolve_dataset(f"hf://datasets/{REPO}/data/test-00000-of-00001.jsonl")
    assert one.files == ["data/test-00000-of-00001.jsonl"] and one.split is None
    every = hub.resolve_dataset(f"hf://datasets/{REPO}@{commit}/data/*.jsonl")
    assert every.files == sorted(f for f in files if f.startswith("data/"))
    assert every.revision == commit
    # A directory is a data_dir: the split convention applies inside it; metadata is skipped.
    assert hub.resolve_dataset(f"hf://datasets/{REPO}/extra").files == ["extra/notes.jsonl"]
    with pytest.raises(ValueError, match="a split"):
        hub.resolve_dataset(f"hf://datasets/{REPO}/data/*.jsonl", split="test")
    with pytest.raises(HubError, match=r"acme/chats@[0-9a-f]{12}: no file matches 'data/\*\.csv'"):
        hub.resolve_dataset(f"hf://datasets/{REPO}/data/*.csv")
    with pytest.raises(HubError, match="no file or directory 'nothing'"):
        hub.resolve_dataset(f"hf://datasets/{REPO}/nothing")
    with pytest.raises(ValueError, match=r"expected hf://datasets/<org>/<name>"):
        hub.resolve_dataset("hf://models/acme/chats")


CARD = """---
license: mit
configs:
- config_name: chat
  data_files:
  - split: train
    path: chat/*.jsonl
  - split: test
    path: chat_eval.jsonl
- config_name: alpaca
  default: true
  data_dir: alpaca
  data_files: "*.jsonl"
---
# A card with two subsets
"""


def test_subset_from_the_dataset_card(hf_cache, records, tiny_tokenizer, tmp_path):
    files = {
        "README.md": CARD,
        "chat/part-0.jsonl": _jsonl(records[:10]),
        "chat/part-1.jsonl": _jsonl(records[10:25]),
        "chat_eval.jsonl": _jsonl(records[25:30]),
        "alpaca/a.jsonl": _jsonl({"instruction": f"q{i}", "output": f"a{i}"} for i in range(7)),
    }
    _fake_repo(hf_cache, "dataset", REPO, files)
    default = hub.resolve_dataset(f"hf://datasets/{REPO}")
    assert (default.subset, default.files) == ("alpaca", ["alpaca/a.jsonl"])
    chat = hub.resolve_dataset(f"hf://datasets/{REPO}", subset="chat")
    assert chat.files == ["chat/part-0.jsonl", "chat/part-1.jsonl"]
    stats = _pack(f"hf://datasets/{REPO}", tmp_path / "p", tiny_tokenizer, subset="chat",
                  split="test")  # fmt: skip
    assert stats.samples == 5
    src = PackedDataset(tmp_path / "p").meta["sources"][0]
    assert (src["subset"], src["split"], src["files"]) == ("chat", "test", ["chat_eval.jsonl"])
    with pytest.raises(HubError, match=r"no subset 'nope'; its subsets: \['chat', 'alpaca'\]"):
        hub.resolve_dataset(f"hf://datasets/{REPO}", subset="nope")
    with pytest.raises(
        HubError, match=r"subset 'alpaca': no split 'test'; its splits: \['train'\]"
    ):
        hub.resolve_dataset(f"hf://datasets/{REPO}", split="test")


def test_missing_id_offline_names_it_and_writes_nothing(
    hf_cache, records, tiny_tokenizer, tmp_path
):
    out = tmp_path / "out"
    with pytest.raises(
        HubError,
        match=r"hf://datasets/acme/absent@main: not in the Hugging Face cache .*HF_HUB_OFFLINE",
    ):
        _pack("hf://datasets/acme/absent", out, tiny_tokenizer)
    _fake_repo(hf_cache, "dataset", REPO, {"train.jsonl": _jsonl(records)})
    with pytest.raises(HubError, match=r"acme/chats@v9: not in the Hugging Face cache"):
        _pack(f"hf://datasets/{REPO}@v9", out, tiny_tokenizer)
    with pytest.raises(HubError, match=r"tokenizer 'acme/no-tokenizer': no such local path.*cache"):
        _pack(f"hf://datasets/{REPO}", out, "acme/no-tokenizer")
    with pytest.raises(PackConfigError, match="split and subset choose the files of hf://"):
        _pack(tmp_path, out, tiny_tokenizer, split="test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_home"]  # no output, no staging


@pytest.mark.skipif(
    not hasattr(huggingface_hub, "get_cached_repo_tree"),
    reason="this huggingface_hub keeps no tree listing in its cache (added in 1.x)",
)
def test_a_partial_snapshot_names_the_missing_files(hf_cache, records):
    files = {
        "data/train-00000-of-00002.jsonl": _jsonl(records[:30]),
        "data/train-00001-of-00002.jsonl": _jsonl(records[30:]),
    }
    commit = _fake_repo(hf_cache, "dataset", REPO, files)
    folder = hf_cache / "datasets--acme--chats"
    (folder / "snapshots" / commit / "data/train-00001-of-00002.jsonl").unlink()
    # The listing huggingface_hub caches beside a snapshot it downloaded (trees/<commit>.json).
    listing = {
        p: {"size": len(d), "blob_id": hashlib.sha1(d.encode()).hexdigest()}
        for p, d in files.items()
    }
    (folder / "trees").mkdir()
    (folder / "trees" / f"{commit}.json").write_text(
        json.dumps({"format_version": 1, "files": listing})
    )
    with pytest.raises(HubError, match=r"acme/chats@[0-9a-f]{12}: .*train-00001-of-00002.jsonl"):
        hub.resolve_dataset(f"hf://datasets/{REPO}")


def _tokenizer_files(tok: Path) -> dict[str, bytes]:
    return {n: (tok / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}


def test_tokenizer_id_from_the_cache(hf_cache, records, tiny_tokenizer, tmp_path, monkeypatch):
    commit = _fake_repo(hf_cache, "model", "acme/tiny", _tokenizer_files(tiny_tokenizer))
    folder = hub.resolve_tokenizer("acme/tiny")
    assert folder == str(hf_cache / "models--acme--tiny" / "snapshots" / commit)
    data = tmp_path / "train.jsonl"
    data.write_text(_jsonl(records))
    a = _pack(data, tmp_path / "by_path", tiny_tokenizer)
    b = _pack(data, tmp_path / "by_id", "acme/tiny")
    assert a.fingerprint == b.fingerprint
    assert _packed_bytes(tmp_path / "by_id") == _packed_bytes(tmp_path / "by_path")
    # An existing local path of that name wins over the Hub id.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    assert hub.resolve_tokenizer("acme/tiny") == "acme/tiny"


def test_a_tokenizer_id_fetches_only_tokenizer_files(monkeypatch):
    asked = {}

    def fake_snapshot_download(repo_id, **kw):
        asked.update(kw, repo_id=repo_id)
        raise huggingface_hub.errors.LocalEntryNotFoundError("stop here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(HubError, match="tokenizer 'acme/tiny@v2'"):
        hub.resolve_tokenizer("acme/tiny@v2")
    assert (asked["repo_id"], asked["revision"]) == ("acme/tiny", "v2")
    repo = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]  # fmt: skip
    from huggingface_hub.utils import filter_repo_objects

    fetched = list(filter_repo_objects(repo, allow_patterns=asked["allow_patterns"]))
    assert fetched == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def test_cli_packs_a_hub_split_offline_through_the_environment(
    hf_cache, records, tiny_tokenizer, tmp_path
):
    files = {"train.jsonl": _jsonl(records[:60]), "test.jsonl": _jsonl(records[60:])}
    commit = _fake_repo(hf_cache, "dataset", REPO, files)
    _fake_repo(hf_cache, "model", "acme/tiny", _tokenizer_files(tiny_tokenizer))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_cache.parent), HF_HUB_OFFLINE="1")
    out = tmp_path / "packed"
    cmd = [sys.executable, "-m", "pyfast_tune.cli", "pack", f"hf://datasets/{REPO}",
           "--split", "test", "--out", str(out), "--tokenizer", "acme/tiny",
           "--max-length", "256", "--template", "qwen_chat", "--quiet"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    meta = PackedDataset(out).meta
    assert meta["num_samples"] == 30
    assert meta["sources"][0]["revision"] == commit and meta["sources"][0]["split"] == "test"
    cmd[4] = "hf://datasets/acme/absent"
    run = subprocess.run(cmd[:-1] + ["--out", str(tmp_path / "nothing")], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode != 0 and "acme/absent" in run.stderr
    assert not (tmp_path / "nothing").exists()


LAYOUTS = [
    ["README.md", "train.jsonl", "test.jsonl"],
    ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
     "data/test-00000-of-00001.parquet", "data/random-00000-of-00001.parquet"],
    ["data/train/a.jsonl", "data/train/b.jsonl", "data/test/c.jsonl", ".hidden/train.jsonl"],
    ["openassistant_best_replies_train.jsonl", "openassistant_best_replies_eval.jsonl"],
    ["x.jsonl", "y/z.jsonl", "config.json", "__pycache__/train.jsonl"],
    ["my_train_1.csv", "my_train_2.csv", "dev.csv", "testing/a.csv"],
    ["train-part.json", "sub/validation.json", "sub/training/x.json"],
]  # fmt: skip


@pytest.mark.parametrize("files", LAYOUTS)
def test_split_convention_equals_datasets(files, tmp_path):
    data_files = pytest.importorskip("datasets.data_files", reason="the reference is datasets")
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("{}")
    patterns = data_files.get_data_patterns(str(tmp_path))
    resolved = data_files.DataFilesDict.from_local_or_remote(patterns, base_path=str(tmp_path))
    expected = {
        str(k): sorted(os.path.relpath(p, tmp_path) for p in v) for k, v in resolved.items()
    }
    ours = {
        k: sorted(hub._match(v, sorted(files))) for k, v in hub._convention(sorted(files)).items()
    }
    assert ours == expected


def test_training_config_packs_a_hub_split_with_a_hub_tokenizer(
    hf_cache, records, tiny_tokenizer, tmp_path
):
    from pyfast_tune.config import load_config
    from pyfast_tune.trainer.data_cache import prepare_packed_dir

    files = {"train.jsonl": _jsonl(records[:60]), "test.jsonl": _jsonl(records[60:])}
    commit = _fake_repo(hf_cache, "dataset", REPO, files)
    _fake_repo(hf_cache, "model", "acme/tiny", _tokenizer_files(tiny_tokenizer))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "model: acme/tiny\nmax_length: 256\nmax_steps: 1\n"
        f"data:\n  inputs: [hf://datasets/{REPO}]\n  split: test\n  tokenizer: acme/tiny\n"
        "  template: qwen_chat\n"
    )
    cfg = load_config(cfg_file)
    assert cfg.data.pack_options == {"split": "test"}
    out = prepare_packed_dir(cfg.data, cfg.max_length, None, tmp_path / "cache")
    meta = PackedDataset(out).meta
    assert meta["num_samples"] == 30
    assert (meta["sources"][0]["revision"], meta["sources"][0]["split"]) == (commit, "test")


class _FakeHub(ThreadingHTTPServer):
    """The few Hub endpoints huggingface_hub calls to resolve a revision, list a tree and
    download files (``HF_ENDPOINT`` points here): ``repos`` maps ``datasets/org/name`` or
    ``models/org/name`` to ``(commit, {path: bytes})`` on branch ``main``. Records every
    request (method, path, Authorization header)."""

    def __init__(self, repos: dict):
        self.repos, self.requests = repos, []
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _FakeHubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes, headers: dict) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = unquote(urlparse(self.path).path).strip("/").split("/")
        self.server.requests.append(
            (self.command, "/".join(path), self.headers.get("authorization"))
        )
        api = path[0] == "api"
        if api:
            path = path[1:]
        elif path[0] != "datasets":
            path = ["models", *path]
        repo = self.server.repos.get("/".join(path[:3]))
        rest = path[3:]
        if repo is None:
            return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})
        commit, files = repo
        if len(rest) >= 2 and rest[1] not in ("main", commit):
            return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"})
        oid = {p: hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest() for p, d in files.items()}
        if api and (not rest or rest[0] == "revision"):
            info = {"id": "/".join(path[1:3]), "sha": commit, "private": False,
                    "siblings": [{"rfilename": p} for p in files]}  # fmt: skip
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        if api and rest[0] == "tree":
            tree = [{"type": "file", "path": p, "size": len(d), "oid": oid[p]}
                    for p, d in sorted(files.items())]  # fmt: skip
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        name = "/".join(rest[2:])
        if api or rest[0] != "resolve" or name not in files:
            return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})
        return self._send(200, files[name], {"X-Repo-Commit": commit, "ETag": f'"{oid[name]}"'})


def test_online_through_hf_endpoint_fetches_only_the_split_and_tokenizer_files(
    records, tiny_tokenizer, tmp_path
):
    """huggingface_hub does the fetching, with HF_ENDPOINT and HF_TOKEN: only the card, the
    chosen split's files and the tokenizer's files are downloaded, the branch is recorded in
    the cache, and the same command then works offline."""
    data = {"README.md": b"# chats\n", "train.jsonl": _jsonl(records[:60]).encode(),
            "test.jsonl": _jsonl(records[60:]).encode()}  # fmt: skip
    model = {**_tokenizer_files(tiny_tokenizer), "model.safetensors": b"\0" * 4096,
             "config.json": b"{}"}  # fmt: skip
    hub_server = _FakeHub(
        {"datasets/acme/chats": ("c" * 40, data), "models/acme/tiny": ("d" * 40, model)}
    )
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN="hf_test_token",
                   HF_ENDPOINT=f"http://127.0.0.1:{hub_server.server_port}")  # fmt: skip
        cmd = [sys.executable, "-m", "pyfast_tune.cli", "pack", f"hf://datasets/{REPO}",
               "--split", "test", "--out", str(tmp_path / "online"), "--tokenizer", "acme/tiny",
               "--max-length", "256", "--template", "qwen_chat", "--quiet"]  # fmt: skip
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    finally:
        hub_server.shutdown()
    downloads = sorted(p for m, p, _ in hub_server.requests if m == "GET" and "/resolve/" in p)
    assert downloads == [
        "acme/tiny/resolve/" + "d" * 40 + "/tokenizer.json",
        "acme/tiny/resolve/" + "d" * 40 + "/tokenizer_config.json",
        "datasets/acme/chats/resolve/" + "c" * 40 + "/README.md",
        "datasets/acme/chats/resolve/" + "c" * 40 + "/test.jsonl",
    ]
    # Every request for the repos carried the token (huggingface_hub's own housekeeping aside).
    assert {auth for _, p, auth in hub_server.requests if "acme/" in p} == {"Bearer hf_test_token"}
    meta = PackedDataset(tmp_path / "online").meta
    assert meta["num_samples"] == 30 and meta["sources"][0]["revision"] == "c" * 40
    # The server is gone: offline, the cache it filled answers the same command.
    env["HF_HUB_OFFLINE"] = "1"
    cmd[cmd.index(str(tmp_path / "online"))] = str(tmp_path / "offline")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert _packed_bytes(tmp_path / "offline") == _packed_bytes(tmp_path / "online")


def test_hub_parquet_packs_the_bytes_of_the_local_jsonl(
    hf_cache, records, tiny_tokenizer, tmp_path
):
    # Most Hub datasets are Parquet shards (data/train-00000-of-0000N.parquet).
    pa = pytest.importorskip("pyarrow", reason="Parquet shards are written with pyarrow")
    import pyarrow.parquet as pq

    shards = {}
    for i, part in enumerate((records[:50], records[50:])):
        f = tmp_path / f"shard{i}.parquet"
        pq.write_table(pa.Table.from_pylist(part), f)
        shards[f"data/train-0000{i}-of-00002.parquet"] = f.read_bytes()
    commit = _fake_repo(hf_cache, "dataset", REPO, shards)
    local = [tmp_path / "train0.jsonl", tmp_path / "train1.jsonl"]  # the same two files
    local[0].write_text(_jsonl(records[:50]))
    local[1].write_text(_jsonl(records[50:]))
    _pack(local, tmp_path / "local", tiny_tokenizer)
    stats = _pack(f"hf://datasets/{REPO}", tmp_path / "hub", tiny_tokenizer)
    assert stats.samples == 90
    assert _packed_bytes(tmp_path / "hub") == _packed_bytes(tmp_path / "local")
    src = PackedDataset(tmp_path / "hub").meta["sources"][0]
    assert (src["revision"], src["files"]) == (commit, sorted(shards))


@pytest.mark.slow  # a whole merge and chat; the default run resolves Hub ids in-process above
def test_chat_and_merge_take_a_hub_model_id(hf_cache, tiny_tokenizer, tmp_path):
    """A base model named by its Hub id: transformers loads it from the cache, and our own
    steps that need its tokenizer files (chat's prompts, merge's copy) find them there."""
    pytest.importorskip("peft", reason="merge needs a PEFT adapter")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pyfast_tune.trainer.tiny import make_tiny_llama

    local = make_tiny_llama(tmp_path / "tiny", tiny_tokenizer, init_std=0.3)
    model_files = {p.name: p.read_bytes() for p in local.iterdir() if p.is_file()}
    _fake_repo(hf_cache, "model", "acme/tiny-llama", model_files)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(local), lora).save_pretrained(
        tmp_path / "adapter"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_cache.parent), HF_HUB_OFFLINE="1")

    def cli(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "pyfast_tune.cli", *args], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr
        return run.stdout

    chat = ["--prompt", "What does the cat do?", "--max-new-tokens", "6", "--template", "qwen_chat"]
    assert cli("chat", "acme/tiny-llama", *chat) == cli("chat", str(local), *chat)
    cli("merge", "acme/tiny-llama", str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = tmp_path / "merged"
    assert (merged / "tokenizer.json").read_bytes() == model_files["tokenizer.json"]


def test_shards_of_a_hub_input_merge_to_the_single_pack(
    hf_cache, records, tiny_tokenizer, tmp_path
):
    from pyfast_tune.data import merge_packs

    files = {
        f"data/train-0000{i}-of-00003.jsonl": _jsonl(records[i * 30 : i * 30 + 30])
        for i in range(3)
    }
    _fake_repo(hf_cache, "dataset", REPO, files)
    url = f"hf://datasets/{REPO}"
    whole = _pack(url, tmp_path / "whole", tiny_tokenizer)
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        _pack(url, part, tiny_tokenizer, shard=(i, 2))
    merged = merge_packs(parts, tmp_path / "merged")
    assert merged.fingerprint == whole.fingerprint
    for name in ("meta.json", *BINARY_LAYOUT):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
