"""Our packed data and ops under ``transformers.Trainer`` or TRL's ``SFTTrainer``.

``PackedTorchDataset`` serves a packed directory one pack per item (the packer already did
the packing: no ``packing=True``, no padding); ``PackedCollator`` flattens a batch of packs
into one padding-free row with exactly the keys transformers' padding-free path reads —
``input_ids``, ``labels``, ``position_ids`` restarting per sample, ``cu_seq_lens_q/k`` and
``max_length_q/k`` — and ``pyfast_tune.patch.apply(model)`` makes the model's attention (and
LoRA layers) our ops, which take the segment boundaries from those kwargs::

    from transformers import Trainer, TrainingArguments
    from pyfast_tune import patch
    from pyfast_tune.hf import PackedCollator, PackedTorchDataset

    model.config.use_cache = False
    patch.apply(model)
    trainer = Trainer(model=model, args=TrainingArguments("out", per_device_train_batch_size=2),
                      train_dataset=PackedTorchDataset("packed/"), data_collator=PackedCollator())
    trainer.train()

Labels stay unshifted, as every HF causal LM expects (its loss predicts ``labels[t+1]`` from
token ``t``); the collator sets ``-100`` at each sample's first token, so no token is trained
to predict the next sample's first token. ``model(**batch).loss`` is then the mean over the
row's trained tokens, the same number as running each sample alone through the unpatched
model (``tests/train/test_hf_trainer.py`` checks it).

Items carry only ``input_ids``, ``labels`` and ``position_ids`` — arguments of every causal
LM's ``forward`` — so Trainer's ``remove_unused_columns`` (on by default) keeps them all; the
collator finds the sample boundaries in the position ids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pyfast_tune.data import IGNORE_INDEX, PackedDataset


class PackedTorchDataset(torch.utils.data.Dataset):
    """A packed directory as a ``torch.utils.data.Dataset``: item ``i`` is pack ``i``.

    Each item is ``{"input_ids", "labels", "position_ids"}``, 1-D int64 tensors of the pack's
    length (labels unshifted, -100 where the packer masked the loss). Keyword arguments are
    the expectations ``PackedDataset`` checks (``tokenizer``, ``max_length``, ``template``,
    ``format``, ``seed``): a directory packed otherwise raises ``FingerprintMismatch``.

    >>> ds = PackedTorchDataset("packed/", max_length=4096)   # doctest: +SKIP
    >>> ds[0]["position_ids"][:5]                              # doctest: +SKIP
    tensor([0, 1, 2, 3, 4])
    """

    def __init__(self, path: str | os.PathLike | PackedDataset, **expect: Any) -> None:
        if isinstance(path, PackedDataset):
            if expect:
                raise TypeError("pass expectations with a path, not with an open PackedDataset")
            self.packed = path
        else:
            self.packed = PackedDataset(path, **expect)

    @property
    def fingerprint(self) -> str | None:
        """The packed directory's fingerprint (meta.json), to log with a run."""
        return self.packed.meta.get("fingerprint")

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pack = self.packed[i]
        return {
            "input_ids": torch.from_numpy(pack["input_ids"]),
            "labels": torch.from_numpy(pack["labels"]),
            "position_ids": torch.from_numpy(pack["position_ids"]),
        }


def _as_int64(value: Any, key: str, index: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.size == 0 and array.ndim == 1:
        return array.astype(np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"PackedCollator: feature {index} {key!r} must be a 1-D sequence of integers, "
            f"got shape {array.shape} dtype {array.dtype}"
        )
    return array.astype(np.int64, copy=False)


class PackedCollator:
    """Flatten a batch of packs (or of single samples) into one padding-free row.

    Features are mappings with ``input_ids`` and optionally ``labels`` (default: the input ids,
    i.e. train on every token) and ``position_ids`` (default: one sample, positions from 0; a
    pack's position ids restart at 0 where each sample starts). Returns tensors of shape
    ``(1, T)`` for ``input_ids``, ``labels`` (``-100`` at each sample's first token and where
    untrained) and ``position_ids``; ``cu_seq_lens_q/k`` (int32, ``[0, ..., T]``) and
    ``max_length_q/k`` (int). Empty features are dropped; a batch of only empty ones is an
    error.

    >>> batch = PackedCollator()([{"input_ids": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]}])
    >>> batch["labels"].tolist(), batch["cu_seq_lens_q"].tolist()
    ([[-100, 6, -100, 8]], [0, 2, 4])
    """

    def __init__(self, return_tensors: str = "pt") -> None:
        if return_tensors != "pt":
            raise ValueError(f"PackedCollator returns PyTorch tensors only (return_tensors='pt'), "
                             f"got {return_tensors!r}")  # fmt: skip

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids, labels, positions = [], [], []
        for n, feature in enumerate(features):
            if not isinstance(feature, Mapping) or "input_ids" not in feature:
                raise ValueError(f"PackedCollator: feature {n} must be a mapping with 'input_ids'")
            x = _as_int64(feature["input_ids"], "input_ids", n)
            if len(x) == 0:
                continue
            y = _as_int64(feature["labels"], "labels", n) if "labels" in feature else x.copy()
            if "position_ids" in feature and feature["position_ids"] is not None:
                p = _as_int64(feature["position_ids"], "position_ids", n)
            else:
                p = np.arange(len(x), dtype=np.int64)
            if len(y) != len(x) or len(p) != len(x):
                raise ValueError(
                    f"PackedCollator: feature {n} has {len(x)} input_ids, {len(y)} labels and "
                    f"{len(p)} position_ids; they must be equally long"
                )
            if p[0] != 0 or (np.diff(p)[p[1:] != 0] != 1).any():
                raise ValueError(
                    f"PackedCollator: feature {n} position_ids must count 0, 1, 2, ... within "
                    "each sample, restarting at 0 where a sample starts"
                )
            ids.append(x)
            labels.append(y)
            positions.append(p)
        if not ids:
            raise ValueError("PackedCollator: every feature of the batch is empty")
        input_ids = np.concatenate(ids)
        position_ids = np.concatenate(positions)
        labels_row = np.concatenate(labels).copy()
        starts = np.flatnonzero(position_ids == 0)
        # HF losses predict labels[t+1] from token t: the first token of a sample must not be
        # a target, or the previous sample's last token would be trained to predict it.
        labels_row[starts] = IGNORE_INDEX
        cu = np.append(starts, len(input_ids)).astype(np.int32)
        max_length = int(np.diff(cu).max())
        cu_t = torch.from_numpy(cu)
        return {
            "input_ids": torch.from_numpy(input_ids)[None],
            "labels": torch.from_numpy(labels_row)[None],
            "position_ids": torch.from_numpy(position_ids)[None],
            "cu_seq_lens_q": cu_t,
            "cu_seq_lens_k": cu_t,
            "max_length_q": max_length,
            "max_length_k": max_length,
        }


def hf_dataset(path: str | os.PathLike | PackedDataset, **expect: Any):
    """The packs as a ``datasets.Dataset`` (``input_ids``, ``labels``, ``position_ids``), for
    trainers that take nothing else — TRL's ``SFTTrainer`` checks the dataset's type.

    Unlike ``PackedTorchDataset`` (which reads the memory-mapped directory in place) this
    copies the tokens once into a ``datasets`` Arrow cache; pass it with
    ``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})`` and ``PackedCollator()`` so
    TRL neither re-tokenizes nor re-packs it. Needs the ``datasets`` package.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "pyfast_tune.hf.hf_dataset needs the `datasets` package (pip install datasets)"
        ) from e
    packs = PackedTorchDataset(path, **expect)
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "position_ids": datasets.Sequence(datasets.Value("int32")),
        }
    )

    def rows(packed_path: str, fingerprint: str | None):
        # The arguments make datasets' cache key: another directory or content, another cache.
        for i in range(len(packs)):
            yield {k: v.numpy().astype(np.int32) for k, v in packs[i].items()}

    return datasets.Dataset.from_generator(
        rows,
        features=features,
        gen_kwargs={"packed_path": os.fspath(packs.packed.path), "fingerprint": packs.fingerprint},
    )
