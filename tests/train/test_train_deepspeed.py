"""Multi-process DeepSpeed training on CPU (gloo): generated chats, a tokenizer trained on them (so
it runs on any clone), a tiny Llama.

Default run: a 2-process ZeRO-2 LoRA run (loss falls, metrics, checkpoints, from_pretrained),
1 process resuming it mid-run with the same losses, QLoRA + convert + merge, corrupted data
refused. Slow (-m slow): ZeRO-3 full and LoRA (built under zero.Init), ZeRO-2 full,
same-world resume, offload presets.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from pyfast_tune.trainer.metrics import read_metrics
from tests.conftest import ROOT, tiny_training, train_metrics, train_process

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, generated_chats):
    """Packed generated chats (4 turns, 256-token packs), a tiny model and a base config."""
    return tiny_training(
        tmp_path_factory.mktemp("ds"), tiny_tokenizer, generated_chats, records=150, turns=4,
        config="method: lora\nlora: {r: 8, alpha: 16, dropout: 0.1}\n"
        f"max_steps: {STEPS}\nlr: 1.0e-2\nwarmup_steps: 1\nmicro_batch_size: 1\n"
        "global_batch_size: 4\nsave_steps: 3\nprogress_bar: false\n",
    )  # fmt: skip


@pytest.fixture(scope="module")
def zero2_lora(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2_lora")
    return out, train_metrics(setup["config"], out, 2, "--deepspeed", "zero2")


def _assert_learns(metrics):
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        assert {"loss", "lr", "tokens", "trained_tokens", "seconds", "tokens_per_s", "mfu"} <= set(
            m
        )
        assert 0 < m["trained_tokens"] < m["tokens"] <= 4 * 256
        assert 0 < m["mfu"] < 1
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0] - 0.1, losses


def _packed_loss(model, packed_dir) -> float:
    from pyfast_tune.data import PackedDataset
    from pyfast_tune.trainer.batches import collate, global_normalizer
    from pyfast_tune.trainer.step import batch_loss

    ds = PackedDataset(packed_dir)
    ids = list(range(8))
    with torch.no_grad():
        batch = collate([ds[i] for i in ids], "token", global_normalizer(ds, ids, "token"))
        return float(batch_loss(model, batch, "cpu"))


def test_zero2_lora_two_processes(setup, zero2_lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics = zero2_lora
    _assert_learns(metrics)
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000006"]
    state = json.loads((root / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and state["global_batch"] == 4
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # The adapter loads with from_pretrained and is the trained one: lower loss than the base.
    hf = root / "step_00000006" / "hf"
    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    base_loss = _packed_loss(base, setup["packed"])
    tuned = PeftModel.from_pretrained(base, hf)
    assert _packed_loss(tuned, setup["packed"]) < base_loss - 0.1
    assert AutoTokenizer.from_pretrained(hf).eos_token == "<|im_end|>"


def test_one_process_resumes_a_two_process_run(setup, zero2_lora, tmp_path):
    """Stop a 2-process run after step 3, resume it with 1 process: steps 4-6 are unchanged."""
    _, full = zero2_lora
    out = tmp_path / "run"
    first = train_metrics(
        setup["config"], out, 2, "--deepspeed", "zero2", "--stop_after_steps", "3"
    )
    assert [m["step"] for m in first] == [1, 2, 3]
    # A save killed half-way leaves a temp dir: resume must ignore it.
    (out / "checkpoints" / ".tmp-step_00000006").mkdir()
    resumed = train_metrics(setup["config"], out, 1, "--deepspeed", "zero2", "--resume", "true")
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, full):
        assert a["tokens"] == b["tokens"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
    assert not (out / "checkpoints" / ".tmp-step_00000006").exists()


@pytest.mark.slow
def test_two_processes_resume_on_two_processes(setup, zero2_lora, tmp_path):
    _, full = zero2_lora
    out = tmp_path / "run"
    train_metrics(setup["config"], out, 2, "--deepspeed", "zero2", "--stop_after_steps", "3")
    resumed = train_metrics(setup["config"], out, 2, "--deepspeed", "zero2", "--resume", "true")
    for a, b in zip(resumed, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)


@pytest.mark.slow
def test_zero3_full_resumes_on_another_world_size(setup, tmp_path):
    """ZeRO-3 shards weights too: 1 process continues a 2-process run via the universal format."""
    args = ("--deepspeed", "zero3", "--method", "full", "--lr", "3e-3")
    full = train_metrics(setup["config"], tmp_path / "full", 2, *args)
    out = tmp_path / "run"
    train_metrics(setup["config"], out, 2, *args, "--stop_after_steps", "3")
    resumed = train_metrics(setup["config"], out, 1, *args, "--resume", "true")
    assert (out / "checkpoints" / "step_00000003" / "deepspeed" / "state_universal").is_dir()
    for a, b in zip(resumed, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)


@pytest.mark.slow
def test_resume_without_optimizer_state(setup, zero2_lora, tmp_path):
    """save_optimizer: false keeps weights and schedule; Adam restarts, so step 5 differs."""
    _, full = zero2_lora
    out = tmp_path / "run"
    args = ("--deepspeed", "zero2", "--save_optimizer", "false")
    train_metrics(setup["config"], out, 2, *args, "--stop_after_steps", "3")
    assert not list((out / "checkpoints").glob("step_*/deepspeed/state/*optim_states.pt"))
    resumed = train_metrics(setup["config"], out, 1, *args, "--resume", "true")
    assert resumed[3]["loss"] == pytest.approx(full[3]["loss"], rel=1e-5)  # same weights
    assert resumed[3]["lr"] == pytest.approx(full[3]["lr"])
    assert resumed[4]["loss"] != pytest.approx(full[4]["loss"], rel=1e-6)  # fresh moments


@pytest.mark.slow
@pytest.mark.parametrize("preset,method", [("zero3", "lora"), ("zero3", "full"), ("zero2", "full")])
def test_zero_stages_and_methods(setup, tmp_path, preset, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    proc = train_process(setup["config"], out, 2, "--deepspeed", preset, "--method", method,
                         "--lr", "3e-3")  # fmt: skip
    _assert_learns(read_metrics(out / "metrics.jsonl"))
    if preset == "zero3":  # built under zero.Init: rank 0 never held the whole base model
        m = re.search(r"this process holds (\d+) of (\d+) parameter elements", proc.stderr)
        assert m, proc.stderr[-3000:]
        assert int(m.group(1)) <= int(m.group(2)) // 2 + 1024
    hf = out / "checkpoints" / f"step_{STEPS:08d}" / "hf"
    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    base_loss = _packed_loss(base, setup["packed"])
    if method == "full":
        tuned = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        assert (hf / "model.safetensors").is_file()
    else:
        tuned = PeftModel.from_pretrained(base, hf)
    assert _packed_loss(tuned, setup["packed"]) < base_loss - 0.1


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["zero2_offload", "zero3_offload"])
def test_offload_presets(setup, tmp_path, preset):
    """Optimizer (and for ZeRO-3 parameter) offload: DeepSpeedCPUAdam, JIT-built on first use."""
    metrics = train_metrics(setup["config"], tmp_path / "run", 2, "--deepspeed", preset)
    _assert_learns(metrics)


def test_qlora_under_deepspeed_converts_and_merges(setup, tmp_path):
    """QLoRA trains; convert gives the live adapter (the checkpoint's hf/ copy), and merge into
    the full-precision base gives the logits of base + adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pyfast_tune.export import convert, merge

    out = tmp_path / "run"
    metrics = train_metrics(setup["config"], out, 1, "--deepspeed", "zero2", "--method", "qlora")
    _assert_learns(metrics)
    step = out / "checkpoints" / f"step_{STEPS:08d}"
    info = convert(step, tmp_path / "adapter")
    assert info["kind"] == "adapter"
    got = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    live = load_file(step / "hf" / "adapter_model.safetensors")
    assert got.keys() == live.keys() and len(got) > 0
    for k in got:
        torch.testing.assert_close(got[k].float(), live[k].float(), rtol=0, atol=1e-6)
    merge(setup["model"], tmp_path / "adapter", tmp_path / "merged")
    ids = torch.arange(5, 60).unsqueeze(0)
    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        got_logits = merged(ids).logits
    torch.testing.assert_close(got_logits, want, rtol=1e-4, atol=1e-4)


def test_packs_raw_inputs_once_into_a_fingerprinted_cache(setup, tmp_path):
    """data.inputs: the first process packs under a lock; a second call reuses the directory."""
    from pyfast_tune.config import load_config
    from pyfast_tune.data import PackedDataset
    from pyfast_tune.trainer.data_cache import prepare_packed_dir

    jsonl = setup["packed"].parent / "chat.jsonl"
    args = ["--model", "m", "--data.inputs", f"[{jsonl}]", "--data.format", "openai"]
    args += ["--data.tokenizer", str(setup["tok"]), "--max_length", "256"]
    cfg = load_config(None, args)
    first = prepare_packed_dir(cfg.data, 256, None, tmp_path)
    mtime = (first / "meta.json").stat().st_mtime_ns
    again = prepare_packed_dir(cfg.data, 256, None, tmp_path)
    assert again == first and (first / "meta.json").stat().st_mtime_ns == mtime
    assert len(PackedDataset(first)) == len(PackedDataset(setup["packed"]))
    cfg.data.template = "internlm2_chat"  # another template: another cache entry
    assert prepare_packed_dir(cfg.data, 256, None, tmp_path) != first
    shutil.rmtree(tmp_path)


def test_training_refuses_a_corrupted_packed_directory(setup, tmp_path):
    """A flipped byte in the tokens is caught by the start-up hash check (data.verify, on by
    default), which names the file, before any model is built; an untouched copy passes."""
    data = tmp_path / "packed"
    shutil.copytree(setup["packed"], data)
    tokens = data / "input_ids.bin"
    raw = bytearray(tokens.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    tokens.write_bytes(bytes(raw))
    proc = train_process(setup["config"], tmp_path / "run", 1, "--data.path", str(data),
                         "--max_steps", "1", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "input_ids.bin" in proc.stderr and "CorruptDataError" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_verify_marker_is_per_node_and_per_file_state(setup, tmp_path):
    from pyfast_tune.data import CorruptDataError
    from pyfast_tune.trainer.data_cache import verify_packed_dir

    data = tmp_path / "packed"
    shutil.copytree(setup["packed"], data)
    cache = tmp_path / "cache"
    assert verify_packed_dir(data, cache) is True
    assert verify_packed_dir(data, cache) is False  # same files: the other ranks skip it
    index = data / "packs.bin"
    raw = bytearray(index.read_bytes())
    raw[0] ^= 0x80
    index.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="packs.bin"):
        verify_packed_dir(data, cache)


def test_train_py_run_as_a_script_trains(setup, tmp_path):
    """`deepspeed pyfast_tune/train.py` and `torchrun pyfast_tune/train.py` run the file as a
    script, with pyfast_tune/ first on sys.path (where kernels/ would shadow the `kernels`
    package bitsandbytes imports): it re-executes itself as the module and trains."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           str(ROOT / "pyfast_tune" / "train.py"), "--config", str(setup["config"]),
           "--output_dir", str(out), "--max_steps", "1", "--save_steps", "0"]  # fmt: skip
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1]
