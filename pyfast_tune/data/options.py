"""Pack options and statistics: the engine's one option schema (defaults, fields), Python
arguments turned into it, and the run that returns :class:`PackStats`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pyfast_tune import _packer
from pyfast_tune.data.errors import PackConfigError
from pyfast_tune.data.facts import _FACTS
from pyfast_tune.locations import is_hub_url, is_remote

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any


# PackStats' fields that the engine may leave out, with their defaults (a list: a new one each).
_OPTIONAL_STATS: dict[str, object] = {
    "load_seconds": 0.0,  # tokenizer + template loading
    "encode_seconds": 0.0,  # read, parse, template, tokenize, stage
    "write_seconds": 0.0,  # plan packs, write, hash, commit
    # Per source of a mix: name, weight, max_samples, available_samples, distinct_samples,
    # samples, tokens, loss_tokens, token_share (empty without a mix).
    "mix": list,
    # Preference packs only: pairs written, pairs cut to fit, pairs dropped (each pair is two
    # samples; a dropped pair counts 2 in dropped_samples). records = pairs + dropped_pairs
    # + skipped_records there.
    "pairs": 0,
    "truncated_pairs": 0,
    "dropped_pairs": 0,
}


class PackStats:
    """What ``pack`` did. ``tokens + truncated_tokens + dropped_tokens`` is every token the
    encoder produced; ``records = samples + dropped_samples + skipped_records``.

    A frozen record of :attr:`FIELDS` (all required but those of :attr:`OPTIONAL`), compared
    and printed by value; ``replace(**changes)`` makes a changed copy. Written out rather than
    a frozen dataclass: ``dataclasses`` imports ``inspect``, the largest import of a `pack`
    run, whose start-up is paid before the first record is read."""

    FIELDS: tuple[str, ...]  # every field below, in order (set after the class)
    OPTIONAL: frozenset[str]  # those the engine may leave out

    records: int
    samples: int
    tokens: int
    loss_tokens: int
    packs: int
    fill: float
    split_samples: int
    truncated_samples: int
    truncated_tokens: int
    dropped_samples: int
    dropped_tokens: int
    skipped_records: int
    skipped_files: int
    skipped_examples: list[str]
    seconds: float
    tokens_per_second: float
    fingerprint: str
    load_seconds: float
    encode_seconds: float
    write_seconds: float
    mix: list[dict]
    pairs: int
    truncated_pairs: int
    dropped_pairs: int

    def __init__(self, **fields: object) -> None:
        missing = [f for f in self.FIELDS if f not in fields and f not in self.OPTIONAL]
        unknown = sorted(set(fields) - set(self.FIELDS))
        if missing or unknown:
            raise TypeError(f"PackStats: missing fields {missing}, unknown fields {unknown}")
        for name in self.FIELDS:
            if name in fields:
                value = fields[name]
            else:
                value = _OPTIONAL_STATS[name]
                value = value() if callable(value) else value
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"PackStats is frozen: cannot set {name!r} (use replace)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"PackStats is frozen: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not PackStats:
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # mutable lists inside: unhashable, as the frozen dataclass was

    def __repr__(self) -> str:
        return f"PackStats({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"

    def replace(self, **changes: object) -> PackStats:
        """A copy with ``changes`` (field names of :attr:`FIELDS`)."""
        return PackStats(**{**self.__dict__, **changes})

    def summary(self) -> str:
        """One line: samples, tokens, packs, fill, truncated, dropped, skipped, time, rate."""
        return (
            f"{self.samples} samples, {self.tokens} tokens ({self.loss_tokens} trained), "
            f"{self.packs} packs, fill {self.fill:.2%}, split {self.split_samples}, "
            f"truncated {self.truncated_samples} ({self.truncated_tokens} tokens), "
            f"dropped {self.dropped_samples} ({self.dropped_tokens} tokens), "
            f"skipped {self.skipped_records} records/{self.skipped_files} files, "
            f"{self.seconds:.2f} s, {self.tokens_per_second / 1e6:.2f} M tokens/s"
        )


# The annotated fields in their order (the CLI's --json prints them so), and those optional.
PackStats.FIELDS = tuple(k for k in PackStats.__annotations__ if k not in {"FIELDS", "OPTIONAL"})
PackStats.OPTIONAL = frozenset(_OPTIONAL_STATS)


def _inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return [os.fspath(p) for p in inputs]


def pack_defaults() -> dict[str, Any]:
    """Every field of the engine's pack options (``PackConfig`` in rust/packer/src/config.rs)
    with its default: the one schema ``pack``, ``fingerprint``, the CLI and the training
    config's ``data`` section fill."""
    return _packer.pack_defaults()


def pack_fields() -> list[dict[str, Any]]:
    """Every pack option as ``{"name", "kind", "choices", "help", "default"}`` in the engine's
    order: the table the CLI builds its ``pack`` flags from (``FIELDS`` in config.rs)."""
    return _packer.pack_fields()


def pack_options(**fields: Any) -> dict[str, Any]:
    """The options the engine's ``pack`` takes: the defaults updated with ``fields``; a field
    the engine does not know is an error naming the known ones."""
    options = pack_defaults()
    unknown = sorted(set(fields) - set(options))
    if unknown:
        raise PackConfigError(f"unknown pack options {unknown}; known: {', '.join(options)}")
    options.update(fields)
    return options


def _columns(columns: str | Mapping[str, str] | None) -> str:
    if isinstance(columns, Mapping):
        return ",".join(f"{k}={v}" for k, v in columns.items())
    return columns or ""


def _tqdm_progress():
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def report(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            unit = "B" if stage == "encode" else "packs"
            bar = bars[stage] = tqdm(
                total=total, desc=stage, unit=unit, unit_scale=stage == "encode", leave=False
            )
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return report, close


def _engine_options(sources: list[dict], mix: list[dict], **fields: Any) -> dict[str, Any]:
    """The engine's ``PackConfig`` from Python arguments (paths as text, columns as
    ``"field=column"`` text, the shard as a list) plus the ``sources`` the Hub inputs resolved
    to and the ``mix`` the source mappings became (data/mix.py), which are no flags. Shared by
    ``pack`` and ``fingerprint`` so both hash alike."""
    for key in ("out_dir", "tokenizer", "data_order", "image_folder"):
        if fields.get(key) is not None:
            fields[key] = os.fspath(fields[key])
    for key in ("max_length", "seed", "min_length"):
        if key in fields:
            fields[key] = int(fields[key])
    if "columns" in fields:
        fields["columns"] = _columns(fields["columns"])
    if fields.get("shard") is not None:
        fields["shard"] = [int(x) for x in fields["shard"]]
    options = pack_options(**fields)
    options["sources"] = sources
    if mix:
        options["mix"] = mix
    return options


def _run_pack(options: dict[str, Any], progress: bool, fetch=None) -> PackStats:
    report, close = _tqdm_progress() if progress else (None, lambda: None)
    try:
        stats = _packer.pack(options, report, fetch)
    finally:
        close()
    return PackStats(**stats)


def _resolve_sources(
    inputs, split, subset, data_order, lazy: bool = False
) -> tuple[list[str], list[dict]]:
    """Local paths of ``inputs`` (``hf://`` ones resolved through huggingface_hub, in place;
    object-storage URLs copied into the cache, ``storage.fetch``; ``lazy``: as placeholders)
    and, for those, where they came from (``PackConfig.sources``)."""
    paths: list[str] = []
    sources: list[dict] = []
    for inp in _inputs(inputs):
        if is_remote(inp):  # s3://, gs://, az://: a cached local copy
            from pyfast_tune.data import storage

            paths.append(storage.fetch(inp, lazy=lazy))
            continue
        if not is_hub_url(inp):
            paths.append(inp)
            continue
        from pyfast_tune import hub

        ds = hub.resolve_dataset(
            inp, split=split, subset=subset, extensions=_FACTS["data_extensions"]
        )
        paths.extend(ds.paths)
        sources.append(ds.source())
    if not sources and (split is not None or subset is not None):
        raise PackConfigError(
            "split and subset choose the files of hf://datasets/... inputs, and none was given"
        )
    if sources and data_order is not None:
        raise PackConfigError(
            "a data-order file lists local files under one data root: it cannot take hf:// inputs"
        )
    return paths, sources


def resolve_inputs(inputs, data_order=None) -> list[tuple[str, str]]:
    """The (path, name) list ``pack`` would read, in order."""
    options = pack_options(
        inputs=_inputs(inputs), data_order=None if data_order is None else os.fspath(data_order)
    )
    return _packer.resolve_inputs(options)
