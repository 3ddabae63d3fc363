"""The engine's errors are typed: each failure a caller can meet has its own class, exported
from ``pyfast_tune``, and each is still a ``PackConfigError`` where it was one before, so
existing ``except`` clauses keep working. The stubs in ``_packer.pyi`` list the extension."""

import ast
import json
from pathlib import Path

import pytest

import pyfast_tune
from pyfast_tune import _packer
from pyfast_tune.data import merge_packs, pack, pack_defaults, pack_options

CHAT = {"conversation": [{"input": "hello there", "output": "general kenobi"}]}


def write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_each_failure_raises_its_exported_class(tmp_path, tiny_tokenizer):
    empty = write(tmp_path / "empty.jsonl", [{"conversation": []}] * 2)
    with pytest.raises(pyfast_tune.NoTrainableSamplesError, match="2 dropped"):
        pack(empty, tmp_path / "a", tokenizer=tiny_tokenizer)

    data = write(tmp_path / "d.jsonl", [CHAT] * 4)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(pyfast_tune.OutputExistsError, match="refusing to replace") as e:
        pack(data, tmp_path / "taken", tokenizer=tiny_tokenizer)
    assert e.value.path == str(tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"

    pack(data, tmp_path / "p0", tokenizer=tiny_tokenizer, shard=(0, 2))
    with pytest.raises(pyfast_tune.ShardMismatchError, match="need shards"):
        merge_packs([tmp_path / "p0"], tmp_path / "m")

    for cls in (
        pyfast_tune.NoTrainableSamplesError,
        pyfast_tune.OutputExistsError,
        pyfast_tune.ShardMismatchError,
        pyfast_tune.OutsideDataRootError,
    ):
        assert issubclass(cls, pyfast_tune.PackConfigError)
        assert issubclass(cls, pyfast_tune.PackError)


def test_pack_options_follow_the_engine_schema(tmp_path, tiny_tokenizer):
    defaults = pack_defaults()
    assert defaults["max_length"] == 4096 and defaults["template"] == "default"
    with pytest.raises(pyfast_tune.PackConfigError, match="unknown pack options.*max_lenght"):
        pack_options(max_lenght=8)
    # The engine refuses unknown fields itself too, naming the known ones.
    bad = dict(defaults, inputs=[str(tmp_path)], max_lenght=8)
    with pytest.raises(pyfast_tune.PackConfigError, match="unknown field `max_lenght`"):
        _packer.pack(bad)


def test_every_exception_is_exported():
    # Every error class a caller can get from the data engine, the Hub resolver and the
    # training config is importable from the package root.
    from pyfast_tune import config, data, hub

    classes = {
        n
        for module in (data, hub, config)
        for n in dir(module)
        if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), Exception)
    }
    assert {"HubError", "ConfigError", "DataFormatError"} <= classes
    assert classes <= set(pyfast_tune.__all__)
    for name in pyfast_tune.__all__:
        assert getattr(pyfast_tune, name) is not None


def test_stubs_list_the_extension():
    stub = ast.parse((Path(pyfast_tune.__file__).parent / "_packer.pyi").read_text())
    # TypedDicts only describe the dicts the extension returns; they are not in it.
    shapes = {
        n.name
        for n in stub.body
        if isinstance(n, ast.ClassDef) and any(getattr(b, "id", "") == "TypedDict" for b in n.bases)
    }
    stubbed = {n.name for n in stub.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    public = {n for n in dir(_packer) if not n.startswith("_")}
    assert stubbed - shapes == public
    assert shapes == {"FieldDoc", "TemplateDict", "BinaryFile", "EngineFacts", "VerifyReport"}


def test_engine_facts_describe_what_pack_writes(tmp_path, tiny_tokenizer):
    from pyfast_tune import data

    assert data.IMAGE_TOKEN_ID == data.IMAGE_TOKEN_INDEX & 0xFFFFFFFF
    assert "Qwen2TokenizerFast" in data.NO_BOS_CLASSES
    out = tmp_path / "p"
    pack(write(tmp_path / "d.jsonl", [CHAT] * 3), out, tokenizer=tiny_tokenizer)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == data.FORMAT_VERSION
    assert list(meta["outputs"]) == list(data.BINARY_LAYOUT)
    ds = data.PackedDataset(out)
    assert ds.samples.shape == (3, data.BINARY_LAYOUT["samples.bin"][1])
    assert ds.input_ids.dtype == data.BINARY_LAYOUT["input_ids.bin"][0]


def test_the_binding_takes_and_returns_python_objects(tmp_path, tiny_tokenizer):
    """Options cross as a dict (paths and tuples as they are), statistics and the verify report
    come back as dicts: no JSON text on either side."""
    from pyfast_tune.data import PackedDataset, PackStats

    data = write(tmp_path / "d.jsonl", [CHAT] * 5)
    options = pack_options(inputs=[data], out_dir=tmp_path / "p", tokenizer=Path(tiny_tokenizer))
    stats = _packer.pack(dict(options, max_length=64, shard=None))
    assert isinstance(stats, dict) and stats["samples"] == 5
    # Every field the engine sends is a PackStats field, and every field PackStats cannot
    # default (all but the optional ones, such as a mix's per-source figures) is sent.
    required = set(PackStats.FIELDS) - PackStats.OPTIONAL
    assert required <= set(stats) <= set(PackStats.FIELDS)
    assert {"load_seconds", "encode_seconds", "write_seconds"} <= set(stats)
    # a frozen record: compared by value, changed only by copy, every field required or
    # defaulted (a new list each), nothing unknown
    record = PackStats(**stats)
    assert record == PackStats(**stats) and record.replace(samples=6) != record
    assert record.replace(samples=6).samples == 6 and record.samples == 5
    with pytest.raises(AttributeError, match="frozen"):
        record.samples = 6
    with pytest.raises(TypeError, match=r"missing fields \['records'\]"):
        PackStats(**{k: v for k, v in stats.items() if k != "records"})
    with pytest.raises(TypeError, match=r"unknown fields \['sample'\]"):
        PackStats(**stats, sample=1)
    bare = {k: v for k, v in stats.items() if k not in PackStats.OPTIONAL}
    a, b = PackStats(**bare), PackStats(**bare)
    assert a.mix == [] and a.mix is not b.mix and a.pairs == 0
    assert list(vars(record)) == list(PackStats.FIELDS)  # the CLI's --json prints vars()
    assert isinstance(stats["fill"], float) and isinstance(stats["packs"], int)
    report = PackedDataset(tmp_path / "p").verify()
    assert report["ok"] is True and report["samples"] == 5 and report["split_samples"] == 0
    assert _packer.pack_fields()[0]["name"] == "inputs"
    assert {t["name"] for t in _packer.templates()} >= {"default", "qwen_chat"}
    with pytest.raises(TypeError, match=r"options\.inputs\[1\]: a object cannot be"):
        _packer.pack(dict(options, inputs=[str(data), object()]))
    with pytest.raises(TypeError, match=r"options\.max_length: integer .* out of range"):
        _packer.pack(dict(options, max_length=2**70))
