"""Every training setting with a fixed set of values is checked when the config loads: a typo
is an error listing the choices, never a silent fallback (an unknown ``attention`` used to
train with the model's own attention)."""

import pytest

from pyfast_tune import ConfigError
from pyfast_tune.config import QUANT_TYPES, load_config
from pyfast_tune.patch import ATTENTION_CHOICES, ATTENTION_NAMES

BASE = ["--model", "m", "--data.path", "p"]


@pytest.mark.parametrize("value", ATTENTION_CHOICES)
def test_every_attention_choice_loads(value):
    assert load_config(None, [*BASE, "--attention", value]).attention == value


def test_patched_attention_names_are_choices():
    assert set(ATTENTION_NAMES) <= set(ATTENTION_CHOICES)
    assert {"op", "ref", "sdpa"} <= set(ATTENTION_CHOICES)


def test_unknown_attention_lists_the_choices():
    with pytest.raises(ConfigError, match="attention must be one of ref, op, .*sdpa.*got 'sdap'"):
        load_config(None, [*BASE, "--attention", "sdap"])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("quant.quant_type", "nf8", "quant.quant_type must be one of nf4, fp4"),
        ("quant.compute_dtype", "bf17", "quant.compute_dtype must be auto, fp32"),
        ("dtype", "half", "dtype must be auto, fp32"),
        ("method", "prefix", "method must be full, lora or qlora"),
        ("lr_scheduler", "step", "lr_scheduler must be cosine, linear or constant"),
    ],
)
def test_other_fixed_choices_are_checked(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, f"--{key}", value])


def test_known_values_still_load():
    cfg = load_config(None, [*BASE, "--quant.quant_type", QUANT_TYPES[1], "--dtype", "bf16"])
    assert cfg.quant.quant_type == "fp4" and cfg.dtype == "bf16"


def test_shipped_configs_need_nothing_outside_the_clone():
    from pathlib import Path

    import pyfast_tune

    configs = sorted((Path(pyfast_tune.__file__).parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert "../shared" not in path.read_text(), path
        load_config(path)  # every fixed-choice value in it is a valid one


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr_rate", "1"], "unknown config key"),
        (["--lr", "fast"], "config key lr must be a float"),
        (["--data.path", "p", "--data.inputs", "[a]"], "exactly one of data.path"),
        (["--micro_batch_size", "0"], "micro_batch_size must be >= 1"),
    ],
)
def test_config_errors_are_one_exported_type(argv, message):
    # Callers (and the CLI) catch one exception for every bad key or value; it stays a
    # ValueError so code written against plain ValueError keeps working.
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [*BASE, *argv])
    assert isinstance(info.value, ValueError)


def test_every_engine_pack_option_is_a_data_key():
    # The data section is derived from the engine's PackConfig: a field added there is accepted
    # as data.<field> (and passed to pack) without a change in the training config.
    from pyfast_tune.config import _PACK_FIELDS_OWNED
    from pyfast_tune.data import pack_fields

    inputs = ["--model", "m", "--data.inputs", "[a.jsonl]", "--data.tokenizer", "t"]
    samples = {"int": "3", "bool": "true", "str": "x", "path": "p"}
    for field in pack_fields():
        if field["name"] in _PACK_FIELDS_OWNED:
            continue
        value = samples[field["kind"]]
        if field["choices"]:
            value = field["choices"][-1]
        cfg = load_config(None, [*inputs, f"--data.{field['name']}", value])
        got = cfg.data.pack_options.get(field["name"], getattr(cfg.data, field["name"], None))
        assert str(got).lower() == value, field["name"]


def test_pack_options_in_the_data_section():
    argv = ["--model", "m", "--data.inputs", "[a.jsonl]", "--data.tokenizer", "t"]
    cfg = load_config(None, [*argv, "--data.columns", "instruction=q", "--data.min_length", "5"])
    assert cfg.data.pack_options == {"columns": "instruction=q", "min_length": 5}
    with pytest.raises(ConfigError, match="unknown config key.*data.min_lenght.*data.min_length"):
        load_config(None, [*argv, "--data.min_lenght", "5"])
    with pytest.raises(ConfigError, match="data.columns: pack options apply to data.inputs"):
        load_config(None, [*BASE, "--data.columns", "instruction=q"])


def test_config_and_data_import_neither_torch_nor_transformers(tmp_path):
    # The core (pack, read) and config loading run without the [train] extra; a fresh
    # interpreter shows what they pull in (this one has torch loaded by other tests).
    import subprocess
    import sys

    from tests.conftest import ROOT

    config = tmp_path / "run.yaml"
    config.write_text("model: m\ndata:\n  inputs: [a.jsonl]\n  tokenizer: t\n  min_length: 2\n"
                      "attention: op\ndtype: bf16\nmethod: qlora\nquant: {quant_type: fp4}\n")  # fmt: skip
    code = (
        "import sys\n"
        "import pyfast_tune.data\n"
        "from pyfast_tune.config import load_config\n"
        f"cfg = load_config({str(config)!r}, ['--attention', 'ref'])\n"
        "assert cfg.data.pack_options == {'min_length': 2}, cfg.data\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
