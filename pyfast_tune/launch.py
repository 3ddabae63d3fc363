"""Start a training run in child processes: the DeepSpeed launcher (GPUs) or torchrun (any
number of processes, CPU or GPU), each running the module ``pyfast_tune.train`` on one rank.
This is the CLI side of training; ``pyfast_tune.train`` is the entry a rank runs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("pyfast_tune.launch")


def launch_command(
    config_path: str | Path,
    num_gpus: int | None = None,
    nproc: int | None = None,
    deepspeed: str | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The launcher command (an argument list, never a shell string) for ``launch``.

    ``nproc`` -> torchrun with that many processes (CPU or GPU); otherwise the DeepSpeed
    launcher (all visible GPUs, or ``num_gpus``). ``deepspeed`` overrides the config's preset.
    """
    # The module, not the file: ranks import the installed package whatever their cwd.
    module = "pyfast_tune.train"
    args = ["--config", str(config_path)]
    if deepspeed:
        args += ["--deepspeed", deepspeed]
    args += [str(a) for a in extra_args]
    if nproc is not None:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "-m", module, *args]  # fmt: skip
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if num_gpus is not None:
        cmd += ["--num_gpus", str(num_gpus)]
    return [*cmd, "--module", module, *args]


def launch(
    config_path: str | Path,
    num_gpus: int | None = None,
    nproc: int | None = None,
    deepspeed: str | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
) -> int:
    """Launch a training run in child processes and wait; returns their exit code.

    >>> launch("pyfast_tune/configs/lora.yaml", nproc=2, deepspeed="zero2",
    ...        extra_args=["--max_steps", "10"])  # doctest: +SKIP
    0
    """
    cmd = launch_command(config_path, num_gpus, nproc, deepspeed, extra_args)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():  # a source checkout: reuse its built CPU ops
        env.setdefault("TORCH_EXTENSIONS_DIR", str(root / ".torch_extensions"))
    log.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd, env=env)
