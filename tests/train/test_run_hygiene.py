"""Run hygiene: save_total_limit keeps the newest N checkpoints (never the one `latest` names
or the one a resume reads); warmup_ratio and its conflicts. (A training run using both is in
test_model_setup.py.)"""

import json

import pytest

from pyfast_tune.config import ConfigError, load_config
from pyfast_tune.trainer.checkpoint import checkpoint_root, prune_checkpoints, step_name

BASE = ["--model", "m/", "--data", "packed/"]


def _fake_run(tmp_path, steps, latest):
    root = checkpoint_root(tmp_path)
    for s in steps:
        d = root / step_name(s)
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": s}))
    (root / step_name(99)).mkdir()  # no trainer_state.json: not a checkpoint, left alone
    (root / "latest").write_text(step_name(latest) + "\n")
    return root


def _left(root):
    return sorted(p.name for p in root.glob("step_*"))


def test_keeps_the_newest_n(tmp_path):
    root = _fake_run(tmp_path, [2, 4, 6, 8], latest=8)
    deleted = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == [step_name(2), step_name(4)]
    assert _left(root) == [step_name(6), step_name(8), step_name(99)]
    assert not list(root.glob(".tmp-*"))  # the renamed-away copies are gone too


def test_never_deletes_latest_or_the_resumed_checkpoint(tmp_path):
    # `latest` names an older step (a re-save after a resume from it), and the run resumed
    # from step 4: both survive a limit of 1.
    root = _fake_run(tmp_path, [2, 4, 6, 8], latest=6)
    prune_checkpoints(tmp_path, 1, protect=root / step_name(4))
    assert _left(root) == [step_name(4), step_name(6), step_name(8), step_name(99)]
    # A resume from another run's directory protects nothing here.
    prune_checkpoints(tmp_path, 1, protect=tmp_path / "other" / step_name(8))
    assert _left(root) == [step_name(6), step_name(8), step_name(99)]


def test_config_checks():
    cfg = load_config(None, [*BASE, "--save_total_limit", "2", "--warmup_ratio", "0.1"])
    assert cfg.save_total_limit == 2 and cfg.warmup_ratio == 0.1
    with pytest.raises(ConfigError, match=r"set one of warmup_steps \(5\) and warmup_ratio"):
        load_config(None, [*BASE, "--warmup_steps", "5", "--warmup_ratio", "0.1"])
    with pytest.raises(ConfigError, match=r"warmup_ratio must be a number in \[0, 1\)"):
        load_config(None, [*BASE, "--warmup_ratio", "1.5"])
    with pytest.raises(ConfigError, match="save_total_limit must be an integer >= 1"):
        load_config(None, [*BASE, "--save_total_limit", "0"])
