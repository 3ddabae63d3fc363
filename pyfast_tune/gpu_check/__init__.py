"""The GPU check kit: one prepared run that shows our GPU path working, and how fast it is.

A GPU is at hand only now and then, for minutes, on a bare image (torch, Triton,
transformers, peft, pytest; no network). This kit turns those minutes into one JSON report and
a short text summary, installing nothing: it runs the working tree's Python with the image's
packages, and takes the data engine's compiled extension from our abi3 wheel in
``dist-gpu/`` (``make gpu-wheel``) when the tree has none.

Parts, each in its own subprocess under a time budget, so a hang or a CUDA crash costs one
part, never the report (see ``parts`` for what each one measures):

    env      device, driver, versions, which optional packages are present
    doctor   every op x backend x dtype (x head dim) the first-use guard knows: correct or not,
             error ratio, time, the guard's choice
    pytest   ``pytest -m gpu tests/gpu``: each Triton kernel against float64 and the upstream
    bench_attention, bench_lora, bench_loss
             TFLOP/s and ratios side by side against torch's varlen_attn / SDPA / flash-attn,
             peft, plain cross-entropy / Liger; memory
    train    a tiny Llama, 30 steps, bf16, packed, under transformers' Trainer with our
             attention, fused LoRA and fused loss, against the reference attention's run

Without CUDA the same parts run in a dry mode on the CPU (Triton in the interpreter, tiny
shapes), so every change keeps the kit working:

    python -m pyfast_tune.gpu_check --out gpu-report          # GPU if present, else dry
    python -m pyfast_tune.gpu_check --out r --parts env,train --fail train   # a failing part

The report: ``report.json`` (schema in ``docs/gpu-reports/README.md``, checked by
``tests/test_gpu_check.py``), ``summary.txt``, and ``logs/<part>.log``.
"""

from pyfast_tune.gpu_check.runner import PART_NAMES, STATUSES, run  # noqa: F401

__all__ = ["PART_NAMES", "STATUSES", "run"]
