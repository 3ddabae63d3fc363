"""Reading a packed directory back: :class:`PackedDataset` (memory-mapped, O(1) to open)
and :func:`packed_row`, the pack dict it returns."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pyfast_tune import _packer
from pyfast_tune.data import storage
from pyfast_tune.data.catalog import tokenizer_hash
from pyfast_tune.data.errors import CorruptDataError, FingerprintMismatch
from pyfast_tune.data.facts import (
    _FACTS,
    BINARY_LAYOUT,
    FORMAT_VERSION,
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    IMAGE_TOKEN_INDEX,
)


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
    ``[0, ..., len]``) and ``max_seqlen`` (int); a preference pack's also ``sample_ids``
    (int64, (n,): each segment's sample id) and ``pairs`` (int64, (n, 2): its pair id and role,
    0 chosen, 1 rejected), and with margins ``margins`` (float32, (n,): its pair's).
    ``ds.sample(j)`` is sample ``j`` in input order with its ``source=(file, record)``.

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
        if storage.is_remote(path):  # s3://, gs://, az://: read through a local copy
            path = storage.local_packed(path)
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
        # Preference packs: (pair id, role: 0 chosen, 1 rejected) per sample; None otherwise.
        self.pairs: np.ndarray | None = None
        if "pairs.bin" in self.meta.get("outputs", {}):
            self.pairs = self._map_optional("pairs.bin")
        # Pairs with a `margin` (reward models): each sample's pair's margin, 0 where none.
        self.margins: np.ndarray | None = None
        if "margins.bin" in self.meta.get("outputs", {}):
            self.margins = self._map_optional("margins.bin")[:, 0]
        images = self.path / "images.json"
        self.images: dict[int, str] = {}
        if images.is_file():
            # LLaVA: sample -> image path; <image> positions hold IMAGE_TOKEN_INDEX (-200).
            # Entries are [sample, path, position of its <image> in the sample].
            self.images = {int(e[0]): e[1] for e in json.loads(images.read_text())["samples"]}

    def _map_optional(self, name: str) -> np.ndarray:
        spec = _FACTS["optional_files"][name]
        dtype, width = spec["dtype"], spec["width"]
        f = self.path / name
        size = np.dtype(dtype).itemsize * width * self.num_samples
        actual = f.stat().st_size if f.is_file() else None
        if actual != size or self.meta["outputs"][name].get("size") != size:
            raise CorruptDataError(
                f"{f}: {actual} bytes, expected {size} (one row per sample): missing, "
                "truncated or foreign file"
            )
        return self._map(name, {name: (self.num_samples, width)}, dtype)

    def _map(
        self, name: str, shapes: dict[str, tuple[int, ...]], dtype: str | None = None
    ) -> np.ndarray:
        dtype, shape = dtype or BINARY_LAYOUT[name][0], shapes[name]
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
        row = packed_row(ids, labels, self.samples[self.pack_samples[s0:s1], 1])
        if self.pairs is not None:
            # Preference packs: which sample each segment is, and its (pair id, role).
            sample_ids = np.asarray(self.pack_samples[s0:s1], dtype=np.int64)
            row["sample_ids"] = sample_ids
            row["pairs"] = np.asarray(self.pairs[sample_ids], dtype=np.int64)
            if self.margins is not None:
                row["margins"] = np.asarray(self.margins[sample_ids], dtype=np.float32)
        return row

    def sample(self, j: int) -> dict[str, Any]:
        """Sample ``j`` (input order): input_ids, labels, source=(file name, record index);
        in a preference pack also ``pair`` (pair id) and ``role`` ("chosen"/"rejected")."""
        j = self._index(j, self.num_samples, "sample")
        start, length, _pack, file, record = (int(x) for x in self.samples[j])
        ids = self._ids(start, start + length)
        labels = np.where(self.loss_mask[start : start + length] != 0, ids, IGNORE_INDEX)
        out = {"input_ids": ids, "labels": labels, "source": (self.files[file], record)}
        if self.images:
            out["image"] = self.images.get(j)
        if self.pairs is not None:
            pair, role = (int(x) for x in self.pairs[j])
            out["pair"], out["role"] = pair, ("chosen", "rejected")[role]
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
