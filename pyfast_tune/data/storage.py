"""Object storage: ``s3://``, ``gs://`` and ``az://`` inputs, outputs and packed directories.

Through fsspec (s3fs, gcsfs, adlfs), as ``hf://`` goes through huggingface_hub, and not the
``object_store`` crate in the Rust core: the engine keeps one way of reading (local files:
positioned reads, mmap, the same code as every other input), no cloud SDK or TLS stack enters
the wheel, and each store's client reads its standard credentials and settings itself —
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``/``AWS_PROFILE``/
``AWS_ENDPOINT_URL``/``AWS_DEFAULT_REGION`` (s3fs via botocore), ``GOOGLE_APPLICATION_CREDENTIALS``
(gcsfs), ``AZURE_STORAGE_CONNECTION_STRING`` or ``AZURE_STORAGE_ACCOUNT_NAME`` +
``AZURE_STORAGE_KEY`` (adlfs); fsspec's own ``FSSPEC_S3_*`` variables work too.

- Inputs (an object or a prefix) are copied once per run into a local cache keyed by the
  listing (names, sizes, ETags), ``$PYFAST_TUNE_CACHE/objects`` (default
  ``~/.cache/pyfast_tune/objects``); a prefix keeps its relative layout, so file names — and
  the bytes — are those of the same files packed from a local folder.
- A shard (``pack(..., shard=(i, n))``, each task of ``executor=``) fetches only the bytes
  it reads: ``fetch(url, lazy=True)`` lays out the prefix with an empty (sparse) placeholder
  of each object's size, the engine's ``whole_files`` makes every object of at most one
  share of the bytes one unit read by one shard, and ``_packer.shard_reads`` says how the
  shard reads each object. ``materialize`` downloads those it reads whole (units, and
  objects that cannot be split at an arbitrary byte: compressed, CSV/TSV — a quoted field
  may hold a newline —, Parquet, Arrow, pre-tokenized ``.bin`` with its ``.meta``) into
  ``objects/blobs`` (one copy per object and version, hard-linked into place). A larger
  JSONL object is split by line: the shard reads the lines that begin in its share, and the
  engine asks ``fetch_range`` for every byte range before it reads it, which downloads what
  this process lacks with ranged GETs into the placeholder (16 MiB each, 8 at a time) — the
  share (asked for at once, before it is read), the line that
  crosses its end (asked for in 64 KiB steps), the object's first bytes (its kind and
  format) and its first and last 64 KiB (a check that all shards saw one version; after each
  download the object's version — ETag, generation — is asked again and must still be the
  listed one, so no part mixes two versions), about
  its share of the bytes in all. Only a bad record that stops a shard asks for the bytes
  before its share (to name the record's line in the whole object). The engine asks, rather
  than the front end computing ranges in advance, because only the engine knows where the
  line crossing the share's end stops and how far the format probe reads — and a read it
  did not announce would see the placeholder's zeros.
- An output URL: the directory is packed locally (atomically, as always), then uploaded with
  ``meta.json`` last, after removing the old ``meta.json`` first: a reader never sees a
  manifest that does not describe the files beside it.
- Reading (``PackedDataset``, training): a packed directory URL is copied into the cache
  (``objects/packed/<url hash>``) when its ``meta.json`` differs from the cached one, files
  first and ``meta.json`` last, then memory-mapped from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyfast_tune.data.errors import CorruptDataError, PackConfigError
from pyfast_tune.locations import SCHEMES, is_remote  # noqa: F401 (storage.is_remote)

META = "meta.json"
# local copy (file or folder) -> the URL it is a copy of, for every fetch of this process:
# errors in the data name the URL, not the cache (``name_urls``)
_COPIES: dict[str, str] = {}
# placeholder laid out by a lazy fetch -> (filesystem, object path, its listing info)
_LAZY: dict[str, tuple[Any, str, dict]] = {}
# placeholder -> the byte ranges of it this process downloaded (sorted, disjoint)
_HAVE: dict[str, list[tuple[int, int]]] = {}
# bytes per ranged GET, and GETs in flight at once (their bytes are held in memory)
RANGE_BYTES = 16 << 20
RANGE_BATCH = 8


def cache_root() -> Path:
    """Where copies of remote objects live: ``$PYFAST_TUNE_CACHE/objects``."""
    base = os.environ.get("PYFAST_TUNE_CACHE") or os.path.join("~", ".cache", "pyfast_tune")
    return Path(base).expanduser() / "objects"


def filesystem(url: str):
    """(fsspec filesystem, path without the scheme) for ``url``; a missing client is an error
    naming the package to install."""
    scheme = url.split("://", 1)[0].lower()
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError:
        pkg = SCHEMES.get(scheme, "fsspec")
        raise PackConfigError(f"{url}: {scheme}:// needs {pkg}: pip install {pkg}") from None


def _version(info: dict) -> str:
    """What changes when an object is rewritten: its ETag (S3, Azure), else md5/generation
    (GCS) or modification time."""
    for k in ("ETag", "etag", "md5Hash", "generation", "LastModified", "mtime", "last_modified"):
        if info.get(k) is not None:
            return f"{k}={info[k]}"
    return ""


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def fetch(url: str, lazy: bool = False) -> str:
    """A local copy of the object or prefix ``url`` (fetched once; later calls with the same
    listing get the cached copy): a file path for an object, a folder for a prefix. ``lazy``:
    placeholders of the objects' sizes in a view folder of their own, for ``materialize``."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    if fs.isfile(path):
        listing = {path: fs.info(path)}
        root = path.rsplit("/", 1)[0]
        single = True
    else:
        listing = fs.find(path, detail=True)
        root = path
        single = False
    if not listing:
        raise FileNotFoundError(f"{url}: no such object or prefix")
    rel = {p: p[len(root) :].lstrip("/") for p in listing}
    key = _key(url, sorted((rel[p], i.get("size"), _version(i)) for p, i in listing.items()))
    name = path.rsplit("/", 1)[-1] or "data"
    done = cache_root() / ("views" if lazy else "") / key
    local = done / name if not single else done / rel[path]
    _COPIES[os.fspath(local)] = url.rstrip("/")
    if lazy:
        for p, info in sorted(listing.items()):
            dest = done / rel[p] if single else done / name / rel[p]
            _placeholder(dest, int(info.get("size") or 0))
            # by the path as laid out and as resolved: the engine names it either way
            _LAZY[os.fspath(dest)] = _LAZY[os.path.realpath(dest)] = (fs, p, info)
        return os.fspath(local)
    if done.is_dir():
        return os.fspath(local)
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=done.parent))
    try:
        for p, info in sorted(listing.items()):
            dest = tmp / rel[p] if single else tmp / name / rel[p]
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(p, os.fspath(dest))
            if info.get("size") is not None and dest.stat().st_size != info["size"]:
                raise OSError(f"{url}: {p} changed while it was copied")
        try:
            os.replace(tmp, done)
        except OSError:  # another process finished first: its copy is the same objects
            if not done.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.fspath(local)


def _placeholder(dest: Path, size: int) -> None:
    """An empty (sparse) file of ``size`` bytes at ``dest`` unless a file is there (a
    placeholder or the object itself, put there by another shard on this machine)."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    # hidden while it is written: the engine's directory walk skips hidden entries
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.truncate(size)
    try:
        os.link(tmp, dest)  # fails when another process was first: its file stays
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _blob(fs, remote: str, info: dict) -> Path:
    """Where the whole copy of an object lives: one per object and version."""
    key = _key(fs.unstrip_protocol(remote), info.get("size"), _version(info))
    return cache_root() / "blobs" / key


def fetch_range(path: str, start: int, end: int) -> None:
    """The engine's ``fetch`` hook (``_packer.pack(..., fetch=)``): download bytes
    ``start..end`` (clipped to the object's size) of the object behind the placeholder
    ``path`` into it, unless this process has them or the whole object is in place; any
    other path (a local file) is left alone."""
    entry = _LAZY.get(path) or _LAZY.get(os.path.realpath(path))
    if entry is None:
        return
    fs, remote, info = entry
    size = int(info.get("size") or 0)
    end = min(end, size)
    have = _HAVE.setdefault(path, [])
    missing = _missing(have, start, end)
    if not missing:
        return
    blob = _blob(fs, remote, info)
    if blob.is_file() and os.path.samefile(blob, path):  # materialized whole
        have[:] = [(0, size)]
        return
    url = fs.unstrip_protocol(remote)
    pieces = [
        (a, min(a + RANGE_BYTES, hi)) for lo, hi in missing for a in range(lo, hi, RANGE_BYTES)
    ]
    fd = os.open(path, os.O_WRONLY)
    try:
        for k in range(0, len(pieces), RANGE_BATCH):
            batch = pieces[k : k + RANGE_BATCH]
            if len(batch) == 1:  # one GET: no event loop round trip
                datas = [fs.cat_file(remote, start=batch[0][0], end=batch[0][1])]
            else:
                starts, stops = [a for a, _ in batch], [b for _, b in batch]
                datas = fs.cat_ranges([remote] * len(batch), starts, stops)
            for (at, stop), data in zip(batch, datas, strict=True):
                if isinstance(data, BaseException):
                    raise data
                if len(data) != stop - at:
                    raise OSError(
                        f"{url}: {len(data)} bytes at {at}, expected {stop - at}: the object "
                        "changed while it was read"
                    )
                os.pwrite(fd, data, at)
    finally:
        os.close(fd)
    _check_version(fs, remote, info, url)
    have[:] = _union(have + missing)


def _check_version(fs, remote: str, info: dict, url: str) -> None:
    """Refuse bytes of an object rewritten since it was listed: asked again after each
    download (not from the file system's listing cache), the object's version (ETag,
    generation, ...) must still be the listed one. A shard reads an object in several ranged
    GETs, and parts merge the ranges of several shards: without this, a rewrite of the same
    size between two GETs would give a part of two versions."""
    want = _version(info)
    if not want:
        return
    fs.invalidate_cache(remote)
    now = _version(fs.info(remote))
    if now != want:
        raise OSError(
            f"{url}: the object changed while it was read ({want} when listed, {now} now): "
            "pack it again once it stays the same"
        )


def _missing(have: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``start..end`` that the sorted, disjoint ranges ``have`` leave out."""
    out = []
    for lo, hi in have:
        if hi <= start:
            continue
        if lo >= end:
            break
        if lo > start:
            out.append((start, lo))
        start = max(start, hi)
    if start < end:
        out.append((start, end))
    return out


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def materialize(paths) -> int:
    """Download the objects behind these placeholders of lazy fetches (other paths are left
    alone) into ``objects/blobs`` and hard-link them into place; how many were downloaded."""
    blobs = cache_root() / "blobs"
    fetched = 0
    for local in paths:
        entry = _LAZY.get(os.fspath(local))
        if entry is None:
            continue
        fs, remote, info = entry
        blob = _blob(fs, remote, info)
        if not blob.is_file():
            blobs.mkdir(parents=True, exist_ok=True)
            tmp = blobs / f".{blob.name}.tmp-{os.getpid()}"
            try:
                fs.get_file(remote, os.fspath(tmp))
                if info.get("size") is not None and tmp.stat().st_size != info["size"]:
                    raise OSError(f"{fs.unstrip_protocol(remote)} changed while it was copied")
                os.replace(tmp, blob)
            finally:
                tmp.unlink(missing_ok=True)
            fetched += 1
        if not os.path.samefile(blob, local):
            link = Path(local).parent / f".{Path(local).name}.link-{os.getpid()}"
            os.link(blob, link)
            os.replace(link, local)  # atomic: readers see the placeholder or the object
    return fetched


def name_urls(error: BaseException) -> None:
    """Rewrite ``error`` (a data error raised on a fetched copy) to name the object's URL
    where it names the copy in the cache: its message and its ``path``."""
    path = getattr(error, "path", None)
    for local, url in _COPIES.items():
        if error.args and isinstance(error.args[0], str) and local in error.args[0]:
            error.args = (error.args[0].replace(local, url), *error.args[1:])
        if isinstance(path, str) and (path == local or path.startswith(local + os.sep)):
            error.path = url + path[len(local) :].replace(os.sep, "/")


def upload_dir(local: str | os.PathLike, url: str) -> None:
    """Upload the packed (or part) directory ``local`` to ``url``: the old ``meta.json``
    removed first, every other file, then ``meta.json`` last."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    local = Path(local)
    if fs.exists(f"{path}/{META}"):
        fs.rm_file(f"{path}/{META}")
    for f in sorted(local.iterdir()):
        if f.name != META and f.is_file():
            fs.put_file(os.fspath(f), f"{path}/{f.name}")
    fs.put_file(os.fspath(local / META), f"{path}/{META}")


def write_remote(url: str, write: Callable[[str], Any], base=None) -> Any:
    """``write(local_dir)`` into a fresh local folder (under ``base``, default the cache's
    ``out``), then :func:`upload_dir` it to ``url``; what ``write`` returned. The local folder
    goes either way."""
    filesystem(url)  # a missing client fails before any work
    base = Path(base) if base is not None else cache_root() / "out"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="pack-", dir=base))
    try:
        result = write(os.fspath(tmp / "packed"))
        upload_dir(tmp / "packed", url)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_packed(url: str) -> Path:
    """A local copy of the packed directory at ``url``, refreshed when its ``meta.json``
    changed; files first, ``meta.json`` last, so the copy is whole or absent."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    try:
        meta_bytes = fs.cat_file(f"{path}/{META}")
    except FileNotFoundError:
        raise CorruptDataError(
            f"{url}/{META}: missing: {url} is not a packed directory, or one still being "
            "uploaded (its meta.json is written last)"
        ) from None
    try:
        outputs = json.loads(meta_bytes)["outputs"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptDataError(f"{url}/{META}: unreadable meta.json: {e}") from None
    dest = cache_root() / "packed" / _key(url)
    if (dest / META).is_file() and (dest / META).read_bytes() == meta_bytes:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for name, out in outputs.items():
            fs.get_file(f"{path}/{name}", os.fspath(tmp / name))
            if (tmp / name).stat().st_size != out.get("size"):
                raise CorruptDataError(
                    f"{url}/{name}: {(tmp / name).stat().st_size} bytes, meta.json says "
                    f"{out.get('size')} (replaced while it was read? read it again)"
                )
        if fs.cat_file(f"{path}/{META}") != meta_bytes:
            raise CorruptDataError(f"{url}: replaced while it was read; read it again")
        (tmp / META).write_bytes(meta_bytes)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
