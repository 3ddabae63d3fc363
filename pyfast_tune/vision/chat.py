"""Chat about an image with a LLaVA model folder (``pyfast-tune chat MODEL --image PATH``).

The prompt is built by the run's template and the training encoder, as for text; the image
enters as the exported ``<image>`` token (an added special token, so the text around it is
tokenized piece by piece, as XTuner's ``tokenizer_image_token`` does), repeated to the
image's patch count (Hugging Face LLaVA's convention), with the image preprocessed as in
training (padded to a square, then the model's CLIP processor).
"""

from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = "<image>"


class ImagePrompt:
    """What one image adds to a chat: the pixel values, and the expansion of its token."""

    def __init__(self, model, model_dir: str | Path, image: str | Path):
        from pyfast_tune.vision.images import ImageProcessor, image_token_count

        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "llava":
            raise ValueError(f"--image needs a LLaVA model; {model_dir} is {config.model_type!r}")
        self.token_id = int(config.image_token_id)
        self.tokens = image_token_count(config.vision_config, config.vision_feature_select_strategy)
        processor = ImageProcessor.for_model(model_dir, config.vision_config)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.pixel_values = processor([str(image)]).to(device, dtype)

    @staticmethod
    def message(text: str) -> str:
        """XTuner's chat: the image token opens the first message."""
        return text if IMAGE_TOKEN in text else f"{IMAGE_TOKEN}\n{text}"

    def expand(self, ids: list[int]) -> list[int]:
        if ids.count(self.token_id) != 1:
            raise ValueError(
                f"the prompt holds {ids.count(self.token_id)} image tokens (id {self.token_id}), "
                "expected 1: is <image> an added token of this tokenizer?"
            )
        k = ids.index(self.token_id)
        return ids[:k] + [self.token_id] * self.tokens + ids[k + 1 :]
