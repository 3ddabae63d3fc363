"""Training data: a packed directory, or raw inputs packed once per node into a cache.

Ranks never exchange data or wait on a collective while it is prepared (a slow tokenizer run
would otherwise hit the NCCL/gloo timeout, a known failure of broadcast-based preparation):
the cache directory is keyed by ``pyfast_tune.data.fingerprint`` of everything that determines
the bytes, the first process of a node to take the file lock packs it (``pack`` writes
atomically), and every other process waits on the same lock and then memory-maps the result.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def prepare_packed_dir(data_cfg, max_length: int, tokenizer: str | None, cache_dir: Path) -> Path:
    """The packed directory to train on: ``data_cfg.path``, or the cache entry of its inputs."""
    if data_cfg.path is not None:
        return Path(data_cfg.path)
    from pyfast_tune.data import fingerprint, pack

    tok = data_cfg.tokenizer or tokenizer
    options = dict(
        tokenizer=tok,
        max_length=max_length,
        format=data_cfg.format,
        template=data_cfg.template,
        seed=data_cfg.pack_seed,
    )
    key = fingerprint(data_cfg.inputs, **options)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"packed-{key[:32]}"
    with open(cache_dir / f"packed-{key[:32]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not out.exists():
            log.info("packing %s into %s", data_cfg.inputs, out)
            stats = pack(data_cfg.inputs, out, skip_bad=data_cfg.skip_bad, **options)
            log.info("packed: %s", stats)
    return out
