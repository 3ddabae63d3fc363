"""Images as LLaVA trains on them: XTuner's preprocessing (pad to a square filled with the
processor's mean colour, then the CLIP image processor) and the number of patch tokens one
image becomes.

>>> from pyfast_tune.vision.images import ImageProcessor        # doctest: +SKIP
>>> proc = ImageProcessor.for_model("llava-folder/", vision_config)
>>> proc(["a.png", "b.jpg"]).shape                                # (2, 3, 336, 336)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ImageError(ValueError):
    """An image of a packed sample is missing or cannot be decoded."""


def image_token_count(vision_config, strategy: str = "default") -> int:
    """Patch tokens one image becomes: ``(H/p)·(W/p)``, plus the CLS token with the ``full``
    feature-select strategy (``default`` drops it, as XTuner's ``[:, 1:]`` does)."""
    side = int(vision_config.image_size) // int(vision_config.patch_size)
    return side * side + (1 if strategy == "full" else 0)


def expand_to_square(image, background: tuple[int, ...]):
    """XTuner's ``expand2square``: the image centred on a square canvas of ``background``
    (the longer side's size), so the CLIP centre crop keeps the whole picture."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImageProcessor:
    """Paths -> ``pixel_values`` (n, 3, H, W) float32, preprocessed as XTuner's LLaVA dataset
    (``pad_image_to_square=True``). ``processor``: a Hugging Face CLIP-style image processor."""

    def __init__(self, processor):
        self.processor = processor
        self.background = tuple(int(x * 255) for x in processor.image_mean)
        crop = getattr(processor, "crop_size", None) or {}
        size = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
        self.size = int(size or 336)

    @classmethod
    def for_model(cls, path: str | Path | None, vision_config) -> ImageProcessor:
        """The image processor saved with a model (``preprocessor_config.json`` in ``path``),
        else a CLIP processor for the tower's image size with OpenAI CLIP's mean and std."""
        if path is not None and (Path(path) / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            return cls(AutoImageProcessor.from_pretrained(str(path)))
        return cls(clip_processor(int(vision_config.image_size)))

    def load(self, path: str | Path, what: str = "image"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ImageError(f"{what}: cannot read image {path}: {e}") from None

    def __call__(self, images: list) -> torch.Tensor:
        """images: paths or PIL images -> (n, 3, H, W) float32 (n may be 0)."""
        if not images:
            return torch.zeros(0, 3, self.size, self.size)
        squares = [
            expand_to_square(self.load(im) if isinstance(im, (str, Path)) else im, self.background)
            for im in images
        ]
        out = self.processor(squares, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(np.asarray(out)) if not torch.is_tensor(out) else out

    def blank(self) -> torch.Tensor:
        """One all-zero image (1, 3, H, W): what a batch without images runs the tower on."""
        return torch.zeros(1, 3, self.size, self.size)


def clip_processor(image_size: int):
    """OpenAI CLIP's preprocessing at ``image_size`` (resize shortest edge, centre crop,
    normalise), the PIL implementation (no torchvision needed)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
