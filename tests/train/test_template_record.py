"""The template a run trains with is the one its data was packed with, and that is what
checkpoints, `convert`, `merge` and `chat` record and use: a directory packed with
internlm2_chat, trained with a config that does not name a template, chats as internlm2_chat
(before, the config's default "default" was recorded). A config naming another template than
the packed directory's is an error naming both, before any model is built."""

import json
import os
import subprocess

import pytest

from pyfast_tune.cli import main as cli
from pyfast_tune.config import load_config
from pyfast_tune.export import run_template
from pyfast_tune.launch import launch_command
from pyfast_tune.train import packed_template
from tests.conftest import ROOT

TEMPLATE = "internlm2_chat"


def test_packed_template_is_used_and_a_different_config_is_refused():
    meta = {"template": TEMPLATE}
    assert packed_template(None, meta, "p/") == TEMPLATE
    assert packed_template(TEMPLATE, meta, "p/") == TEMPLATE
    with pytest.raises(ValueError, match=r"data.template is 'default' but p/ was packed with "
                       r"template 'internlm2_chat'"):  # fmt: skip
        packed_template("default", meta, "p/")
    with pytest.raises(ValueError, match="records no template"):
        packed_template(None, {}, "p/")


def test_config_template_is_unset_unless_packing_on_the_fly():
    assert load_config(None, ["--model", "m", "--data", "packed/"]).data.template is None
    cfg = load_config(None, ["--model", "m", "--data.inputs", "a.jsonl", "--data.tokenizer", "t"])
    assert cfg.data.template == "default"  # what `pack` uses
    cfg = load_config(None, ["--model", "m", "--data", "p/", "--data.template", "qwen_chat"])
    assert cfg.data.template == "qwen_chat"


def test_checkpoints_from_before_the_record_read_the_packed_dir(tmp_path):
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "meta.json").write_text(json.dumps({"template": TEMPLATE}))
    ckpt = tmp_path / "step"
    ckpt.mkdir()
    old = {"packed_dir": str(packed), "config": {"data": {"template": "default"}}}
    (ckpt / "trainer_state.json").write_text(json.dumps(old))
    assert run_template(ckpt) == TEMPLATE
    (packed / "meta.json").unlink()  # gone: the config is all there is
    assert run_template(ckpt) == "default"
    (ckpt / "trainer_state.json").write_text(json.dumps({**old, "template": "qwen_chat"}))
    assert run_template(ckpt) == "qwen_chat"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, generated_chats):
    from pyfast_tune.trainer.tiny import make_tiny_llama, trimmed_conversations

    d = tmp_path_factory.mktemp("tmpl")
    jsonl = trimmed_conversations(generated_chats, d / "c.jsonl", records=24, turns=2)
    assert cli(["pack", str(jsonl), "--out", str(d / "packed"), "--tokenizer", str(tiny_tokenizer),
                "--max-length", "256", "--format", "openai", "--template", TEMPLATE,
                "--quiet"]) == 0  # fmt: skip
    model = make_tiny_llama(d / "tiny", tiny_tokenizer, seed=0, init_std=0.1)
    config = d / "run.yaml"
    config.write_text(  # no data.template: the packed directory's applies
        f"model: {model}\ndata: {d / 'packed'}\nmax_length: 256\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\nmax_steps: 1\nlr: 1.0e-3\n"
        "gradient_checkpointing: false\ntensorboard: false\nprogress_bar: false\n"
    )
    return {"dir": d, "config": config, "model": model}


def _train(setup, out, *args):
    cmd = launch_command(setup["config"], nproc=1, extra_args=["--output_dir", str(out), *args])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_train_convert_merge_chat_keep_the_packed_template(setup, tmp_path):
    from pyfast_tune.chat import ChatSession, default_template

    out = tmp_path / "run"
    proc = _train(setup, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ckpt = out / "checkpoints" / "step_00000001"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["template"] == TEMPLATE
    assert state["config"]["data"]["template"] == TEMPLATE
    assert default_template(ckpt / "hf") == TEMPLATE  # chat on a checkpoint's hf/ folder

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert cli(["convert", str(out), str(adapter)]) == 0
    assert cli(["merge", str(setup["model"]), str(adapter), str(merged)]) == 0
    for d in (adapter, merged):
        assert json.loads((d / "pyfast_tune.json").read_text())["template"] == TEMPLATE
    assert ChatSession(merged).template == TEMPLATE
    assert ChatSession(setup["model"], adapter=adapter).template == TEMPLATE
    assert cli(["chat", str(merged), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0


def test_a_config_naming_another_template_is_refused_naming_both(setup, tmp_path):
    proc = _train(setup, tmp_path / "bad", "--data.template", "default")
    assert proc.returncode != 0
    assert "data.template is 'default'" in proc.stderr
    assert f"was packed with template '{TEMPLATE}'" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
