"""`pyfast-tune convert` of a 2-process ZeRO-3 full fine-tune reloads to the live weights of its
step, in any dtype and shard size; broken checkpoints fail naming what is missing. (LoRA runs
under ZeRO-2 are converted in test_workflow.py, on its 2-process run.)"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pyfast_tune.cli import main as cli
from pyfast_tune.export import convert, resolve_checkpoint
from tests.conftest import tiny_training, train_process

STEPS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, generated_chats):
    return tiny_training(
        tmp_path_factory.mktemp("export"), tiny_tokenizer, generated_chats, records=40, turns=2,
        config="lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        f"max_steps: {STEPS}\nlr: 3.0e-3\nmicro_batch_size: 1\nglobal_batch_size: 2\n"
        "gradient_checkpointing: false\ntensorboard: false\nprogress_bar: false\n",
    )  # fmt: skip


def _train(setup, out, nproc, *args):
    train_process(setup["config"], out, nproc, *args)
    return out


@pytest.fixture(scope="module")
def zero3_full(setup, tmp_path_factory):
    """2 processes, ZeRO-3, full fine-tune; the checkpoint's hf/ holds the live weights of the
    step, gathered from the partitioned parameters by DeepSpeed at save time."""
    return _train(setup, tmp_path_factory.mktemp("z3") / "run", 2, "--deepspeed", "zero3",
                  "--method", "full")  # fmt: skip


def test_zero3_full_checkpoint_reloads_to_the_live_weights(setup, zero3_full, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert cli(["convert", str(zero3_full), str(out)]) == 0  # the run dir: its latest step
    printed = capsys.readouterr().out
    assert "step 2, ZeRO-3, 2 ranks, optimizer weights" in printed
    step = zero3_full / "checkpoints" / f"step_{STEPS:08d}"
    ours = load_file(out / "model.safetensors")
    live = load_file(step / "hf" / "model.safetensors")
    init = load_file(setup["model"] / "model.safetensors")
    assert sorted(ours) == sorted(live)
    for name in live:
        torch.testing.assert_close(ours[name], live[name], rtol=1e-6, atol=1e-7, msg=name)
    moved = max(float((ours[n] - init[n]).abs().max()) for n in init)
    assert moved > 1e-3  # trained weights, not the initial ones
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_hidden_layers == 2
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "pyfast_tune.json").read_text())["template"] == "default"


def test_zero3_convert_dtype_and_shards(zero3_full, tmp_path):
    out = tmp_path / "bf16"
    convert(zero3_full / "checkpoints" / f"step_{STEPS:08d}", out, dtype="bf16",
            max_shard_size="64KB")  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    tensors = {}
    for s in shards:
        tensors.update(load_file(out / s))
    live = load_file(zero3_full / "checkpoints" / f"step_{STEPS:08d}" / "hf" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    for name, t in tensors.items():
        torch.testing.assert_close(t, live[name].to(torch.bfloat16), rtol=0, atol=0)


def test_zero3_missing_rank_file_is_named(zero3_full, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero3_full / "checkpoints" / f"step_{STEPS:08d}", ckpt)
    (ckpt / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(
        FileNotFoundError, match="1 optimizer partition files for a world size of 2"
    ):
        convert(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,method", [("zero1", "lora"), ("zero3", "lora"), ("zero2", "full"), ("zero1", "full")]
)
def test_every_stage_and_method_converts_to_the_live_weights(setup, tmp_path, preset, method):
    """ZeRO-1/2/3 x LoRA/full on 2 processes: convert equals the hf/ output of the live run."""
    run = _train(setup, tmp_path / "run", 2, "--deepspeed", preset, "--method", method)
    report = convert(run, tmp_path / "out")
    assert report["zero_stage"] == int(preset[-1]) and report["world_size"] == 2
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    ours = load_file(tmp_path / "out" / name)
    live = load_file(resolve_checkpoint(run) / "hf" / name)
    assert sorted(ours) == sorted(live)
    for k in live:
        torch.testing.assert_close(ours[k], live[k], rtol=1e-6, atol=1e-7, msg=k)
