"""Train a Hugging Face causal LM on packed data under DeepSpeed: the entry a rank runs.

Entry points (all read the same YAML and accept ``--key value`` overrides of every key)::

    deepspeed --num_gpus 2 pyfast_tune/train.py --config pyfast_tune/configs/lora.yaml --lr 1e-4
    deepspeed --num_gpus 2 --module pyfast_tune.train --config run.yaml   # the same
    torchrun --nproc_per_node 2 -m pyfast_tune.train --config run.yaml --lora.r 16
    srun python -m pyfast_tune.train --config run.yaml     # SLURM_PROCID/NTASKS/LOCALID
    python -m pyfast_tune.train --config run.yaml          # one process
    pyfast-tune train run.yaml --nproc 2 --deepspeed zero3 # the CLI, via pyfast_tune.launch

The recipe is ``pyfast_tune.trainer.recipe``: ``setup(cfg) -> Run`` (process, data, engine,
resume, metrics), then ``train(run)`` (the step loop). See ``pyfast_tune.trainer.batches`` for
the order and the loss definition.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script (`deepspeed pyfast_tune/train.py`, `torchrun pyfast_tune/train.py`):
    # Python put pyfast_tune/ first on sys.path, where kernels/ and config.py would shadow
    # top-level modules of those names (bitsandbytes imports a `kernels` package). Become the
    # module run instead: exec keeps the process (the pid its launcher watches), the
    # environment, the interpreter's options (the launcher's -u) and the arguments.
    options = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv)]
    os.execv(sys.executable, [sys.executable, *options, "-m", "pyfast_tune.train", *sys.argv[1:]])

import argparse  # noqa: E402 - after the script guard, which must run before any import

from pyfast_tune.config import load_config  # noqa: E402
from pyfast_tune.quiet import quiet_dependencies  # noqa: E402
from pyfast_tune.trainer.data_cache import packed_template  # noqa: E402, F401 - public here


def run(cfg) -> dict:
    """Train with ``cfg`` (a ``TrainConfig``) in this process; returns a summary dict
    ({"losses": per step, "start_step", "steps"})."""
    # DeepSpeed, transformers and (unless the run quantizes) bitsandbytes are first imported
    # inside quiet_dependencies, which hides their notices and keeps bitsandbytes unloaded.
    with quiet_dependencies(cfg.show_dependency_warnings, cfg.method != "qlora"):
        from pyfast_tune.trainer.recipe import setup, train

        return train(setup(cfg))


def _parse(argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m pyfast_tune.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (see pyfast_tune/configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args.config, overrides


def train_main(argv: list[str]) -> int:
    """Train in this process (one rank of a launch); returns the exit code.

    >>> train_main(["--config", "pyfast_tune/configs/lora.yaml", "--max_steps", "2"])  # doctest: +SKIP
    0
    """
    config_path, overrides = _parse(argv)
    cfg = load_config(config_path, overrides)
    try:
        run(cfg)
    finally:
        import torch.distributed as dist  # loaded by run() already; here only to leave the group

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
