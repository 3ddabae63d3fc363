"""GPU tests (``pytest -m gpu tests/gpu``): each Triton kernel at real shapes on CUDA, against
its float64 reference and the upstream op, with flash-attention's rule (our error at most 2x
the upstream's in the same dtype, 3x for gradients).

The default run deselects them (``-m 'not slow and not gpu'``). Without CUDA they skip, unless
``PYFAST_TUNE_GPU_DRY=1`` (the GPU check kit's dry mode): then they run at tiny shapes in the
Triton interpreter, so the tests' own code is exercised on every change (one case per kernel
family; ``PYFAST_TUNE_GPU_DRY=all`` runs every case at tiny shapes, a few minutes).
"""

import os

import torch

if torch.cuda.is_available():
    # tests/conftest.py defaults TRITON_INTERPRET to 1 for the CPU suite; on a GPU these tests
    # exist to run the compiled kernels (read when the first kernel is defined, after this).
    os.environ["TRITON_INTERPRET"] = "0"
