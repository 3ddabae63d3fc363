"""What a decision depends on besides the shape class: the device, the versions of torch,
Triton, CUDA and the driver, our kernels' sources, and which rank this process is."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

# The kernels' sources: every module of ``pyfast_tune.kernels`` and the C++ of ``csrc/``.
KERNELS_ROOT = Path(__file__).resolve().parents[1]
CSRC = KERNELS_ROOT.parents[1] / "csrc"


def _world() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:
        pass
    return int(os.environ.get("WORLD_SIZE", "1"))


def who() -> str:
    """ "rank N: " when several processes train (each may reject a backend on its own GPU)."""
    return f"rank {rank()}: " if _world() > 1 or rank() > 0 else ""


def rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:
        pass
    return int(os.environ.get("RANK", "0"))


@functools.cache
def source_hash() -> str:
    """Our kernels' sources: a decision made for other code is not reused."""
    h = hashlib.sha1()
    files = sorted(KERNELS_ROOT.rglob("*.py")) + sorted(CSRC.glob("*.cpp"))
    for f in files:
        h.update(f.relative_to(KERNELS_ROOT.parents[1]).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The CUDA driver version ("12.4"), when a driver is there."""
    try:
        v = int(torch._C._cuda_getDriverVersion())
    except Exception:
        return None
    return f"{v // 1000}.{v % 1000 // 10}" if v else None


@functools.cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    if device.type == "cpu":
        return f"{cpu_name()} ({torch.get_num_threads()} threads)"
    return device.type


def environment(device: torch.device) -> dict:
    """What a decision depends on besides the shape class."""
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "driver": driver_version() if device.type == "cuda" else None,
        "source": source_hash(),
        "interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
