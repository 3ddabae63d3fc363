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
