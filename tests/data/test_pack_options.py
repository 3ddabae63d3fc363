"""The engine's PackConfig is the one schema of pack options: the Python API, the fingerprint
and the CLI must offer every field with the engine's default, so a field added in Rust and
forgotten on one side fails here."""

import inspect

from pyfast_tune.cli import build_parser
from pyfast_tune.data import fingerprint, pack, pack_defaults, pack_fields

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
    for field in pack_fields():
        name = field["name"]
        assert name in dests, name
        assert field["help"] in dests[name].help, name
        if field["kind"] == "paths":
            continue  # positional
        assert dests[name].default == field["default"], name
        if field["choices"]:
            assert list(dests[name].choices) == field["choices"], name
    assert {f["name"] for f in pack_fields()} == set(pack_defaults())


def test_cli_pack_passes_every_flag_to_the_engine(monkeypatch, tmp_path):
    # The flags are parsed from the engine's table and handed to pack() by name: a non-default
    # value of every kind must arrive unchanged.
    import pyfast_tune.data as data
    from pyfast_tune.cli import main

    seen = {}

    class _Stats:
        skipped_examples = []
        samples = tokens = 0

        def summary(self):
            return "ok"

    def fake_pack(**kwargs):
        seen.update(kwargs)
        return _Stats()

    monkeypatch.setattr(data, "pack", fake_pack)
    argv = ["pack", "a.jsonl", "--in", "b.jsonl", "--out", str(tmp_path / "o"),
            "--tokenizer", "tok", "--max-length", "128", "--format", "alpaca",
            "--template", "none", "--seed", "3", "--threads", "2", "--skip-bad",
            "--tokenizer-backend", "hf", "--columns", "instruction=q", "--min-length", "5",
            "--file-type", ".bin", "--rebuild-meta", "--shard", "1/4",
            "--data-order", "order.txt", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert seen["inputs"] == ["a.jsonl", "b.jsonl"]
    assert seen["out_dir"] == str(tmp_path / "o")
    assert (seen["max_length"], seen["seed"], seen["threads"], seen["min_length"]) == (128, 3, 2, 5)
    assert seen["skip_bad"] is True and seen["rebuild_meta"] is True
    assert seen["shard"] == (1, 4) and seen["tokenizer_backend"] == "hf"
    assert (seen["format"], seen["template"], seen["columns"]) == (
        "alpaca",
        "none",
        "instruction=q",
    )
    assert (seen["file_type"], seen["data_order"]) == (".bin", "order.txt")
    assert set(seen) - {"progress"} == set(pack_defaults())
