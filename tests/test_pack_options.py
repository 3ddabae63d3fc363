"""The engine's PackConfig is the one schema of pack options: the Python API, the fingerprint
and the CLI must offer every field with the engine's default, so a field added in Rust and
forgotten on one side fails here."""

import inspect

from pyfast_tune.cli import build_parser
from pyfast_tune.data import fingerprint, pack, pack_defaults

# Fields that only split or speed up the work, so they never change the fingerprint.
NOT_FINGERPRINTED = {"out_dir", "threads", "rebuild_meta", "shard"}


def test_data_pack_takes_every_field_with_its_default():
    params = inspect.signature(pack).parameters
    for name, default in pack_defaults().items():
        assert name in params, name
        if params[name].default is not inspect.Parameter.empty:
            assert params[name].default == default or (
                default == "" and params[name].default is None
            ), name


def test_fingerprint_takes_every_determinant():
    params = inspect.signature(fingerprint).parameters
    assert set(pack_defaults()) - NOT_FINGERPRINTED <= set(params)


def test_cli_pack_has_a_flag_per_field_with_its_default():
    sub = build_parser()._subparsers._group_actions[0].choices["pack"]
    dests = {a.dest: a for a in sub._actions}
    rename = {"out_dir": "out"}
    for name, default in pack_defaults().items():
        dest = rename.get(name, name)
        assert dest in dests, name
        if name in ("inputs", "out_dir", "tokenizer", "shard", "columns"):
            continue  # required, positional or parsed from text
        assert dests[dest].default == default, name
