"""Tiny LLaVA parts built from configs (never downloaded) and generated image data, for tests
and benchmarks: a CLIP vision tower of 28 px images in 14 px patches (4 patch tokens per
image), a small Llama with one spare embedding row for an ``<image>`` id, and LLaVA records
whose answers depend on their images (a coloured shape) mixed with text-only records.

>>> tower = make_tiny_clip("tower/")                                   # doctest: +SKIP
>>> llm = make_tiny_llm("llm/", "tok/")
>>> records = make_llava_records("data/", 40, text_only=10)            # data/llava.json
"""

from __future__ import annotations

import json
from pathlib import Path

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230),
          "yellow": (230, 220, 40)}  # fmt: skip
SHAPES = ("square", "circle")


def make_tiny_clip(out_dir: str | Path, image_size: int = 28, patch_size: int = 14,
                   hidden_size: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:  # fmt: skip
    """A random CLIPVisionModel and its image processor (OpenAI CLIP mean/std) at ``out_dir``."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from pyfast_tune.vision.images import clip_processor

    torch.manual_seed(seed)
    config = CLIPVisionConfig(image_size=image_size, patch_size=patch_size,
                              hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_hidden_layers=layers, num_attention_heads=heads)  # fmt: skip
    out = Path(out_dir)
    CLIPVisionModel(config).save_pretrained(out, safe_serialization=True)
    clip_processor(image_size).save_pretrained(out)
    return out


def make_tiny_llm(out_dir: str | Path, tokenizer_dir: str | Path, hidden_size: int = 64,
                  layers: int = 2, seed: int = 0, init_std: float = 0.1) -> Path:  # fmt: skip
    """A random 2-layer Llama for the tokenizer plus one spare embedding row (the id a
    Hugging Face LLaVA model's ``<image>`` token gets: ``image_token_id = vocab_size - 1``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyfast_tune.trainer.checkpoint import copy_tokenizer_files
    from pyfast_tune.trainer.tiny import tokenizer_vocab_size

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tokenizer_vocab_size(tokenizer_dir) + 1,
                         hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, use_cache=False,
                         tie_word_embeddings=False, initializer_range=init_std)  # fmt: skip
    out = Path(out_dir)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(tokenizer_dir, out)
    return out


def draw(color: str, shape: str, size: int = 40, seed: int = 0):
    """A ``color`` ``shape`` on a grey background, ``size`` x ``size * 3 // 4`` (not square,
    so padding to a square matters)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size, size * 3 // 4
    im = Image.new("RGB", (w, h), tuple(int(x) for x in rng.integers(100, 160, 3)))
    d = ImageDraw.Draw(im)
    x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
    box = (x0, y0, x0 + w // 2, y0 + h // 2)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    return im


def make_llava_records(out_dir: str | Path, n: int, text_only: int = 0, seed: int = 0,
                       turns: int = 1) -> Path:  # fmt: skip
    """``n`` LLaVA records with generated images (``out_dir/images/``) asking for the shape's
    colour, then ``text_only`` records without an image, shuffled together, as
    ``out_dir/llava.json`` (image paths relative to it, as LLaVA's data has them)."""
    import numpy as np

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        draw(color, shape, seed=seed * 100003 + i).save(out / "images" / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                {"from": "gpt", "value": f"The {shape} is {color}."}]  # fmt: skip
        for _ in range(turns - 1):
            conv += [{"from": "human", "value": "What shape is it?"},
                     {"from": "gpt", "value": f"It is a {shape}."}]  # fmt: skip
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": conv})
    for i in range(text_only):
        color = list(COLORS)[i % len(COLORS)]
        records.append({"id": f"t{i}", "conversations": [
            {"from": "human", "value": f"{color}?"},
            {"from": "gpt", "value": " ".join([color] * (1 + i % 3))}]})  # fmt: skip
    order = rng.permutation(len(records))
    path = out / "llava.json"
    path.write_text(json.dumps([records[int(k)] for k in order], indent=1))
    return path
