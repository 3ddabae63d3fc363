"""Training internals behind ``pyfast_tune.train``: one module per concept.

- ``recipe``: ``setup(cfg) -> Run`` and ``train(run)``, the steps below in order
- ``runtime``: the rank's place in the launch, its device and process group
- ``engine``: DeepSpeed config, model, our kernels, lr schedule, ``deepspeed.initialize``
- ``resume``: which checkpoint, loaded how, and the checks that the run continues the same
- ``batches``: deterministic order, rank split, packed rows, per-sample shifted targets, loss weights
- ``step``: model inputs and the weighted loss of one packed row; one optimizer step of a rank
- ``model``: full / LoRA / QLoRA model building
- ``ds_config``: DeepSpeed presets and ``auto`` filling
- ``checkpoint``: atomic checkpoints with a ``latest`` pointer, HF-format export, resume
- ``metrics``: metrics.jsonl, TensorBoard, tokens/s, MFU, loss curve
- ``data_cache``: pack raw inputs once per node under a file lock, keyed by fingerprint
"""
