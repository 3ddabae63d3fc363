"""LLaVA against XTuner's own code (``xtuner==0.2.0``): its ``expand2square`` + CLIP
preprocessing gives our pixel values, and its ``prepare_inputs_labels_for_multimodal`` on each
sample alone (the LLM, tower and projector of the same weights) gives our packed loss.

XTuner is not a dependency: the test skips unless its package is found on sys.path or under
``XTUNER_SITE`` (only the two functions' source is read, so neither mmengine nor XTuner's
pinned dependencies are needed)::

    python3 -m venv /tmp/xt && /tmp/xt/bin/pip install --no-deps xtuner==0.2.0
    XTUNER_SITE=/tmp/xt/lib/python3.11/site-packages .venv/bin/python -m pytest \\
        tests/train/test_llava_xtuner.py
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from tests.train import test_llava
from tests.train.test_llava import IMAGE_TOKENS, _model_and_packs, _pack_loss, _patched

parts = test_llava.parts  # the tiny tower, LLM and packed data (a module-scoped fixture)


def _xtuner_root() -> Path | None:
    site = os.environ.get("XTUNER_SITE")
    if site and (Path(site) / "xtuner").is_dir():
        return Path(site) / "xtuner"
    spec = importlib.util.find_spec("xtuner")
    return Path(spec.origin).parent if spec and spec.origin else None


ROOT = _xtuner_root()
if ROOT is None:
    pytest.skip("xtuner is not found (install xtuner==0.2.0 --no-deps, set XTUNER_SITE)",
                allow_module_level=True)  # fmt: skip


def _function(path: Path, name: str, env: dict):
    """XTuner's function ``name`` from its source file, executed alone in ``env``."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = dict(env)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)
    return scope[name]


def test_preprocessing_and_loss_equal_xtuners(parts):
    from PIL import Image
    from transformers import LlamaForCausalLM, PreTrainedModel

    expand2square = _function(ROOT / "dataset" / "utils.py", "expand2square", {"Image": Image})
    prepare = _function(
        ROOT / "model" / "utils.py",
        "prepare_inputs_labels_for_multimodal",
        {"torch": torch, "IGNORE_INDEX": -100, "IMAGE_TOKEN_INDEX": -200, "List": list,
         "Optional": Optional, "PreTrainedModel": PreTrainedModel},
    )  # fmt: skip
    model, packs, proc = _model_and_packs(parts)
    ours = _patched(model)
    llm = LlamaForCausalLM.from_pretrained(parts["llm"], dtype=torch.float32)
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    hf = proc.processor
    ds = packs.dataset

    def xtuner_pixels(path):  # LLaVADataset.__getitem__ with pad_image_to_square=True
        image = expand2square(Image.open(path).convert("RGB"),
                              tuple(int(x * 255) for x in hf.image_mean))  # fmt: skip
        return torch.as_tensor(
            np.asarray(hf.preprocess(image, return_tensors="pt")["pixel_values"][0])
        )

    for i in range(len(packs)):
        total = 0.0
        for s in ds.pack_sample_ids(i):
            sample = ds.sample(int(s))
            entry = packs.table.get(int(s))
            if entry is not None:
                pixels = xtuner_pixels(entry[0])
                torch.testing.assert_close(pixels, proc([entry[0]])[0], rtol=0, atol=0)
            else:  # XTuner gives a text-only sample a blank image, whose features go unused
                pixels = torch.zeros(3, proc.size, proc.size)
            with torch.no_grad():  # LLaVAModel.forward: visual_select_layer -2, CLS dropped
                hidden = tower(pixels[None], output_hidden_states=True).hidden_states[-2][:, 1:]
                data = prepare(llm, input_ids=torch.tensor(sample["input_ids"])[None],
                               labels=torch.tensor(sample["labels"])[None],
                               pixel_values=projector(hidden))  # fmt: skip
                out = llm(**{k: v for k, v in data.items() if k != "past_key_values"})
            total += float(out.loss) * int((data["labels"][0, 1:] != -100).sum())
        assert _pack_loss(ours, packs, i) == pytest.approx(total, rel=1e-5), i
    assert IMAGE_TOKENS == 4
