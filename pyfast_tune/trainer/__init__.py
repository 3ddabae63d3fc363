"""Training internals behind ``pyfast_tune.train``: one module per concept.

- ``batches``: deterministic order, rank split, packed rows, per-sample shifted targets, loss weights
- ``step``: model inputs and the weighted loss of one packed row
- ``model``: full / LoRA / QLoRA model building
- ``ds_config``: DeepSpeed presets and ``auto`` filling
- ``checkpoint``: atomic checkpoints with a ``latest`` pointer, HF-format export, resume
- ``metrics``: metrics.jsonl, TensorBoard, tokens/s, MFU, loss curve
- ``data_cache``: pack raw inputs once per node under a file lock, keyed by fingerprint
"""
