"""The data engine's Python face: ``pack`` inputs into a packed directory and read it back with
``PackedDataset``. This is the only module that imports the Rust extension.

>>> stats = pack(["data/"], "packed/", tokenizer="tok/", max_length=4096,
...              template="qwen_chat")                                  # doctest: +SKIP
>>> ds = PackedDataset("packed/", max_length=4096)                      # doctest: +SKIP
>>> ds[0]["cu_seqlens"], ds.sample(0)["source"]                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyfast_tune import _packer, hub

PackError = _packer.PackError
DataFormatError = _packer.DataFormatError
TokenizerError = _packer.TokenizerError
PackConfigError = _packer.PackConfigError
CorruptDataError = _packer.CorruptDataError
# Encodes chat turns as training does (XTuner templates): chat's prompts come from it.
ChatEncoder = _packer.ChatEncoder
NoTrainableSamplesError = _packer.NoTrainableSamplesError
ShardMismatchError = _packer.ShardMismatchError
OutputExistsError = _packer.OutputExistsError
OutsideDataRootError = _packer.OutsideDataRootError

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # XTuner's placeholder for <image> (LLaVA)
# Facts of the packed format and the encoder, read from the engine rather than restated.
_FACTS = _packer.engine_facts()
IMAGE_TOKEN_ID: int = _FACTS["image_token_id"]  # IMAGE_TOKEN_INDEX as stored in input_ids.bin
FORMAT_VERSION: int = _FACTS["format_version"]
# Each binary file's (dtype, row width), in the order the engine writes them.
BINARY_LAYOUT: dict[str, tuple[str, int]] = {
    name: (f["dtype"], f["width"]) for name, f in _FACTS["binary_files"].items()
}
# Tokenizer classes that get no BOS token (XTuner's get_bos_eos_token_ids, as pack encodes).
NO_BOS_CLASSES: frozenset[str] = frozenset(_FACTS["no_bos_classes"])
# A Hub input (hf://datasets/...) or tokenizer id that cannot be had (offline: not cached).
HubError = hub.HubError


class FingerprintMismatch(PackError):
    """A packed directory was built with other settings than the caller asks for."""


@dataclasses.dataclass(frozen=True)
class PackStats:
    """What ``pack`` did. ``tokens + truncated_tokens + dropped_tokens`` is every token the
    encoder produced; ``records = samples + dropped_samples + skipped_records``."""

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
    load_seconds: float = 0.0  # tokenizer + template loading
    encode_seconds: float = 0.0  # read, parse, template, tokenize, stage
    write_seconds: float = 0.0  # plan packs, write, hash, commit

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


def pack(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike,
    max_length: int = 4096,
    format: str = "auto",
    template: str = "default",
    seed: int = 0,
    threads: int | None = None,
    skip_bad: bool = False,
    data_order: str | os.PathLike | None = None,
    progress: bool = False,
    columns: str | Mapping[str, str] | None = None,
    min_length: int = 0,
    file_type: str | None = None,
    rebuild_meta: bool = False,
    shard: tuple[int, int] | None = None,
    map_fn: Callable[[dict], dict | None] | None = None,
    tokenizer_backend: str = "auto",
    split: str | None = None,
    subset: str | None = None,
) -> PackStats:
    """Read, template, tokenize and pack ``inputs`` into ``out_dir`` (written atomically).

    inputs: files, directories (recursive, sorted by relative path) or globs; with
      ``data_order`` the single data root. JSON arrays or JSONL, plain/.gz/.zst (both are
      streamed: inputs larger than memory are fine), and pre-tokenized InternEVO ``X.bin`` with
      ``X.bin.meta`` (pick them in directories with ``file_type=".bin"``).
      Hugging Face Hub datasets as ``hf://datasets/<org>/<name>[@<revision>][/<path-or-glob>]``,
      read through ``huggingface_hub`` and its cache (``HF_HUB_OFFLINE=1`` reads the cache
      only); ``split`` (default ``train``) and ``subset`` (a config name) pick their files as
      ``datasets.load_dataset`` does, and meta.json records the commit they were read at.
    tokenizer: a directory with ``tokenizer.json`` (+ ``tokenizer_config.json`` for BOS/EOS)
      or the ``tokenizer.json`` itself; or a Hub model id ``<org>/<name>`` when no such local
      path exists (only its tokenizer files are fetched).
    format: see ``formats()`` (XTuner's map_fns; ``auto`` detects by keys). template: an XTuner
      template name, ``hf`` (the tokenizer's own chat template, loss on assistant content) or
      ``none`` (``templates()``); pretraining text is never templated.
    columns: remap dataset columns to the format's fields, ``"instruction=question,output=answer"``
      or ``{"instruction": "question", "output": "answer"}``.
    min_length: pre-tokenized rows with fewer tokens are skipped (XTuner's ``min_length``).
    rebuild_meta: rebuild a missing or inconsistent ``X.bin.meta`` instead of failing.
    shard: ``(i, n)`` encodes part i of n into ``out_dir``; join the parts with ``merge_packs``.
    map_fn: the slow path for data no format fits: a Python function called on every record
      (a dict) returning a record in ``format`` (e.g. ``{"conversation": [...]}``) or None to
      drop it. Records are mapped here in Python, one by one, into a temporary directory that
      mirrors the inputs' names (so sources stay file + record), then packed by the engine.
      Prefer ``format`` + ``columns``: they run in Rust, in parallel.
    tokenizer_backend: ``auto`` (the fast byte-level BPE path when it provably gives the ids
      of Hugging Face ``tokenizers``, else ``tokenizers``), ``hf``, or ``fast`` (fails, saying
      why, when the tokenizer does not qualify). It changes the speed, never the output.
    The output bytes depend only on the inputs and settings, never on ``threads`` or
    ``tokenizer_backend``.

    >>> pack("chats.jsonl", "packed/", tokenizer="tok/", max_length=2048,
    ...      template="qwen_chat").fill > 0.99                              # doctest: +SKIP
    True
    """
    # Hub inputs and tokenizer ids become local files before anything is written.
    inputs, sources = _resolve_sources(inputs, split, subset, data_order)
    options = _engine_options(
        sources,
        inputs=inputs,
        out_dir=out_dir,
        tokenizer=hub.resolve_tokenizer(tokenizer),
        max_length=max_length,
        format=format,
        template=template,
        seed=seed,
        threads=threads,
        skip_bad=skip_bad,
        data_order=data_order,
        columns=columns,
        min_length=min_length,
        file_type=file_type,
        rebuild_meta=rebuild_meta,
        shard=shard,
        tokenizer_backend=tokenizer_backend,
    )
    if map_fn is not None:
        return _pack_mapped(map_fn, options, progress)
    return _run_pack(options, progress)


def _engine_options(sources: list[dict], **fields: Any) -> dict[str, Any]:
    """The engine's ``PackConfig`` from Python arguments (paths as text, columns as
    ``"field=column"`` text, the shard as a list) plus the ``sources`` the Hub inputs resolved
    to, which no user sets. Shared by ``pack`` and ``fingerprint`` so both hash alike."""
    for key in ("out_dir", "tokenizer", "data_order"):
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
    return options


def _run_pack(options: dict[str, Any], progress: bool) -> PackStats:
    report, close = _tqdm_progress() if progress else (None, lambda: None)
    try:
        stats = _packer.pack(options, report)
    finally:
        close()
    return PackStats(**stats)


def _resolve_sources(inputs, split, subset, data_order) -> tuple[list[str], list[dict]]:
    """Local paths of ``inputs`` (``hf://`` ones resolved through huggingface_hub, in place)
    and, for those, where they came from (``PackConfig.sources``)."""
    paths: list[str] = []
    sources: list[dict] = []
    for inp in _inputs(inputs):
        if not hub.is_hub_url(inp):
            paths.append(inp)
            continue
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


def _read_columnar(path: str):
    """Rows of a Parquet or Arrow IPC file as the engine reads them: dicts without the null
    fields (Arrow writes a null for every key a JSON record lacked)."""
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise PackConfigError(f"{path}: map_fn on Parquet/Arrow input needs pyarrow") from None
    if path.endswith(".parquet"):
        batches = pyarrow.parquet.ParquetFile(path).iter_batches()
    else:
        with open(path, "rb") as f:
            magic = f.read(6)
        open_ = pyarrow.ipc.open_file if magic == b"ARROW1" else pyarrow.ipc.open_stream
        reader = open_(pyarrow.memory_map(path))
        batches = (
            (reader.get_batch(i) for i in range(reader.num_record_batches))
            if magic == b"ARROW1"
            else reader
        )
    for batch in batches:
        for row in batch.to_pylist():
            yield {k: v for k, v in row.items() if v is not None}


def _read_records(path: str):
    """Records of one input file, in order (the map_fn slow path): JSON arrays/JSONL and
    CSV/TSV (plain/.gz/.zst; CSV cells are strings), Parquet, Arrow IPC."""
    if path.endswith((".parquet", ".arrow")):
        yield from _read_columnar(path)
        return
    if path.endswith(".gz"):
        import gzip

        raw = gzip.open(path, "rb").read()
    elif path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise PackConfigError(
                f"{path}: map_fn on .zst input needs the zstandard package"
            ) from None
        with open(path, "rb") as f:
            raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    else:
        raw = Path(path).read_bytes()
    text = raw.decode("utf-8-sig")
    stem = path.removesuffix(".gz").removesuffix(".zst")
    if stem.endswith((".csv", ".tsv")):
        import csv
        import io

        delimiter = "\t" if stem.endswith(".tsv") else ","
        yield from csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        return
    if text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for line in text.split("\n"):
        if line.strip():
            yield json.loads(line)


def _pack_mapped(map_fn, options: dict[str, Any], progress: bool) -> PackStats:
    import tempfile

    if options["columns"]:
        raise PackConfigError("map_fn and columns are exclusive: remap inside map_fn")
    files = _packer.resolve_inputs(options)
    with tempfile.TemporaryDirectory(prefix="pyfast-tune-map-") as tmp:
        order = Path(tmp) / "data_order.txt"
        names = []
        for path, name in files:
            # Mirror the input's name so the packed directory still names its sources; one
            # line per input record (an empty conversation when dropped) keeps record indices.
            rel = name.lstrip("/").replace("..", "__")
            for ext in (".gz", ".zst"):
                rel = rel.removesuffix(ext)
            rel = rel.removesuffix(".json").removesuffix(".jsonl") + ".jsonl"
            dest = Path(tmp) / "data" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "w", encoding="utf-8") as out:
                for rec in _read_records(path):
                    mapped = map_fn(rec)
                    if mapped is None:
                        mapped = {"conversation": []}
                    out.write(json.dumps(mapped, ensure_ascii=False) + "\n")
            names.append(rel)
        order.write_text("".join(n + "\n" for n in names))
        mapped = dict(options, inputs=[str(Path(tmp) / "data")], data_order=str(order))
        return _run_pack(mapped, progress)


def merge_packs(
    parts: Sequence[str | os.PathLike], out_dir: str | os.PathLike, progress: bool = False
) -> PackStats:
    """Join the part directories written by ``pack(..., shard=(i, n))`` for every i into
    ``out_dir``: the same bytes a single ``pack`` would write.

    >>> merge_packs(["part0/", "part1/", "part2/"], "packed/")           # doctest: +SKIP
    """
    report, close = _tqdm_progress() if progress else (None, lambda: None)
    try:
        stats = _packer.merge_packs([os.fspath(p) for p in parts], os.fspath(out_dir), report)
    finally:
        close()
    return PackStats(**stats)


def data_order(root: str | os.PathLike, file_type: str = ".bin") -> list[str]:
    """Relative paths of the files under ``root`` ending with ``file_type``, recursively and
    truly sorted by relative path bytes (hidden entries skipped): the lines of XTuner's
    ``data_order.txt``, the same on every machine.

    >>> data_order("data/", ".bin")[:2]                                   # doctest: +SKIP
    ['a/0.bin', 'a/1.bin']
    """
    return list(_packer.data_order(os.fspath(root), file_type))


def render_chat(
    tokenizer: str | os.PathLike, conversations: list[list[dict]]
) -> list[tuple[str, list[int], list[int]]]:
    """Render each conversation (a list of messages) with the tokenizer's chat template, as
    ``template="hf"`` does: (text, token ids, loss mask) each. The text equals transformers'
    ``apply_chat_template(messages, tokenize=False)``; the mask is 1 on assistant content
    (``loss: false`` messages excepted) and the EOS right after it.

    >>> render_chat("tok/", [[{"role": "user", "content": "Hi"},
    ...                       {"role": "assistant", "content": "Hello"}]])   # doctest: +SKIP
    """
    out = _packer.render_chats(os.fspath(hub.resolve_tokenizer(tokenizer)), list(conversations))
    return [(text, list(ids), list(mask)) for text, ids, mask in out]


def fingerprint(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike,
    max_length: int = 4096,
    format: str = "auto",
    template: str = "default",
    seed: int = 0,
    skip_bad: bool = False,
    data_order: str | os.PathLike | None = None,
    columns: str | Mapping[str, str] | None = None,
    min_length: int = 0,
    file_type: str | None = None,
    tokenizer_backend: str = "auto",
    split: str | None = None,
    subset: str | None = None,
) -> str:
    """The fingerprint ``pack`` would write for these arguments, without packing (it hashes
    every input; Hub inputs and tokenizer ids are resolved as ``pack`` resolves them). Key a
    cache of packed directories with it.

    >>> fingerprint("chats.jsonl", tokenizer="tok/", max_length=2048)   # doctest: +SKIP
    '5c0f...'
    """
    inputs, sources = _resolve_sources(inputs, split, subset, data_order)
    options = _engine_options(
        sources,
        inputs=inputs,
        tokenizer=hub.resolve_tokenizer(tokenizer),
        max_length=max_length,
        format=format,
        template=template,
        seed=seed,
        skip_bad=skip_bad,
        data_order=data_order,
        columns=columns,
        min_length=min_length,
        file_type=file_type,
        tokenizer_backend=tokenizer_backend,
    )
    return _packer.fingerprint(options)


def exchange_dirs(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing directories atomically (``renameat2(RENAME_EXCHANGE)``), the engine's
    own commit primitive; False where the kernel or filesystem cannot, OSError otherwise."""
    return _packer.exchange_dirs(os.fspath(a), os.fspath(b))


def tokenizer_hash(tokenizer: str | os.PathLike) -> str:
    """Hex BLAKE3 of a tokenizer's files (a path or Hub id), as ``meta.json`` records it."""
    return _packer.tokenizer_hash(os.fspath(hub.resolve_tokenizer(tokenizer)))


def templates() -> list[dict[str, Any]]:
    """Every prompt template: name, system, instruction, suffix, suffix_as_eos, sep, stop_words."""
    return _packer.templates()


def formats() -> list[str]:
    """Every dataset format name accepted by ``pack``."""
    return list(_packer.format_names())


def resolve_inputs(inputs, data_order=None) -> list[tuple[str, str]]:
    """The (path, name) list ``pack`` would read, in order."""
    options = pack_options(
        inputs=_inputs(inputs), data_order=None if data_order is None else os.fspath(data_order)
    )
    return _packer.resolve_inputs(options)


def packed_row(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> dict[str, Any]:
    """A pack dict (as ``PackedDataset[i]`` returns) of samples of ``lengths`` laid end to end
    in ``ids``/``labels``: positions restart at each sample, ``cu_seqlens`` bound them."""
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    position_ids = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1], lengths)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu,
        "max_seqlen": int(lengths.max()),
    }


class PackedDataset:
    """A packed directory, memory-mapped: O(1) to open, shareable across ranks and workers.

    ``ds[i]`` is pack ``i``: ``input_ids`` (int64), ``labels`` (int64, -100 = no loss, not
    shifted), ``position_ids`` (int64, restarting at 0 per sample), ``cu_seqlens`` (int32,
    ``[0, ..., len]``) and ``max_seqlen`` (int). ``ds.sample(j)`` is sample ``j`` in input order
    with its ``source=(file, record)``.

    Pass what you expect (``tokenizer``, ``max_length``, ``template``, ``format``, ``seed``) and
    a directory built otherwise raises :class:`FingerprintMismatch`. Opening checks sizes
    against ``meta.json`` (cheap); :meth:`verify` recomputes every hash.

    >>> ds = PackedDataset("packed/", max_length=4096)      # doctest: +SKIP
    >>> len(ds), ds.num_samples, ds[0]["cu_seqlens"]         # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        tokenizer: str | os.PathLike | None = None,
        max_length: int | None = None,
        template: str | None = None,
        format: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise CorruptDataError(
                f"{meta_path}: missing: {self.path} is not a packed directory "
                "(create one with `pyfast-tune pack`)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptDataError(f"{meta_path}: unreadable meta.json: {e}") from None
        if not isinstance(self.meta, dict):
            raise CorruptDataError(
                f"{meta_path}: expected a JSON object, got {type(self.meta).__name__}"
            )
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise CorruptDataError(
                f"{meta_path}: format version {version!r}, this pyfast-tune reads {FORMAT_VERSION}"
            )
        self._check_expectations(tokenizer, max_length, template, format, seed)
        try:
            self.num_packs = int(self.meta["num_packs"])
            self.num_samples = int(self.meta["num_samples"])
            self.num_tokens = int(self.meta["num_tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptDataError(f"{meta_path}: missing or invalid count {e}") from None
        rows = {
            "input_ids.bin": self.num_tokens,
            "loss_mask.bin": self.num_tokens,
            "samples.bin": self.num_samples,
            "packs.bin": self.num_packs + 1,
            "pack_samples.bin": self.num_samples,
        }
        shapes = {}
        expected = {}
        for name, (dtype, width) in BINARY_LAYOUT.items():
            shapes[name] = (rows[name],) if width == 1 else (rows[name], width)
            expected[name] = np.dtype(dtype).itemsize * width * rows[name]
        for name, size in expected.items():
            f = self.path / name
            try:
                actual = f.stat().st_size
            except FileNotFoundError:
                raise CorruptDataError(f"{f}: missing from the packed directory") from None
            listed = self.meta.get("outputs", {}).get(name, {}).get("size")
            if actual != size or listed != size:
                raise CorruptDataError(
                    f"{f}: {actual} bytes, expected {size} (meta.json lists {listed}): "
                    "truncated or foreign file"
                )
        self.input_ids = self._map("input_ids.bin", shapes)
        self.loss_mask = self._map("loss_mask.bin", shapes)
        self.samples = self._map("samples.bin", shapes)
        self.packs = self._map("packs.bin", shapes)
        self.pack_samples = self._map("pack_samples.bin", shapes)
        self.files = [f["name"] for f in self.meta["files"]]
        images = self.path / "images.json"
        self.images: dict[int, str] = {}
        if images.is_file():
            # LLaVA: sample -> image path; <image> positions hold IMAGE_TOKEN_INDEX (-200).
            self.images = {int(j): p for j, p in json.loads(images.read_text())["samples"]}

    def _map(self, name: str, shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
        dtype, shape = BINARY_LAYOUT[name][0], shapes[name]
        if 0 in shape:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.path / name, dtype=dtype, mode="r", shape=shape)

    def _check_expectations(self, tokenizer, max_length, template, format, seed) -> None:
        wrong = []
        m = self.meta
        if max_length is not None and int(max_length) != m.get("max_length"):
            wrong.append(f"max_length {m.get('max_length')} (asked {max_length})")
        if template is not None and template != m.get("template"):
            wrong.append(f"template {m.get('template')!r} (asked {template!r})")
        if format is not None and format != m.get("format"):
            wrong.append(f"format {m.get('format')!r} (asked {format!r})")
        if seed is not None and int(seed) != m.get("seed"):
            wrong.append(f"seed {m.get('seed')} (asked {seed})")
        if tokenizer is not None:
            h = tokenizer_hash(tokenizer)
            if h != m.get("tokenizer", {}).get("hash"):
                wrong.append(
                    f"tokenizer {m.get('tokenizer', {}).get('path')!r} (asked {os.fspath(tokenizer)!r},"
                    " whose files differ)"
                )
        if wrong:
            raise FingerprintMismatch(
                f"{self.path} was packed with " + "; ".join(wrong) + ": re-run `pyfast-tune pack`"
            )

    def __len__(self) -> int:
        return self.num_packs

    def _index(self, i: int, n: int, what: str) -> int:
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{what} index {i} out of range for {n} {what}s")
        return i

    def pack_sample_ids(self, i: int) -> np.ndarray:
        """Sample ids of pack ``i`` in token order."""
        i = self._index(i, self.num_packs, "pack")
        return np.asarray(self.pack_samples[self.packs[i, 1] : self.packs[i + 1, 1]])

    def pack_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Pack ``i`` as stored: zero-copy views of its token ids (``<u4``) and loss mask
        (``u1``, 1 = trained) — the cheapest read, for loaders that build labels themselves."""
        i = self._index(i, self.num_packs, "pack")
        plain = self.__dict__.get("_plain")
        if plain is None:
            # Plain ndarray views of the maps: slicing np.memmap costs ~10x more per call.
            plain = self._plain = tuple(
                np.asarray(a) for a in (self.input_ids, self.loss_mask, self.packs)
            )
        ids, mask, packs = plain
        t0, t1 = packs[i, 0], packs[i + 1, 0]
        return ids[t0:t1], mask[t0:t1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i, self.num_packs, "pack")
        t0, s0 = self.packs[i]
        t1, s1 = self.packs[i + 1]
        ids = self._ids(t0, t1)
        labels = np.where(self.loss_mask[t0:t1] != 0, ids, IGNORE_INDEX)
        return packed_row(ids, labels, self.samples[self.pack_samples[s0:s1], 1])

    def sample(self, j: int) -> dict[str, Any]:
        """Sample ``j`` (input order): input_ids, labels, source=(file name, record index)."""
        j = self._index(j, self.num_samples, "sample")
        start, length, _pack, file, record = (int(x) for x in self.samples[j])
        ids = self._ids(start, start + length)
        labels = np.where(self.loss_mask[start : start + length] != 0, ids, IGNORE_INDEX)
        out = {"input_ids": ids, "labels": labels, "source": (self.files[file], record)}
        if self.images:
            out["image"] = self.images.get(j)
        return out

    def _ids(self, a: int, b: int) -> np.ndarray:
        ids = self.input_ids[a:b].astype(np.int64)
        if self.images:
            ids[ids == IMAGE_TOKEN_ID] = IMAGE_TOKEN_INDEX
        return ids

    @property
    def sample_lengths(self) -> np.ndarray:
        """Length of every sample, input order (int64)."""
        return np.asarray(self.samples[:, 1])

    @property
    def pack_lengths(self) -> np.ndarray:
        """Tokens in every pack (int64)."""
        return np.diff(np.asarray(self.packs[:, 0]))

    def verify(self) -> dict[str, Any]:
        """Recompute every file's BLAKE3 against meta.json and check the pack invariants
        (each sample in exactly one pack, never split, capacity respected). Returns a report;
        raises :class:`CorruptDataError` naming the file at fault."""
        return _packer.verify(os.fspath(self.path))
