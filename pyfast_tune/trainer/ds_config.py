"""DeepSpeed JSON: presets by name or a user file, with ``"auto"`` values filled from our config.

A user JSON passes through unchanged except its ``"auto"`` values; explicit batch sizes must
agree with the config (DeepSpeed would otherwise fail later with a less helpful message).

>>> ds = deepspeed_config("zero2", micro_batch_size=1, grad_accum=4, world_size=2, lr=1e-4,
...                       betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
...                       dtype="float32", hidden_size=64)
>>> ds["train_batch_size"], ds["zero_optimization"]["stage"]
(8, 2)
"""

from __future__ import annotations

import json
from pathlib import Path

from pyfast_tune.config import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
PRESETS = ("zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")


def load_deepspeed_json(name_or_path: str) -> dict:
    """A preset name (see ``PRESETS``) or a path to a DeepSpeed JSON file."""
    if name_or_path in PRESETS:
        path = PRESET_DIR / f"{name_or_path}.json"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"deepspeed: {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
            )
    return json.loads(path.read_text())


def _fill(node, values: dict, path: str = ""):
    if isinstance(node, dict):
        return {k: _fill(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values, path) for v in node]
    if node == "auto":
        if path not in values:
            raise ConfigError(f"deepspeed config: no value for 'auto' at {path}")
        return values[path]
    return node


def deepspeed_config(
    name_or_path: str,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    max_grad_norm: float,
    dtype: str,
    hidden_size: int,
    sequence_parallel_size: int = 1,
    gloo: bool = False,
) -> dict:
    """The DeepSpeed config dict for this run, every ``"auto"`` resolved.

    ``world_size`` is the data-parallel size (processes / ``sequence_parallel_size``): the
    batch sizes count packs, and the ranks of a sequence-parallel group share theirs.

    ``gloo``: the process group is gloo (training on the CPU). ZeRO-3 then gathers several
    parameters one at a time (``stage3_allgather_sequential``, unless the file sets it):
    DeepSpeed's coalesced gather launches one asynchronous all-gather per parameter and waits
    for the last only, which on NCCL's one stream means all of them, but gloo runs its work
    on several threads, so an earlier gather could still be writing when the caller used the
    buffer. ``from_pretrained`` under ``zero.Init`` gathers a module's weight and bias that
    way, loads them on rank 0 and re-partitions: a late gather overwrote loaded values with
    the uninitialised partitions, so a 2-process run trained on garbage in some CLIP layers
    (a first loss of 6.41668, or nan, instead of 6.48236; modules with one parameter, as
    Llama's, take the sequential path already).
    """
    raw = load_deepspeed_json(name_or_path)
    train_batch = micro_batch_size * grad_accum * world_size
    values = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "bf16.enabled": dtype == "bfloat16",
        "fp16.enabled": dtype == "float16",
        "optimizer.params.lr": lr,
        "optimizer.params.betas": list(betas),
        "optimizer.params.eps": eps,
        "optimizer.params.weight_decay": weight_decay,
        # The Hugging Face integration's rules for ZeRO-3 buckets.
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    ds = _fill(raw, values)
    for key, want in (
        ("train_batch_size", train_batch),
        ("train_micro_batch_size_per_gpu", micro_batch_size),
        ("gradient_accumulation_steps", grad_accum),
    ):
        if key in ds and ds[key] != want:
            raise ConfigError(
                f"deepspeed config sets {key}={ds[key]} but the training config implies {want} "
                f"(micro_batch_size={micro_batch_size}, grad_accum={grad_accum}, world={world_size})"
            )
    if sequence_parallel_size > 1:
        # DeepSpeed's batch-size check then divides the processes by it (the ranks of a group
        # share their packs); ZeRO still shards and reduces over all ranks, as for Ulysses.
        ds["sequence_parallel_size"] = sequence_parallel_size
    if gloo and zero_stage(ds) == 3:
        ds["zero_optimization"].setdefault("stage3_allgather_sequential", True)
    if "optimizer" in ds and "zero_optimization" in ds:
        # Our optimizers are DeepSpeed's own (CPU Adam on offload); allow torch's elsewhere.
        ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def zero_stage(ds: dict) -> int:
    """ZeRO stage of a resolved DeepSpeed config (0 when ZeRO is off)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    """Whether optimizer state lives on the CPU (then the optimizer must be DeepSpeedCPUAdam)."""
    off = ds.get("zero_optimization", {}).get("offload_optimizer", {})
    return off.get("device", "none") == "cpu"
