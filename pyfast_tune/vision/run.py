"""What the training recipe asks of a LLaVA run: the image tokens packing must count, and
the training data wrapped so packs come at training length with their images."""

from __future__ import annotations

from dataclasses import dataclass

from pyfast_tune.config import ConfigError


@dataclass
class LlavaRun:
    image_tokens: int
    processor: object  # pyfast_tune.vision.images.ImageProcessor

    def wrap(self, dataset):
        from pyfast_tune.vision.data import ImagePacks

        return ImagePacks(dataset, self.image_tokens, self.processor)


def vision_config_of(cfg):
    """The vision tower's config of a LLaVA run (no weights loaded)."""
    from transformers import AutoConfig

    if cfg.vision_tower:
        config = AutoConfig.from_pretrained(cfg.vision_tower)
        return getattr(config, "vision_config", config)
    return AutoConfig.from_pretrained(cfg.model).vision_config


def llava_run(cfg) -> LlavaRun | None:
    """None unless ``cfg`` trains a LLaVA model; else its image size in tokens and processor.
    Raw ``data.inputs`` are packed counting each image at that size (``data.image_tokens``
    unless given)."""
    from pyfast_tune.vision.images import ImageProcessor, image_token_count
    from pyfast_tune.vision.model import is_llava

    if not is_llava(cfg):
        return None
    if cfg.sequence_parallel_size > 1:
        raise ConfigError("LLaVA training does not support sequence_parallel_size > 1 yet")
    if cfg.vision_tower and cfg.method != "full":
        raise ConfigError(
            "LoRA/QLoRA on vision_tower + llm: an adapter needs a LLaVA base folder. Train stage 1 "
            "(method: full, freeze: [vision_tower, llm]), `pyfast-tune convert` it, then train "
            "stage 2 with model: <that folder> (docs/workflow-llava.md)"
        )
    if cfg.eval.data or cfg.eval.split or cfg.eval.prompts:
        raise ConfigError("evaluation during LLaVA training is not supported yet: unset eval")
    vision = vision_config_of(cfg)
    tokens = image_token_count(vision)
    options = cfg.data.pack_options
    if cfg.data.inputs is not None:
        options.setdefault("image_tokens", tokens)
        if int(options["image_tokens"]) != tokens:
            raise ConfigError(f"data.image_tokens {options['image_tokens']}: the vision tower "
                              f"makes {tokens} tokens of an image")  # fmt: skip
    processor = ImageProcessor.for_model(cfg.vision_tower or cfg.model, vision)
    return LlavaRun(tokens, processor)
