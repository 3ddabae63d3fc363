"""The data engine's Python face: ``pack`` inputs into a packed directory and read it back with
``PackedDataset``. This package is the only importer of the Rust extension; its modules split
by concern: ``errors``, ``facts`` (of the packed format), ``options`` (the engine's option
schema and ``PackStats``), ``packing`` (``pack``, ``merge_packs``, ``fingerprint``),
``mapped`` (the ``map_fn`` slow path), ``catalog`` (templates, formats, chat encoding) and
``dataset`` (``PackedDataset``). Every name is re-exported here.

>>> stats = pack(["data/"], "packed/", tokenizer="tok/", max_length=4096,
...              template="qwen_chat")                                  # doctest: +SKIP
>>> ds = PackedDataset("packed/", max_length=4096)                      # doctest: +SKIP
>>> ds[0]["cu_seqlens"], ds.sample(0)["source"]                          # doctest: +SKIP
"""

from __future__ import annotations

import importlib

# Each public name and the submodule that defines it. Names load on first access (PEP 562), so
# `pyfast-tune pack` never imports numpy (only PackedDataset needs it) and starts fast.
_EXPORTS = {
    "ChatEncoder": "catalog",
    "formats": "catalog",
    "render_chat": "catalog",
    "templates": "catalog",
    "tokenizer_hash": "catalog",
    "PackedDataset": "dataset",
    "packed_row": "dataset",
    "CorruptDataError": "errors",
    "DataFormatError": "errors",
    "FingerprintMismatch": "errors",
    "HubError": "errors",
    "NoTrainableSamplesError": "errors",
    "OutputExistsError": "errors",
    "OutsideDataRootError": "errors",
    "PackConfigError": "errors",
    "PackError": "errors",
    "ShardMismatchError": "errors",
    "TokenizerError": "errors",
    "BINARY_LAYOUT": "facts",
    "FORMAT_VERSION": "facts",
    "IGNORE_INDEX": "facts",
    "IMAGE_TOKEN_ID": "facts",
    "IMAGE_TOKEN_INDEX": "facts",
    "NO_BOS_CLASSES": "facts",
    "PackStats": "options",
    "pack_defaults": "options",
    "pack_fields": "options",
    "pack_options": "options",
    "resolve_inputs": "options",
    "data_order": "packing",
    "exchange_dirs": "packing",
    "fingerprint": "packing",
    "merge_packs": "packing",
    "pack": "packing",
}

__all__ = [
    "BINARY_LAYOUT",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "IMAGE_TOKEN_ID",
    "IMAGE_TOKEN_INDEX",
    "NO_BOS_CLASSES",
    "ChatEncoder",
    "CorruptDataError",
    "DataFormatError",
    "FingerprintMismatch",
    "HubError",
    "NoTrainableSamplesError",
    "OutputExistsError",
    "OutsideDataRootError",
    "PackConfigError",
    "PackError",
    "PackStats",
    "PackedDataset",
    "ShardMismatchError",
    "TokenizerError",
    "data_order",
    "exchange_dirs",
    "fingerprint",
    "formats",
    "merge_packs",
    "pack",
    "pack_defaults",
    "pack_fields",
    "pack_options",
    "packed_row",
    "render_chat",
    "resolve_inputs",
    "templates",
    "tokenizer_hash",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyfast_tune.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pyfast_tune.data.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
