"""The guard's disk cache: one JSON file per (op, shape class, preferred backend, environment),
written atomically under ``$PYFAST_TUNE_CACHE/guard`` (default ``~/.cache/pyfast_tune/guard``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import torch

from pyfast_tune.kernels.guard.check import Decision
from pyfast_tune.kernels.guard.environment import environment

log = logging.getLogger("pyfast_tune.guard")

CACHE_ENV = "PYFAST_TUNE_CACHE"
FORMAT = 1  # bump when the cached decision's layout or the check's rule changes


def cache_dir() -> Path:
    """Where decisions are cached: ``$PYFAST_TUNE_CACHE/guard``, else the user cache dir."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "guard"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pyfast_tune" / "guard"


def disk_path(op: str, device: torch.device, shape: dict, prefer: str | None):
    """(the file, the key it must hold) for this decision."""
    key = {"op": op, "shape": shape, "prefer": prefer, **environment(device), "format": FORMAT}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{op}-{digest}.json", key


def read(path: Path, key: dict) -> Decision | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        return Decision.from_dict(data["decision"], "disk cache")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, torn by another writer's crash, or another format: re-check


def write(path: Path, key: dict, decision: Decision) -> None:
    """tmp + rename in the same directory: a reader sees the old file or the new, whole."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"key": key, "decision": decision.as_dict()}, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("guard: could not cache the decision in %s (%s)", path.parent, e)
