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

from pyfast_tune.data.catalog import ChatEncoder, formats, render_chat, templates, tokenizer_hash
from pyfast_tune.data.dataset import PackedDataset, packed_row
from pyfast_tune.data.errors import (
    CorruptDataError,
    DataFormatError,
    FingerprintMismatch,
    HubError,
    NoTrainableSamplesError,
    OutputExistsError,
    OutsideDataRootError,
    PackConfigError,
    PackError,
    ShardMismatchError,
    TokenizerError,
)
from pyfast_tune.data.facts import (
    BINARY_LAYOUT,
    FORMAT_VERSION,
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    IMAGE_TOKEN_INDEX,
    NO_BOS_CLASSES,
)
from pyfast_tune.data.options import (
    PackStats,
    pack_defaults,
    pack_fields,
    pack_options,
    resolve_inputs,
)
from pyfast_tune.data.packing import data_order, exchange_dirs, fingerprint, merge_packs, pack

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
