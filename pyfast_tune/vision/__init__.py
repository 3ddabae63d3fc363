"""Vision-language (LLaVA) training on packed data.

- :mod:`.images`: XTuner's image preprocessing and the tokens one image becomes;
- :mod:`.data`: packs at training length (image tokens expanded) with their images;
- :mod:`.model`: the LLaVA model (loaded, or assembled from a vision tower and an LLM with a
  new projector), freezing, LoRA on the LLM, and the forward hook that places image
  features in the packed row;
- :mod:`.run`: what the training recipe asks of a LLaVA run.

Walk-through: docs/workflow-llava.md.
"""
