"""Crash safety of training checkpoints: `trainer/checkpoint.py` writes a checkpoint
into `.tmp-step_N`, renames it to `step_N` and only then rewrites the `latest` pointer. Here a
process saving checkpoint after checkpoint (with a stand-in for the DeepSpeed engine, so no
model is needed) is SIGKILLed at random moments; after every kill the checkpoint `latest`
names must be complete and loadable, and the next process resumes from it.

`PYFAST_CKPT_KILLS=N` sets the loop length (default 4; docs/RELIABILITY.md has a long run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="training extra ([train]) not installed")

from pyfast_tune.trainer import checkpoint as ck  # noqa: E402

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    from pyfast_tune.trainer import checkpoint as ck

    class Engine:  # DeepSpeed's save_checkpoint, writing what it writes: torch.save'd states
        def __init__(self, step): self.step = step
        def save_checkpoint(self, d, tag, save_latest, exclude_frozen_parameters):
            p = Path(d) / tag
            p.mkdir(parents=True)
            w = torch.full((256, 1024), float(self.step))  # 1 MB per file, slow enough to hit
            torch.save({"module": w}, p / "mp_rank_00_model_states.pt")
            torch.save({"optimizer": w * 2}, p / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    out = Path(sys.argv[1])
    latest = ck.latest_checkpoint(out)
    step = ck.read_trainer_state(latest)["step"] if latest else 0
    print(step, flush=True)
    while True:
        step += 1
        ck.save_checkpoint(Engine(step), None, out, step, {"world_size": 1}, zero_stage=2,
                           save_optimizer=True, save_hf_output=False, exclude_frozen=False,
                           tokenizer=None)
    """
)


def check_complete(out: Path) -> int:
    """The checkpoint `latest` names is whole: its state files load (weights only) and agree
    with its trainer_state. Returns its step (0 when there is none yet)."""
    latest = ck.latest_checkpoint(out)
    if latest is None:
        return 0
    step = ck.read_trainer_state(latest)["step"]
    assert latest.name == ck.step_name(step)
    states = latest / "deepspeed" / ck.DS_TAG
    m = torch.load(states / "mp_rank_00_model_states.pt", weights_only=True)
    o = torch.load(states / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)
    assert torch.all(m["module"] == step) and torch.all(o["optimizer"] == 2 * step)
    return step


def test_sigkill_during_checkpointing_resumes_from_last_complete(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(4)
    kills = int(os.environ.get("PYFAST_CKPT_KILLS", "4"))
    last = 0
    for _ in range(kills):
        p = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        resumed = int(p.stdout.readline() or -1)  # after imports, resume point chosen
        assert resumed == last, p.stderr.read()
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        step = check_complete(out)
        assert step >= last  # a kill never loses a complete checkpoint
        last = step
    assert last > 0, "no checkpoint completed in the whole loop: kills too early to test"
    print(f"checkpoint kill loop: {kills} SIGKILLs, resumed each time, last complete step {last}")
    # Partial directories of killed saves are hidden and removed by the next save.
    _save(out, last + 1)
    assert check_complete(out) == last + 1
    assert not list((out / "checkpoints").glob(".tmp-*"))


def _fail_at(monkeypatch, target: str, after: int = 0):
    """Make `target` (a function of the checkpoint module's `os`/`shutil`) raise on its
    (after+1)-th call, as a kill at that instant would stop the save."""
    mod, name = target.split(".")
    obj = getattr(ck, mod)
    real = getattr(obj, name)
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt(f"killed at {target}")
        return real(*a, **k)

    monkeypatch.setattr(obj, name, boom)


class _Engine:
    def __init__(self, step: int) -> None:
        self.step = step

    def save_checkpoint(self, d, tag, save_latest, exclude_frozen_parameters):
        p = Path(d) / tag
        p.mkdir(parents=True)
        torch.save({"module": torch.full((4,), float(self.step))}, p / "mp_rank_00_model_states.pt")
        torch.save({"optimizer": torch.full((4,), 2.0 * self.step)},
                   p / "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # fmt: skip


def _save(out: Path, step: int) -> None:
    ck.save_checkpoint(_Engine(step), None, out, step, {}, zero_stage=2, save_optimizer=True,
                       save_hf_output=False, exclude_frozen=False, tokenizer=None)  # fmt: skip


@pytest.mark.parametrize("target,after", [("os.replace", 0), ("os.replace", 1), ("os.fsync", 0),
                                          ("os.fsync", 1)])  # fmt: skip
def test_interrupted_save_of_a_new_step_keeps_previous(tmp_path, monkeypatch, target, after):
    _save(tmp_path, 1)
    with monkeypatch.context() as m:
        _fail_at(m, target, after)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 2)
    assert check_complete(tmp_path) in (1, 2)
    _save(tmp_path, 3)
    assert check_complete(tmp_path) == 3
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def _two_complete_then_resave(tmp_path, monkeypatch, target: str, after: int) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    with monkeypatch.context() as m:
        _fail_at(m, target, after)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 2)


@pytest.mark.parametrize("target,after", [("os.replace", 0), ("os.replace", 1),
                                          ("shutil.rmtree", 0)])  # fmt: skip
def test_interrupted_resave_of_the_latest_step_keeps_a_complete_checkpoint(
    tmp_path, monkeypatch, target, after
):
    """Re-saving step 2 swaps it in with RENAME_EXCHANGE: a kill before the swap leaves the
    old step 2, after it the new one; never a `latest` naming a missing directory."""
    _two_complete_then_resave(tmp_path, monkeypatch, target, after)
    assert check_complete(tmp_path) == 2
    _save(tmp_path, 3)
    assert check_complete(tmp_path) == 3
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("after", [0, 1, 2, 3])
def test_resave_without_rename_exchange_falls_back_to_a_complete_checkpoint(
    tmp_path, monkeypatch, after
):
    """Where renameat2 is missing the old step is moved aside first; a kill between the two
    renames leaves `latest` naming a missing step_2, and the newest complete one is used."""
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    _two_complete_then_resave(tmp_path, monkeypatch, "os.replace", after)
    assert check_complete(tmp_path) in (1, 2)
    _save(tmp_path, 3)
    assert check_complete(tmp_path) == 3
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_pointer_to_a_missing_checkpoint_with_nothing_else_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("step_00000005\n")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ck.latest_checkpoint(tmp_path)


def test_exchange_swaps_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not ck._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this kernel/filesystem")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_trainer_state_is_json_not_pickle(tmp_path):
    _save(tmp_path, 1)
    state = json.loads((ck.latest_checkpoint(tmp_path) / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["has_optimizer"] is True


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, monkeypatch):
    """A doctored DeepSpeed state file (a pickle that calls os.system) is refused before
    DeepSpeed, which loads with weights_only=False, ever sees it; nothing runs."""
    monkeypatch.chdir(tmp_path)
    _save(tmp_path, 1)
    latest = ck.latest_checkpoint(tmp_path)
    states = latest / "deepspeed" / ck.DS_TAG
    torch.save({"optimizer": _Evil()}, states / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    class Engine:
        def load_checkpoint(self, *a, **k):
            raise AssertionError("DeepSpeed was asked to unpickle a doctored file")

    with pytest.raises(
        ValueError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt.*not weights-only"
    ):
        ck.load_checkpoint(Engine(), latest, exclude_frozen=False)
    assert not (tmp_path / "pwned").exists()


def test_check_weights_only_accepts_plain_states(tmp_path):
    _save(tmp_path, 1)
    assert ck.check_weights_only(ck.latest_checkpoint(tmp_path) / "deepspeed" / ck.DS_TAG) == 2


def test_every_checkpoint_file_is_flushed_before_the_commit_rename(tmp_path, monkeypatch):
    """Power loss after the rename must not leave a named checkpoint with unwritten files."""
    flushed = []
    real = ck._fsync_path
    monkeypatch.setattr(ck, "_fsync_path", lambda p: (flushed.append(Path(p)), real(p)))
    _save(tmp_path, 1)
    final = ck.latest_checkpoint(tmp_path)
    tmp = final.with_name(".tmp-" + final.name)
    written = [p for p in final.rglob("*")]
    assert written and all(tmp / p.relative_to(final) in flushed for p in written)
    assert final.parent in flushed  # the directory holding the rename and `latest`


def test_deepspeed_checkpoint_engine_loads_weights_only(tmp_path, monkeypatch):
    """After load_checkpoint's patch, DeepSpeed's own TorchCheckpointEngine.load refuses a
    pickle that would run code (it passes weights_only=False by itself)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    monkeypatch.chdir(tmp_path)
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    ck._load_weights_only(engine)
    assert torch.equal(
        engine.checkpoint_engine.load(str(tmp_path / "plain.pt"))["w"], torch.ones(2)
    )
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        engine.checkpoint_engine.load(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()
