"""Object storage: an S3 input and output on a local moto server pack to the bytes of local
files (one pack and the sharded executor), the output's manifest is uploaded last, and
``PackedDataset`` reads a packed directory from S3 through the local cache."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from pyfast_tune.data import CorruptDataError, PackedDataset, pack, storage

pytest.importorskip("s3fs", reason="S3 tests need s3fs and moto[server] (the dev extra)")
moto_server = pytest.importorskip("moto.server", reason="S3 tests need moto[server]")

BUCKET = "bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback, credentials and endpoint in the standard variables,
    and the object cache in a temporary folder."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "PYFAST_TUNE_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if not fs.exists(BUCKET):  # moto keeps its buckets in the process: another module's
        fs.mkdir(BUCKET)
    yield fs
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def chats_dir(tmp_path_factory):
    from pyfast_tune.demo import synth_conversations, write_jsonl

    d = tmp_path_factory.mktemp("s3_data") / "data"
    d.mkdir()
    write_jsonl(synth_conversations(120, seed=5), d / "a.jsonl")
    (d / "sub").mkdir()
    write_jsonl(synth_conversations(60, seed=6), d / "sub" / "b.jsonl")
    return d


def _opts(tok):
    return dict(tokenizer=tok, max_length=256, format="openai", template="default", seed=1)


def _remote_bytes(fs, prefix: str) -> dict[str, bytes]:
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.find(prefix)}


def _local_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_s3_input_and_output_equal_local_files(s3, chats_dir, tiny_tokenizer, tmp_path):
    s3.put(str(chats_dir), f"{BUCKET}/data", recursive=True)
    local = pack(str(chats_dir), tmp_path / "local", **_opts(tiny_tokenizer))
    remote = pack(f"s3://{BUCKET}/data", f"s3://{BUCKET}/packed", **_opts(tiny_tokenizer))
    assert remote.fingerprint == local.fingerprint
    assert _remote_bytes(s3, f"{BUCKET}/packed") == _local_bytes(tmp_path / "local")

    # Read back through the local cache: the same samples as the local directory.
    ds, ref = PackedDataset(f"s3://{BUCKET}/packed"), PackedDataset(tmp_path / "local")
    assert len(ds) == len(ref) and ds.meta == ref.meta
    np.testing.assert_array_equal(ds[len(ds) - 1]["input_ids"], ref[len(ref) - 1]["input_ids"])
    assert PackedDataset(f"s3://{BUCKET}/packed").path == ds.path  # cached: not copied again


@pytest.mark.slow  # slow: the executor's processes; the default run has the one-process pack
def test_s3_sharded_and_cli_runs_equal_local_files(s3, chats_dir, tiny_tokenizer, tmp_path):
    if not s3.exists(f"{BUCKET}/data"):
        s3.put(str(chats_dir), f"{BUCKET}/data", recursive=True)
    local = tmp_path / "local"
    pack(str(chats_dir), local, **_opts(tiny_tokenizer))
    # Sharded: the executor's shards read the cached copy, the merge is uploaded.
    pack(f"s3://{BUCKET}/data", f"s3://{BUCKET}/sharded", shards=2, **_opts(tiny_tokenizer))
    assert _remote_bytes(s3, f"{BUCKET}/sharded") == _local_bytes(local)
    assert not list((Path(os.environ["PYFAST_TUNE_CACHE"]) / "objects" / "out").iterdir())

    # The CLI passes URLs through.
    from pyfast_tune.cli import main

    assert main(["pack", f"s3://{BUCKET}/data", "--out", f"s3://{BUCKET}/cli", "--tokenizer",
                 str(tiny_tokenizer), "--max-length", "256", "--format", "openai", "--seed", "1",
                 "--quiet"]) == 0  # fmt: skip
    assert _remote_bytes(s3, f"{BUCKET}/cli") == _local_bytes(local)


def test_shards_download_only_the_objects_they_read(s3, tiny_tokenizer, tmp_path, monkeypatch):
    from pyfast_tune.data import merge_packs
    from pyfast_tune.demo import synth_conversations, write_jsonl

    d = tmp_path / "many"
    d.mkdir()
    for k in range(6):  # objects smaller than a share: one unit each, read by one shard
        write_jsonl(synth_conversations(20, seed=10 + k), d / f"s{k}.jsonl")
    write_jsonl(synth_conversations(150, seed=20), d / "zbig.jsonl")  # over a share: split
    s3.put(str(d), f"{BUCKET}/many", recursive=True)
    pack(str(d), tmp_path / "local", **_opts(tiny_tokenizer))
    fetched = []
    for i in range(3):  # each shard on a machine of its own: its own cache
        monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path / f"cache{i}"))
        pack(f"s3://{BUCKET}/many", tmp_path / f"p{i}", shard=(i, 3), **_opts(tiny_tokenizer))
        views = tmp_path / f"cache{i}" / "objects" / "views"
        # a downloaded object is linked from objects/blobs; a placeholder is not
        fetched.append({p.name for p in views.rglob("*.jsonl") if p.stat().st_nlink == 2})
    merge_packs([tmp_path / f"p{i}" for i in range(3)], tmp_path / "merged")
    assert _local_bytes(tmp_path / "merged") == _local_bytes(tmp_path / "local")
    small = {f"s{k}.jsonl" for k in range(6)}
    assert sorted(len(f & small) for f in fetched) != [0, 0, 6]  # spread over the shards
    assert sum(len(f & small) for f in fetched) == 6 and set().union(*fetched) >= small
    # split by line: each shard reading part of it fetched byte ranges into its placeholder
    # (at 160 kB, its share and the 64 kB at each end are about all of it: see
    # test_object_store_ranges.py for a large object)
    assert not any("zbig.jsonl" in f for f in fetched)
    ranged = [sum(hi - lo for lo, hi in have) for p, have in storage._HAVE.items()
              if p.startswith(str(tmp_path)) and p.endswith("zbig.jsonl")]  # fmt: skip
    size = (d / "zbig.jsonl").stat().st_size
    assert len(ranged) >= 2 and all(0 < r <= size for r in ranged), (ranged, size)


def test_pretokenized_shards_fetch_each_bin_with_its_meta(s3, tiny_tokenizer, tmp_path,
                                                          monkeypatch):  # fmt: skip
    from test_pretok import gen_rows, write_bin

    from pyfast_tune.data import merge_packs

    d = tmp_path / "bins"
    for k in range(4):
        write_bin(d / f"x{k}.bin", gen_rows(30, seed=k))
    s3.put(str(d), f"{BUCKET}/bins", recursive=True)
    kw = dict(tokenizer=tiny_tokenizer, max_length=256, file_type=".bin")
    pack(str(d), tmp_path / "local", **kw)
    for i in range(2):
        monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path / f"cache{i}"))
        pack(f"s3://{BUCKET}/bins", tmp_path / f"p{i}", shard=(i, 2), **kw)
    merge_packs([tmp_path / "p0", tmp_path / "p1"], tmp_path / "merged")
    assert _local_bytes(tmp_path / "merged") == _local_bytes(tmp_path / "local")


@pytest.mark.slow  # slow: a Ray cluster of 2 nodes (~30 s)
def test_ray_stages_an_s3_output_in_the_work_dir(s3, chats_dir, tiny_tokenizer, tmp_path,
                                                 monkeypatch):  # fmt: skip
    pytest.importorskip(
        "ray", reason="the Ray executor's tests need Ray: pip install 'pyfast-tune[ray]'"
    )
    from test_executor import _start_cluster

    uploaded = []
    upload = storage.upload_dir
    monkeypatch.setattr(storage, "upload_dir", lambda d, url: (uploaded.append(d), upload(d, url)))
    if not s3.exists(f"{BUCKET}/data"):
        s3.put(str(chats_dir), f"{BUCKET}/data", recursive=True)
    local = tmp_path / "local"
    pack(str(chats_dir), local, **_opts(tiny_tokenizer))
    cluster, _ = _start_cluster(head_cpus=1, workers=1)  # started with the S3 variables set
    try:
        work = tmp_path / "work"
        pack(f"s3://{BUCKET}/data", f"s3://{BUCKET}/ray", executor="ray", shards=2,
             address=cluster.address, work_dir=work, **_opts(tiny_tokenizer))  # fmt: skip
    finally:
        cluster.shutdown()
    assert _remote_bytes(s3, f"{BUCKET}/ray") == _local_bytes(local)
    # the output was staged beside the parts (every node sees it), and is gone after the upload
    assert len(uploaded) == 1 and Path(uploaded[0]).is_relative_to(work)
    assert sorted(p.name for p in work.iterdir()) == ["part-0-of-2", "part-1-of-2", "plan.json"]


def test_manifest_is_uploaded_last(s3, tmp_path, monkeypatch):
    d = tmp_path / "out"
    d.mkdir()
    for name in ("input_ids.bin", "meta.json", "samples.bin"):
        (d / name).write_bytes(name.encode())
    s3.pipe(f"{BUCKET}/m/meta.json", b"old")
    order = []
    fs = storage.filesystem(f"s3://{BUCKET}/m")[0]  # the instance upload_dir will use
    put = fs.put_file

    def spy(lpath, rpath, **kw):
        # When a data file goes up, no manifest (old or new) is there to describe it.
        order.append((rpath.rsplit("/", 1)[1], fs.exists(f"{BUCKET}/m/meta.json")))
        return put(lpath, rpath, **kw)

    monkeypatch.setattr(fs, "put_file", spy)
    storage.upload_dir(d, f"s3://{BUCKET}/m")
    assert order == [("input_ids.bin", False), ("samples.bin", False), ("meta.json", False)]
    assert s3.cat_file(f"{BUCKET}/m/meta.json") == b"meta.json"


def test_a_directory_without_manifest_is_refused(s3):
    s3.pipe(f"{BUCKET}/half/input_ids.bin", b"\0" * 8)
    with pytest.raises(CorruptDataError, match="meta.json: missing.*written last"):
        PackedDataset(f"s3://{BUCKET}/half")
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.fetch(f"s3://{BUCKET}/nothing-here")


def test_a_bad_record_in_an_object_names_its_url(s3, tiny_tokenizer, tmp_path):
    from pyfast_tune import DataFormatError

    good = json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}]})  # fmt: skip
    s3.pipe(f"{BUCKET}/bad/x/chats.jsonl", (good + "\n" + "{not json\n").encode())
    with pytest.raises(DataFormatError) as e:
        pack(f"s3://{BUCKET}/bad", tmp_path / "out", **_opts(tiny_tokenizer))
    assert f"s3://{BUCKET}/bad/x/chats.jsonl" in str(e.value), str(e.value)
    assert e.value.path == f"s3://{BUCKET}/bad/x/chats.jsonl" and e.value.line == 2
    assert str(storage.cache_root()) not in str(e.value)


@pytest.fixture(params=["gs", "az"])
def other_store(request, monkeypatch, tmp_path):
    """``gs://`` or ``az://`` served by an in-memory fsspec filesystem registered under that
    scheme: our URL handling (fetch, upload with the manifest last, reading back) on a store
    that is not S3. gcsfs/adlfs themselves and the real services are not exercised here
    (neither has a local server on PyPI)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    scheme = request.param

    class Store(MemoryFileSystem):
        protocol = (scheme,)
        store: dict = {}
        pseudo_dirs = [""]
        cachable = False

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path).removeprefix(f"{scheme}://").strip("/")
            return "/" + path if path else ""

    fsspec.register_implementation(scheme, Store, clobber=True)
    monkeypatch.setenv("PYFAST_TUNE_CACHE", str(tmp_path / "cache"))
    yield scheme, Store()
    from fsspec.registry import _registry

    _registry.pop(scheme, None)  # the scheme falls back to its real package again


def test_gs_and_az_urls_pack_and_read_back_like_local_files(other_store, chats_dir,
                                                           tiny_tokenizer, tmp_path):  # fmt: skip
    scheme, fs = other_store
    fs.put(str(chats_dir), "/bucket/data", recursive=True)
    local = pack(str(chats_dir), tmp_path / "local", **_opts(tiny_tokenizer))
    remote = pack(f"{scheme}://bucket/data", f"{scheme}://bucket/packed", **_opts(tiny_tokenizer))
    assert remote.fingerprint == local.fingerprint
    got = {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.find("/bucket/packed")}
    assert got == _local_bytes(tmp_path / "local")
    ds = PackedDataset(f"{scheme}://bucket/packed")
    assert ds.meta == PackedDataset(tmp_path / "local").meta
