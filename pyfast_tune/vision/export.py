"""Export of LLaVA runs: the architecture a checkpoint's weights go into, and the finishing
touches that make a folder load and run as a Hugging Face LLaVA model.

A model assembled from ``vision_tower`` + ``llm`` trains without an ``<image>`` token (packed
rows never embed one: the hook writes image features there). ``LlavaForConditionalGeneration``
and ``LlavaProcessor`` need one, so the exported folder gets XTuner's HF-conversion treatment:
``<image>`` added to the tokenizer as a special token, the embeddings grown by its row (the
mean of the others, as transformers' ``mean_resizing``'s centre and XTuner's conversion do),
``image_token_id`` set, and the tower's image processor and a ``LlavaProcessor`` saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"


def is_llava_run(cfg: dict) -> bool:
    """Whether a run's recorded config trained a LLaVA model."""
    from pyfast_tune.vision.model import llava_class_for

    return bool(cfg.get("vision_tower")) or llava_class_for(cfg.get("model") or "") is not None


def empty_llava(cfg: dict, dtype: torch.dtype | None):
    """The run's LlavaForConditionalGeneration on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from pyfast_tune.vision.model import llava_config

    if cfg.get("vision_tower"):
        tower = AutoConfig.from_pretrained(cfg["vision_tower"])
        tower = getattr(tower, "vision_config", tower)
        text = AutoConfig.from_pretrained(cfg.get("llm") or cfg["model"])
        config = llava_config(tower, text, int(cfg.get("visual_select_layer", -2)))
    else:
        config = AutoConfig.from_pretrained(cfg["model"])
    with init_empty_weights(include_buffers=False):
        return LlavaForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)


def processor_source(cfg: dict) -> str:
    """Where the run's image processor lives: the tower's folder, else the LLaVA model's."""
    return cfg.get("vision_tower") or cfg["model"]


def finish_folder(folder: str | Path, cfg: dict) -> None:
    """Make ``folder`` (a saved LlavaForConditionalGeneration with its tokenizer files) load
    with ``LlavaForConditionalGeneration`` / ``LlavaProcessor``: an in-vocabulary ``<image>``
    token and the processors (see the module doc)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration

    from pyfast_tune.vision.images import ImageProcessor

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    tok_file = folder / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_file))
    image_id = tok.token_to_id(IMAGE_TOKEN)
    if image_id is None:
        tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        tok.save(str(tok_file))
        image_id = tok.token_to_id(IMAGE_TOKEN)
        tcfg_path = folder / "tokenizer_config.json"
        if tcfg_path.is_file():
            tcfg = json.loads(tcfg_path.read_text())
            extra = tcfg.get("extra_special_tokens") or []
            if isinstance(extra, list) and IMAGE_TOKEN not in extra:
                tcfg["extra_special_tokens"] = [*extra, IMAGE_TOKEN]
            tcfg_path.write_text(json.dumps(tcfg, indent=2) + "\n")
    if image_id >= config.text_config.vocab_size or config.image_token_id != image_id:
        model = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=config.text_config.dtype
        )
        grow_vocab(model, image_id + 1)
        model.config.image_token_id = image_id
        model.save_pretrained(folder, safe_serialization=True)
    if {"vision_tower", "llm"} <= set(cfg.get("freeze") or []):
        save_projector(folder)
    vision = config.vision_config
    processor = ImageProcessor.for_model(processor_source(cfg), vision).processor
    processor.save_pretrained(folder)
    try:
        from transformers import LlavaProcessor

        LlavaProcessor(image_processor=processor, tokenizer=AutoTokenizer.from_pretrained(folder),
                       patch_size=vision.patch_size, vision_feature_select_strategy="default",
                       image_token=IMAGE_TOKEN, num_additional_image_tokens=1).save_pretrained(folder)  # fmt: skip
    except Exception as e:  # the model and tokenizer are complete without it
        import logging

        logging.getLogger(__name__).warning("LlavaProcessor not saved (%s)", e)


def grow_vocab(model, size: int) -> None:
    """Grow input and output embeddings to ``size`` rows, new rows the mean of the old."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if size <= old:
        return
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    mean_in = emb.weight.detach().mean(0)
    mean_out = head.weight.detach().mean(0) if head is not None else None
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = mean_in
        if head is not None and not tied:
            model.get_output_embeddings().weight[old:] = mean_out


PROJECTOR_FILE = "projector.safetensors"


def save_projector(folder: str | Path) -> Path:
    """Stage 1's result alone, as XTuner saves it beside the model: the projector's weights
    (``linear_1``/``linear_2`` weight and bias) in ``folder/projector.safetensors``."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    weights = {}
    for f in sorted(folder.glob("model*.safetensors")):
        for k, v in load_file(f).items():
            if "multi_modal_projector." in k:
                weights[k.split("multi_modal_projector.", 1)[1]] = v.contiguous()
    if not weights:
        raise ValueError(f"{folder}: no multi_modal_projector weights to save")
    out = folder / PROJECTOR_FILE
    save_file(weights, out, metadata={"format": "pt"})
    return out
