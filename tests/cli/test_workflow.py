"""The README walk-through on generated chats and a tokenizer trained on them (so it runs on any
clone): pack -> inspect -> train a tiny Llama with LoRA under ZeRO-2 on 2 CPU processes
(`pyfast-tune train`) -> convert -> merge -> `chat --prompt`: the merged model answers exactly
as base + adapter. Plus the demo."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pyfast_tune.cli import main as cli
from pyfast_tune.export import convert, load_zero_state, resolve_checkpoint

STEPS = 4
QUESTION = "What is your favorite book series?"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer, generated_chats):
    from pyfast_tune.trainer.tiny import make_tiny_llama, trimmed_conversations

    tok = tiny_tokenizer
    d = tmp_path_factory.mktemp("workflow")
    jsonl = trimmed_conversations(generated_chats, d / "chat.jsonl", 120, turns=4)
    assert cli(["pack", str(jsonl), "--out", str(d / "packed"), "--tokenizer", str(tok),
                "--max-length", "256", "--format", "openai", "--template", "default"]) == 0  # fmt: skip
    model = make_tiny_llama(d / "tiny", tok, seed=0, init_std=0.1)
    config = d / "run.yaml"
    config.write_text(
        f"model: {model}\ndata: {d / 'packed'}\nmax_length: 256\nmethod: lora\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        f"max_steps: {STEPS}\nlr: 1.0e-2\nmicro_batch_size: 1\nglobal_batch_size: 4\n"
        "gradient_checkpointing: false\ntensorboard: false\nprogress_bar: false\n"
    )
    out = d / "run"
    # Launch options after RUN.yaml, and a config override, as the README shows.
    assert cli(["train", str(config), "--nproc", "2", "--deepspeed", "zero2",
                "--output_dir", str(out)]) == 0  # fmt: skip
    return {"dir": d, "model": model, "out": out, "packed": d / "packed"}


def _chat(capsys, *args) -> str:
    capsys.readouterr()
    assert cli(["chat", *map(str, args), "--prompt", QUESTION, "--max-new-tokens", "24"]) == 0
    return capsys.readouterr().out


def test_pack_train_convert_merge_chat(run, tmp_path, capsys):
    assert cli(["inspect", str(run["packed"]), "--plot", str(tmp_path / "len.png")]) == 0
    assert "samples in" in capsys.readouterr().out and (tmp_path / "len.png").is_file()
    state = json.loads((resolve_checkpoint(run["out"]) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == STEPS

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert cli(["convert", str(run["out"]), str(adapter)]) == 0
    assert "ZeRO-2, 2 ranks" in capsys.readouterr().out
    assert (adapter / "adapter_model.safetensors").is_file()
    assert cli(["merge", str(run["model"]), str(adapter), str(merged)]) == 0
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert not any("lora" in k for k in load_file(merged / "model.safetensors"))

    from_merged = _chat(capsys, merged)  # template "default" recorded by convert/merge
    from_adapter = _chat(capsys, run["model"], "--adapter", adapter)
    from_base = _chat(capsys, run["model"], "--template", "default")
    assert from_merged == from_adapter
    assert len(from_merged.strip()) > 0
    assert from_base != from_merged  # the adapter changed the greedy answer


def test_convert_merge_chat_print_no_dependency_noise(run, tmp_path):
    # Fresh processes: in-process, a warning shown once by an earlier test would not repeat.
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    env = dict(os.environ, PYTHONWARNINGS="default")
    for argv in (
        ["convert", run["out"], adapter],
        ["merge", run["model"], adapter, merged],
        ["chat", merged, "--prompt", QUESTION, "--max-new-tokens", "4"],
    ):
        cmd = [sys.executable, "-m", "pyfast_tune.cli", *map(str, argv)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        both = proc.stdout + proc.stderr
        assert proc.returncode == 0, both[-4000:]
        for noise in ("gemm_4bit", "FutureWarning", "DeprecationWarning", "deprecated",
                      "Setting accelerator to CPU", "Loading weights", "Writing model shards"):  # fmt: skip
            assert noise not in both, (argv[0], noise, both[-3000:])


def test_lora_state_with_and_without_optimizer_gives_the_trained_adapter(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    step = resolve_checkpoint(run["out"])
    assert step.name == f"step_{STEPS:08d}"
    with_opt = convert(step, tmp_path / "a")
    assert with_opt["kind"] == "adapter" and with_opt["source"] == "optimizer"
    # save_optimizer: false deletes the ZeRO-1/2 optimizer partitions; the module state remains.
    bare = tmp_path / "bare"
    shutil.copytree(step, bare)
    for f in (bare / "deepspeed" / "state").glob("*optim_states.pt"):
        f.unlink()
    without = convert(bare, tmp_path / "b")
    assert without["source"] == "module"
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    saved = load_file(step / "hf" / "adapter_model.safetensors")  # written by the live run
    assert sorted(a) == sorted(b) == sorted(saved) and len(a) == 2 * 7 * 2  # A, B x 7 x 2 layers
    for k in a:
        torch.testing.assert_close(a[k], saved[k], rtol=0, atol=0)
        torch.testing.assert_close(b[k], saved[k], rtol=0, atol=0)
    assert min(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0  # B trained
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(run["model"])
    base = AutoModelForCausalLM.from_pretrained(run["model"], dtype=torch.float32)
    PeftModel.from_pretrained(base, tmp_path / "a")


def test_state_loading_is_weights_only(run, monkeypatch):
    """No DeepSpeed file is unpickled with weights_only=False."""
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state, info = load_zero_state(resolve_checkpoint(run["out"]) / "deepspeed" / "state")
    assert len(seen) == 3 and all(w is True for w in seen)  # model states + 2 optimizer ranks
    assert info == {"zero_stage": 2, "world_size": 2, "source": "optimizer"} and len(state) == 28


def test_demo_walkthrough(tmp_path, capsys):
    """`make demo` (python -m pyfast_tune.demo), smaller: every step runs and is printed."""
    from pyfast_tune.demo import main as demo

    assert (
        demo(
            [
                "--out",
                str(tmp_path / "demo"),
                "--samples",
                "300",
                "--steps",
                "3",
                "--pretrain-steps",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for command in ("pack", "inspect", "train", "convert", "merge", "chat"):
        assert f"$ pyfast-tune {command} " in out
    assert (tmp_path / "demo" / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "lengths.png").is_file()


@pytest.mark.slow
def test_full_demo_learns_the_generated_fact(tmp_path, capsys):
    """`make demo` as is (~40 s): pretraining + LoRA teach the tiny model the data's one fact
    about the cat, and the merged model says it when asked."""
    from pyfast_tune.demo import DEMO_QUESTION, fact
    from pyfast_tune.demo import main as demo

    assert DEMO_QUESTION == "What does the cat do?"
    assert demo(["--out", str(tmp_path / "demo")]) == 0
    answer = capsys.readouterr().out.split(f"--prompt '{DEMO_QUESTION}'")[1]
    assert fact("the cat") in answer.split("(the generated data's answer")[0]


def _fake_launch(monkeypatch, fake) -> None:
    """Replace the launcher the CLI calls (``from pyfast_tune.launch import launch`` at call
    time reads sys.modules; patch that module object and the package attribute alike)."""
    import importlib

    import pyfast_tune

    module = importlib.import_module("pyfast_tune.launch")
    monkeypatch.setattr(module, "launch", fake)
    monkeypatch.setattr(pyfast_tune, "launch", module, raising=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "run.yaml", "--nproc", "2", "--deepspeed", "zero3", "--lr", "1e-4"],
        ["train", "--nproc", "2", "--deepspeed", "zero3", "run.yaml", "--lr", "1e-4"],
        ["train", "--nproc", "2", "run.yaml", "--lr", "1e-4", "--deepspeed", "zero3"],
    ],
)
def test_train_command_passes_launch_options_and_overrides(argv, monkeypatch):
    calls = []
    _fake_launch(monkeypatch, lambda *a, **k: calls.append((a, k)) or 0)
    assert cli(argv) == 0
    expected = {"num_gpus": None, "nproc": 2, "deepspeed": "zero3", "extra_args": ["--lr", "1e-4"]}
    assert calls == [(("run.yaml",), expected)]


def test_train_command_refuses_both_launchers(monkeypatch, capsys):
    _fake_launch(monkeypatch, lambda *a, **k: 0)
    assert cli(["train", "run.yaml", "--nproc", "2", "--num-gpus", "8"]) == 2
    assert "exclude each other" in capsys.readouterr().err
