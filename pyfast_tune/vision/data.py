"""Packed LLaVA rows at their training length: each ``<image>`` token of a pack expanded to
the image's patch tokens, and the images of a micro batch preprocessed beside it.

A packed directory stores the text as XTuner encodes it (one ``IMAGE_TOKEN_INDEX`` = -200 per
image) and, in ``images.json``, each image's sample, path and position (docs/FORMAT.md).
:class:`ImagePacks` wraps it: pack ``i`` comes back with every image token repeated
``image_tokens`` times (labels -100 there), positions restarting per sample over the expanded
length, ``cu_seqlens`` over it, and the pack's image paths in row order with the row offset
where each image's features go — exactly the sequence XTuner's
``prepare_inputs_labels_for_multimodal`` builds for each sample, laid end to end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyfast_tune.data.dataset import packed_row
from pyfast_tune.data.facts import IMAGE_TOKEN_INDEX
from pyfast_tune.trainer.batches import PackedBatch, collate

_TABLE = "images.json"


def read_image_table(packed_dir: str | Path) -> dict[int, tuple[str, int]]:
    """``images.json`` of a packed directory: sample -> (image path, position of its
    ``<image>`` token in the sample); empty when the directory has no images."""
    path = Path(packed_dir) / _TABLE
    if not path.is_file():
        return {}
    table = json.loads(path.read_text())
    return {int(e[0]): (e[1], int(e[2]) if len(e) > 2 else -1) for e in table["samples"]}


@dataclass
class ImageBatch(PackedBatch):
    """A packed micro batch of LLaVA data: the row at training length plus its images."""

    pixel_values: torch.Tensor | None = None  # (n_images, 3, H, W) float32, row order
    image_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def extra_inputs(self, device) -> dict:
        """Model inputs beside the text: the images and where their features go in the row
        (consumed by ``pyfast_tune.vision.model``'s forward hook)."""
        return {
            "pixel_values": self.pixel_values.to(device),
            "image_starts": torch.from_numpy(self.image_starts).to(device),
        }


class ImagePacks:
    """A :class:`~pyfast_tune.data.PackedDataset` whose packs come at training length, with
    their images (see the module doc). ``processor``: ``pyfast_tune.vision.images.ImageProcessor``.

    >>> packs = ImagePacks(PackedDataset("packed/"), 576, processor)   # doctest: +SKIP
    >>> packs[0]["images"], packs[0]["image_starts"]                     # doctest: +SKIP
    """

    def __init__(self, dataset, image_tokens: int, processor):
        self.dataset = dataset
        self.image_tokens = int(image_tokens)
        self.processor = processor
        self.table = read_image_table(dataset.path)
        packed_with = dataset.meta.get("image_tokens")
        if self.table and not packed_with:
            import logging

            logging.getLogger(__name__).warning(
                "%s was packed without --image-tokens: packs were planned by text length, "
                "so with %d tokens per image some rows exceed the pack capacity, and image "
                "paths were not checked", dataset.path, self.image_tokens)  # fmt: skip
        if packed_with and int(packed_with) != self.image_tokens:
            raise ValueError(
                f"{dataset.path} was packed with --image-tokens {packed_with}, but the model "
                f"turns an image into {self.image_tokens} tokens: pack again with "
                f"--image-tokens {self.image_tokens}"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # meta, path, num_samples, ...: the wrapped directory's
        return getattr(self.__dict__["dataset"], name)

    def __getitem__(self, i: int) -> dict:
        pack = self.dataset[i]
        ids, labels = pack["input_ids"], pack["labels"]
        cu = np.asarray(pack["cu_seqlens"], dtype=np.int64)
        samples = self.dataset.pack_sample_ids(i)
        repeats = np.ones(len(ids), dtype=np.int64)
        images, at = [], []
        for k, s in enumerate(samples):
            entry = self.table.get(int(s))
            seg = ids[cu[k] : cu[k + 1]]
            found = np.flatnonzero(seg == IMAGE_TOKEN_INDEX)
            if entry is None:
                if len(found):
                    raise ValueError(
                        f"{self.dataset.path}: sample {int(s)} ({self._source(s)}) has <image> "
                        "in its text but no image in images.json"
                    )
                continue
            path, pos = entry
            if pos < 0 and len(found) == 1:  # a table written before positions were recorded
                pos = int(found[0])
            if len(found) != 1 or int(found[0]) != pos:
                raise ValueError(
                    f"{self.dataset.path}: sample {int(s)} ({self._source(s)}): images.json puts "
                    f"its image at token {pos}, the text has <image> at {found.tolist()}"
                )
            images.append(path)
            at.append(cu[k] + pos)
        repeats[at] = self.image_tokens
        lengths = np.add.reduceat(repeats, cu[:-1]) if len(cu) > 1 else np.zeros(0, np.int64)
        row = packed_row(np.repeat(ids, repeats), np.repeat(labels, repeats), lengths)
        starts = np.cumsum(repeats) - repeats
        row["images"] = images
        row["image_starts"] = starts[at].astype(np.int64)
        return row

    def _source(self, s) -> str:
        file, record = self.dataset.sample(int(s))["source"]
        return f"{file} record {record}"

    def collate(self, packs: list[dict], reduction: str, normalizer: int) -> ImageBatch:
        """``pyfast_tune.trainer.batches.collate`` of the expanded packs, plus their images
        preprocessed (a blank one when the batch has none: the tower runs on every rank every
        micro step, so ZeRO-3's parameter gathering stays in step)."""
        base = collate(packs, reduction, normalizer)
        paths, starts, offset = [], [], 0
        for p in packs:
            paths += p["images"]
            starts.append(p["image_starts"] + offset)
            offset += len(p["input_ids"])
        pixels = self.processor(paths) if paths else self.processor.blank()
        fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
        return ImageBatch(**fields, pixel_values=pixels,
                          image_starts=np.concatenate(starts) if starts else np.zeros(0, np.int64))  # fmt: skip
