"""What the GPU tests share: the GPU-or-dry switch, shapes, flash-attention's rule."""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
# "1": the kit's dry mode (one case per kernel family); "all": every case at tiny shapes, to
# check the GPU-only cases' own code on a CPU once (slow in the interpreter).
DRY_ALL = os.environ.get("PYFAST_TUNE_GPU_DRY") == "all"
DRY = not CUDA and (os.environ.get("PYFAST_TUNE_GPU_DRY") == "1" or DRY_ALL)
NO_GPU = ("no CUDA GPU (PYFAST_TUNE_GPU_DRY=1 runs these at tiny shapes in the Triton "
          "interpreter; `make gpu-check` does)")  # fmt: skip
GPU_ONLY = "a GPU-only case: the dry mode runs one case per kernel family (the interpreter is slow)"

gpu = [pytest.mark.gpu, pytest.mark.skipif(not (CUDA or DRY), reason=NO_GPU)]


DEVICE = torch.device("cuda" if CUDA else "cpu")


def sized(gpu_value, dry_value):
    """The GPU's value, or the dry mode's tiny one."""
    return dry_value if DRY else gpu_value


def gpu_only(*values, id=None):
    """A parameter set that runs on CUDA only (skipped with the reason in the dry mode)."""
    marks = [pytest.mark.skipif(DRY and not DRY_ALL, reason=GPU_ONLY)]
    return pytest.param(*values, marks=marks, id=id)


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_within_rule(name: str, ours, upstream, ref, factor: float, dtype) -> dict:
    """flash-attention's rule: max|ours - ref| <= factor * max|upstream - ref|, the upstream's
    error floored at one ulp of the reference's largest magnitude in ``dtype``."""
    e_ours, e_up = max_error(ours, ref), max_error(upstream, ref)
    floor = torch.finfo(dtype).eps * ref.double().abs().max().item()
    allowed = factor * max(e_up, floor)
    assert e_ours <= allowed, (
        f"{name}: our error {e_ours:.4g} > {factor}x the upstream's {e_up:.4g} "
        f"(floor {floor:.3g}); ours - ref at its worst: index "
        f"{(ours.double() - ref.double()).abs().argmax().item()}"
    )
    return {"ours": e_ours, "upstream": e_up}
