"""Build-on-first-use loader for the C++ CPU kernels in ``csrc/``.

The extension is compiled by ``torch.utils.cpp_extension.load`` (ninja + the system C++
compiler) and cached in ``TORCH_EXTENSIONS_DIR`` (the Makefile and tests point it at
``.torch_extensions/``), so only the first call in a fresh checkout pays the ~1 min build.

>>> from pyfast_tune.kernels.varlen_attention.cpu import load_varlen_attention  # doctest: +SKIP
>>> ext = load_varlen_attention(); ext.fwd, ext.bwd
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parents[3] / "csrc"


class ExtensionBuildError(RuntimeError):
    """The C++ extension could not be built (no compiler, no sources, or a compile error)."""


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags: the build uses -march=native, so a cache shared
    between machines must not hand one CPU's binary to another."""
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith(("flags", "Features"))
        )
    except (OSError, StopIteration):
        import platform

        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


@functools.cache
def load_varlen_attention():
    """Compile (once) and import ``csrc/varlen_attention.cpp``; returns the module with
    ``fwd`` and ``bwd``. Raises ExtensionBuildError with what is missing and what to do."""
    source = CSRC / "varlen_attention.cpp"
    if not source.exists():
        raise ExtensionBuildError(
            f"C++ source {source} is missing (the CPU backend builds from a source checkout); "
            "use backend='ref' for the pure-PyTorch path"
        )
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ExtensionBuildError(
            f"no C++ compiler found (looked for {cxx!r}; set CXX or install g++) to build the "
            "CPU attention kernel; use backend='ref' for the slow pure-PyTorch path"
        )
    # cpp_extension needs ninja on PATH; inside a virtualenv it sits next to the interpreter.
    bindir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and (Path(bindir) / "ninja").exists():
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name=f"pyfast_tune_varlen_attention_{_cpu_tag()}",
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"],
            extra_ldflags=["-fopenmp"],
            verbose=os.environ.get("PYFAST_TUNE_VERBOSE_BUILD") == "1",
        )
    except (RuntimeError, OSError, ImportError) as e:
        raise ExtensionBuildError(
            f"building the C++ attention kernel from {source} failed: {e}\n"
            "(set PYFAST_TUNE_VERBOSE_BUILD=1 to see the compiler output; "
            "backend='ref' works without a compiler)"
        ) from e
