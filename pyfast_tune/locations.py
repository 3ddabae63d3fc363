"""What kind of place a path names — a local path, a Hugging Face Hub URL (``hf://``) or an
object-storage URL (``s3://``, ``gs://``, ``az://``, ...) — decided from the string alone.

A leaf module (standard library only, nothing imported at load): ``pyfast-tune pack`` on local
files asks these questions and never loads ``pyfast_tune.hub`` or
``pyfast_tune.data.storage``, which it needs only for the URLs they handle.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

HF_PREFIX = "hf://"
# object-storage scheme -> the fsspec package that implements it
SCHEMES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
           "abfs": "adlfs", "abfss": "adlfs"}  # fmt: skip


def is_hub_url(spec: Any) -> bool:
    """Is ``spec`` a Hugging Face Hub URL (``hf://...``)?"""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def is_remote(path: Any) -> bool:
    """Is ``path`` an object-storage URL (``s3://``, ``gs://``, ``az://``, ...)?"""
    if not isinstance(path, str) or "://" not in path:
        return False
    return path.split("://", 1)[0].lower() in SCHEMES


def tokenizer_path(name: str | os.PathLike) -> str:
    """A local tokenizer path for ``name``: ``name`` itself when it exists, else
    ``pyfast_tune.hub.resolve_tokenizer`` (a Hub model id, fetched or read from the cache)."""
    name = os.fspath(name)
    if os.path.exists(name):
        return name
    from pyfast_tune.hub import resolve_tokenizer

    return resolve_tokenizer(name)
