"""Training data: a packed directory, or raw inputs packed once per node into a cache.

Ranks never exchange data or wait on a collective while it is prepared (a slow tokenizer run
would otherwise hit the NCCL/gloo timeout, a known failure of broadcast-based preparation):
the cache directory is keyed by ``pyfast_tune.data.fingerprint`` of everything that determines
the bytes, the first process of a node to take the file lock packs it (``pack`` writes
atomically), and every other process waits on the same lock and then memory-maps the result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path

from pyfast_tune.config import ConfigError

log = logging.getLogger(__name__)


def prepare_packed_dir(data_cfg, max_length: int, tokenizer: str | None, cache_dir: Path) -> Path:
    """The packed directory to train on: ``data_cfg.path``, or the cache entry of its inputs."""
    if data_cfg.path is not None:
        from pyfast_tune.data import storage

        if storage.is_remote(data_cfg.path):  # s3://, gs://, az://: one local copy per node
            cache_dir.mkdir(parents=True, exist_ok=True)
            with open(cache_dir / "remote.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                return storage.local_packed(data_cfg.path)
        return Path(data_cfg.path)
    from pyfast_tune.data import fingerprint, pack

    tok = data_cfg.tokenizer or tokenizer
    options = dict(
        tokenizer=tok,
        max_length=max_length,
        format=data_cfg.format,
        template=data_cfg.template,
        seed=data_cfg.pack_seed,
        **data_cfg.pack_options,
    )
    # rebuild_meta decides whether a bad .bin.meta fails, never the bytes: not part of the key.
    key = fingerprint(data_cfg.inputs, **{k: v for k, v in options.items() if k != "rebuild_meta"})
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"packed-{key[:32]}"
    with open(cache_dir / f"packed-{key[:32]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not out.exists():
            log.info("packing %s into %s", data_cfg.inputs, out)
            stats = pack(data_cfg.inputs, out, skip_bad=data_cfg.skip_bad, **options)
            log.info("packed: %s", stats)
    return out


def verify_packed_dir(packed_dir: Path, cache_dir: Path) -> bool:
    """Hash-check ``packed_dir`` (``PackedDataset.verify``: BLAKE3 of every file against
    meta.json, pack invariants) before training on it; raises ``CorruptDataError`` naming the
    file at fault. Returns False when it was skipped as already verified.

    Once per node and per state of the files: the first process to take the lock verifies and
    leaves a marker keyed by the directory's real path and each file's size, inode, mtime and
    ctime (ctime cannot be set back, so any write to a file since forces a new check); the
    other processes wait on the lock, see the marker and go on. Corruption that leaves every
    file's metadata unchanged (bit rot under the filesystem) is ``pyfast-tune verify``'s job.
    """
    from pyfast_tune.data import PackedDataset

    packed_dir = Path(packed_dir).resolve()
    h = hashlib.blake2b(os.fsencode(packed_dir), digest_size=16)
    for name in sorted(os.listdir(packed_dir)):
        st = os.stat(packed_dir / name)
        h.update(json.dumps([name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]).encode())
    cache_dir.mkdir(parents=True, exist_ok=True)
    marker = cache_dir / f"verified-{h.hexdigest()}"
    with open(cache_dir / "verify.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return False
        report = PackedDataset(packed_dir).verify()
        log.info("verified %s: %s", packed_dir, {k: v for k, v in report.items() if k != "files"})
        marker.write_text(json.dumps({"path": str(packed_dir)}) + "\n")
    return True


def packed_template(configured: str | None, meta: dict, packed_dir) -> str:
    """The template a packed directory was encoded with (its meta.json). A config that names
    another one would train with one template and chat with another: an error naming both."""
    packed = meta.get("template")
    if packed is None:
        raise ConfigError(f"{packed_dir}/meta.json records no template (not a packed directory?)")
    if configured is not None and configured != packed:
        raise ConfigError(
            f"data.template is {configured!r} but {packed_dir} was packed with template "
            f"{packed!r}: drop data.template (the packed directory's is used) or re-pack with "
            f"--template {configured}"
        )
    return packed
