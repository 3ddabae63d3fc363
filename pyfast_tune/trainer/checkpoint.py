"""Checkpoints that are never half-read: temp dir, rename, then a ``latest`` pointer.

Layout under ``output_dir/checkpoints/``::

    step_00000010/
        deepspeed/state/...   DeepSpeed engine state (module, optimizer unless save_optimizer:
                              false, lr scheduler) for exact resume
        hf/                   PEFT adapter or full safetensors weights + config + tokenizer files:
                              loads with from_pretrained directly
        trainer_state.json    step, global batch, world size, data fingerprint, config
    latest                    name of the newest complete checkpoint, written last

A crash at any point leaves either the previous ``latest`` or the new one, never a pointer to
a partial directory; leftover ``.tmp-*`` directories are ignored and removed on the next save.
Re-saving a step that exists swaps the two directories in one ``renameat2(RENAME_EXCHANGE)``
where the kernel has it; elsewhere the old one is moved aside first, and should a crash land
between the two renames, ``latest_checkpoint`` falls back to the newest complete ``step_*``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
DS_TAG = "state"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _complete_steps(root: Path) -> list[Path]:
    """``step_*`` directories holding a trainer_state.json, oldest first. Only a rename makes a
    ``step_*`` directory, after its state is written, so each of these is whole."""
    found = [p for p in root.glob("step_*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, from its ``latest`` pointer (None if none).

    If the pointer names a directory that is gone (a crash between the two renames of a
    re-save on a kernel without RENAME_EXCHANGE), the newest complete ``step_*`` is used."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if (path / "trainer_state.json").is_file():
        return path
    complete = _complete_steps(root)
    if not complete:
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint, "
                                f"and {root} holds no other")  # fmt: skip
    log.warning("%s names %s, which is not a complete checkpoint; using %s", pointer, path,
                complete[-1])  # fmt: skip
    return complete[-1]


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories ``a`` and ``b`` atomically: the packer's own commit primitive
    (``renameat2(RENAME_EXCHANGE)``); False where the kernel or filesystem lacks it."""
    from pyfast_tune.data import exchange_dirs

    return exchange_dirs(a, b)


def _commit_dir(tmp: Path, final: Path) -> Path | None:
    """Make the complete directory ``tmp`` appear as ``final``. Returns the directory now
    holding the replaced checkpoint (to delete once ``latest`` is written), if any."""
    if not final.exists():
        os.replace(tmp, final)
        return None
    if _exchange(tmp, final):
        return tmp  # now holds the old checkpoint
    old = final.with_name(f".tmp-old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    return old


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (DeepSpeed and save_pretrained
    do not), so a power loss after the commit rename cannot leave a named, empty checkpoint."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_tokenizer_files(tokenizer: str | Path | None, dest: Path) -> list[str]:
    """Copy the tokenizer files found at ``tokenizer`` (a directory or a tokenizer.json)."""
    if tokenizer is None:
        return []
    src = Path(tokenizer)
    files = [src] if src.is_file() else [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    for f in files:
        shutil.copy2(f, dest / f.name)
    return [f.name for f in files]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_hf(engine, model: torch.nn.Module, out: Path, zero_stage: int, tokenizer) -> None:
    """HF-format output of the trained model at ``out`` (collective under ZeRO-3)."""
    state_dict = None
    if zero_stage == 3:
        # Gathers the partitioned weights onto rank 0 (every rank must call it).
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = {k: v.detach() for k, v in model.state_dict().items()}
        extra = {}
        if hasattr(model, "peft_config"):
            # New tokens' rows are rebuilt from the base (pyfast_tune.trainer.model_setup):
            # peft's "auto" would save the whole resized embedding matrices into the adapter.
            extra["save_embedding_layers"] = False
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True, **extra)
        copy_tokenizer_files(tokenizer, out)


def save_checkpoint(
    engine,
    model: torch.nn.Module,
    output_dir: str | Path,
    step: int,
    trainer_state: dict,
    *,
    zero_stage: int,
    save_optimizer: bool,
    save_hf_output: bool,
    exclude_frozen: bool,
    tokenizer,
    save_total_limit: int | None = None,
    protect: Path | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; every rank calls this (DeepSpeed saving is collective).

    ``model.pyfast_tune_setup`` (rope, vocabulary: pyfast_tune.trainer.model_setup) is stored
    in trainer_state.json as ``model_setup``. With ``save_total_limit`` the older checkpoints
    beyond the newest N are deleted afterwards (:func:`prune_checkpoints`); ``protect`` (the
    checkpoint this run resumed from) is never deleted."""
    root = checkpoint_root(output_dir)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(
        str(tmp / "deepspeed"),
        tag=DS_TAG,
        save_latest=False,
        exclude_frozen_parameters=exclude_frozen,
    )
    _barrier()
    if not save_optimizer and zero_stage < 3 and _rank() == 0:
        # ZeRO-1/2 keep the module weights in mp_rank_*_model_states.pt; the optimizer
        # partitions are only needed for an exact resume. (ZeRO-3 keeps weights in them.)
        for f in (tmp / "deepspeed" / DS_TAG).glob("*optim_states.pt"):
            f.unlink()
    if save_hf_output:
        save_hf(engine, model, tmp / "hf", zero_stage, tokenizer)
    if _rank() == 0:
        state = dict(trainer_state, step=step, has_optimizer=save_optimizer or zero_stage == 3)
        setup = getattr(model, "pyfast_tune_setup", None)
        if setup is not None:
            state["model_setup"] = setup
        _write_atomic(tmp / "trainer_state.json", json.dumps(state, indent=2))
        _fsync_tree(tmp)
        replaced = _commit_dir(tmp, final)
        _fsync_path(root)
        _write_atomic(root / "latest", final.name + "\n")
        _fsync_path(root)
        if replaced is not None:
            shutil.rmtree(replaced)
        if save_total_limit:
            prune_checkpoints(output_dir, save_total_limit, protect)
    _barrier()
    return final


def prune_checkpoints(output_dir: str | Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep`` (as transformers'
    ``save_total_limit``), never the one ``latest`` names nor ``protect``. Each is renamed to a
    ``.tmp-*`` name first, so a crash mid-delete leaves nothing that looks like a checkpoint.
    Returns the deleted paths (their old names)."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    kept = {pointer.read_text().strip()} if pointer.is_file() else set()
    if protect is not None and Path(protect).resolve().parent == root.resolve():
        kept.add(Path(protect).name)
    complete = _complete_steps(root)
    newest = {p.name for p in complete[-keep:]}
    deleted = []
    for path in complete:
        if path.name in newest or path.name in kept:
            continue
        doomed = root / f".tmp-delete-{path.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
    if deleted:
        log.info("save_total_limit %d: deleted %s", keep, ", ".join(p.name for p in deleted))
    return deleted


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def universal_tag(path: Path) -> str:
    """Convert checkpoint ``path`` to DeepSpeed's universal format once; returns its tag.

    ZeRO shards optimizer state by world size and DeepSpeed refuses to load it on another
    one; the universal format is per parameter and loads on any. Every rank calls this: the
    first to take the file lock converts (into a temp dir, renamed when complete), the others
    wait on the lock, so no collective can time out while it runs.
    """
    import fcntl
    from argparse import Namespace

    tag = f"{DS_TAG}_universal"
    ds_dir = path / "deepspeed"
    with open(ds_dir / ".universal.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (ds_dir / tag).is_dir():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            check_weights_only(ds_dir / DS_TAG)  # the converter unpickles them too

            tmp = ds_dir / f".tmp-{tag}"
            shutil.rmtree(tmp, ignore_errors=True)
            ds_to_universal(
                Namespace(
                    input_folder=str(ds_dir / DS_TAG),
                    output_folder=str(tmp),
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    inject_missing_state=True,
                )
            )
            os.replace(tmp, ds_dir / tag)
    return tag


def check_weights_only(ds_tag_dir: Path) -> int:
    """Refuse a DeepSpeed state directory holding anything but tensors and DeepSpeed's own
    plain records: every ``*.pt`` under it must load with ``torch.load(weights_only=True)``.

    DeepSpeed itself loads its files with ``weights_only=False`` (which would run code pickled
    into a doctored checkpoint); a file that passes this check unpickles to the same plain
    objects either way. Loading is memory-mapped, so no tensor data is read. Returns the
    number of files checked."""
    from pyfast_tune.trainer.torch_files import load_ds_file

    files = sorted(p for p in ds_tag_dir.rglob("*.pt") if p.is_file())
    for f in files:
        try:
            load_ds_file(f)
        except Exception as e:  # UnpicklingError and whatever a truncated zip raises
            raise ValueError(
                f"{f}: refusing to load a checkpoint file that is not weights-only "
                f"(torch.load(weights_only=True) says: {str(e).splitlines()[0]})"
            ) from e
    return len(files)


def _load_weights_only(engine) -> None:
    """Make the engine's own checkpoint loads ``weights_only=True`` too (DeepSpeed's
    ``TorchCheckpointEngine.load`` passes False), so the files checked are the files loaded
    safely, whatever happens to them in between. Other engines are left alone."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or type(ce).__name__ != "TorchCheckpointEngine":
        return
    from pyfast_tune.trainer.torch_files import safe_torch_load

    ce.load = lambda path, map_location=None: safe_torch_load(path, map_location)


def load_checkpoint(engine, path: Path, exclude_frozen: bool, tag: str = DS_TAG) -> dict:
    """Restore DeepSpeed state from checkpoint ``path``; returns its trainer_state. Every
    state file is checked with :func:`check_weights_only` before DeepSpeed unpickles it."""
    state = read_trainer_state(path)
    if check_weights_only(path / "deepspeed" / tag) == 0:
        raise FileNotFoundError(f"no DeepSpeed state files under {path / 'deepspeed' / tag}")
    _load_weights_only(engine)
    load_path, _ = engine.load_checkpoint(
        str(path / "deepspeed"),
        tag=tag,
        load_module_strict=not exclude_frozen,
        load_optimizer_states=bool(state.get("has_optimizer", True)),
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no state under {path / 'deepspeed'}")
    return state
