"""One Triton kernel launch as data: what the launchers run and the aot report compiles.

Each Triton launcher builds its launches with a ``*_launches`` function and runs them; the
aot report (``python -m pyfast_tune.kernels.aot``) calls the same functions with an explicit
GPU architecture and compiles exactly those argument lists, so the report covers what the
product launches and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Launch:
    """``kernel[grid](*args, **meta)``; ``meta`` holds constexprs and num_warps/num_stages."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any]
    # what the aot report prints beside the compile: dtype, head_dim or shape, ...
    labels: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)
