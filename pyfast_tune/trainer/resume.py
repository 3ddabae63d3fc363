"""Resuming a run: which checkpoint, how DeepSpeed loads it (its universal format when the
world size changed), and the checks that the run continues on the same batches and data."""

from __future__ import annotations

import logging
from pathlib import Path

from pyfast_tune.config import ConfigError
from pyfast_tune.trainer.checkpoint import (
    DS_TAG,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    universal_tag,
)

log = logging.getLogger(__name__)


def resolve_resume(resume, output_dir: Path) -> Path | None:
    """The checkpoint ``resume`` names: none (false), the latest in ``output_dir`` (true,
    auto, latest), a checkpoint folder, or the latest in another run's folder."""
    if resume in (False, None, "false", ""):
        return None
    if resume in (True, "auto", "true", "latest"):
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if (path / "trainer_state.json").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return found


def deepspeed_tag(resume_from: Path | None, world: int, ds_cfg: dict) -> str:
    """The DeepSpeed checkpoint tag to load. Optimizer state saved by another number of
    processes is partitioned for them: it loads through DeepSpeed's universal checkpoint
    format (converted once, see ``universal_tag``), which ``ds_cfg`` is switched to."""
    if resume_from is None:
        return DS_TAG
    saved = read_trainer_state(resume_from)
    if saved["world_size"] != world and saved.get("has_optimizer", True):
        ds_cfg["checkpoint"] = {"load_universal": True}
        return universal_tag(resume_from)
    return DS_TAG


def restore(engine, resume_from: Path, tag: str, exclude_frozen: bool, *, global_batch: int,
            geometry: str, fingerprint: str | None, packed_dir: Path) -> int:  # fmt: skip
    """Load ``resume_from`` into ``engine``; the step it continues from. Refuses a checkpoint
    trained on another global batch (``geometry`` says how this run's is made) or on other
    data: either would not continue the same run."""
    state = load_checkpoint(engine, resume_from, exclude_frozen, tag)
    if state["global_batch"] != global_batch:
        raise ConfigError(
            f"{resume_from} was trained with a global batch of {state['global_batch']} packs; "
            f"this run has {global_batch} ({geometry}): set global_batch_size to resume on the "
            "same batches"
        )
    if state.get("data_fingerprint") != fingerprint:
        raise ConfigError(f"{resume_from} was trained on different data ({packed_dir})")
    log.info(
        "resumed from %s at step %d (saved by %d processes)",
        resume_from,
        state["step"],
        state["world_size"],
    )
    return state["step"]
