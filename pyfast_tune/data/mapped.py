"""The ``map_fn`` slow path: records read in Python, mapped one by one into a temporary
directory that mirrors the inputs' names, then packed by the engine."""

from __future__ import annotations

import json

from pyfast_tune import _packer
from pyfast_tune.data.errors import PackConfigError
from pyfast_tune.data.options import PackStats, _run_pack

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any


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
        with open(path, "rb") as f:
            raw = f.read()
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
    from pathlib import Path

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
