"""The process a rank trains in: its place in the launch (torchrun, DeepSpeed, SLURM or alone),
its device, the process group, and the sequence-parallel layout of the ranks."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch

from pyfast_tune.trainer.sequence_parallel import Topology, topology


def tools_on_path() -> None:
    # DeepSpeed JIT-builds CPU ops with ninja, which lives next to this interpreter in a venv.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/deepspeed, SLURM, or a single process."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")  # multi-node: export MASTER_ADDR in sbatch
        env.setdefault("MASTER_PORT", "29500")
    if "RANK" not in env:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(port))
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))


@dataclass
class Process:
    """This rank: its index and the world's size, its device, and its sequence-parallel group
    and data-parallel replica (``topo``)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    topo: Topology

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def start_process(sequence_parallel_size: int, show_dependency_warnings: bool) -> Process:
    """Join the launch's process group (gloo on CPU, nccl on GPU) and set up logging."""
    tools_on_path()  # before DeepSpeed builds its shared-memory op
    rank, world, local_rank = distributed_env()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s",
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    with (
        contextlib.redirect_stdout(io.StringIO())
        if not show_dependency_warnings
        else (contextlib.nullcontext())
    ):  # DeepSpeed prints that it built its shared-memory op, on every start
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    # Sequence-parallel groups of N consecutive ranks; packs are split over the world / N
    # data-parallel replicas (all of it without sequence parallelism).
    return Process(rank, world, local_rank, device, topology(sequence_parallel_size, rank, world))
