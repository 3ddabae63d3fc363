"""Model set-up as XTuner/LLaMA-Factory do it: rope_scaling and max_position_embeddings in the
model's config, new special tokens with mean-initialised rows, lora.modules_to_save; and the
exports (convert, merge, a checkpoint's hf/ adapter) load in plain transformers/peft with the
logits of the trained model."""

import json
import os
import subprocess

import pytest
import torch

from pyfast_tune.config import ConfigError, load_config
from pyfast_tune.trainer.model_setup import (
    apply_to_config,
    extend_tokenizer,
    load_base,
    setup_vocab,
)
from tests.conftest import ROOT

NEW = ["<tool>", "</tool>"]


def _tiny_config(vocab=300, tied=False, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=tied, **kw)  # fmt: skip


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("spare_rows", [0, 5])
def test_new_rows_are_the_mean_of_the_base_rows(tiny_tokenizer, tmp_path, tied, spare_rows):
    """Input and output rows of the new ids = the mean of the base tokens' rows; every other
    row unchanged. With spare rows (a vocabulary padded past the tokenizer) the new tokens
    take those rows instead of growing the matrix."""
    from transformers import LlamaForCausalLM

    info = extend_tokenizer(tiny_tokenizer, NEW, tmp_path / "tok")
    base, total = info["base_tokens"], info["tokens"]
    assert total == base + 2 and info["ids"] == {"<tool>": base, "</tool>": base + 1}
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config(base + spare_rows, tied))
    before = [w.detach().clone() for w in (model.get_input_embeddings().weight,
                                           model.get_output_embeddings().weight)]  # fmt: skip
    setup_vocab(model, {"new_special_tokens": NEW, "base_tokens": base, "tokens": total})
    after = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    assert after[0].shape[0] == max(total, base + spare_rows) == model.config.vocab_size
    for old, new in zip(before, after):
        mean = old[:base].mean(0)
        torch.testing.assert_close(new[base:total], mean.expand(2, -1), rtol=0, atol=0)
        torch.testing.assert_close(new[:base], old[:base], rtol=0, atol=0)
        assert not torch.allclose(mean, old[0])  # the mean is not some existing row
    assert (after[0] is after[1]) == tied or torch.equal(after[0], after[1]) == tied


def test_rope_scaling_goes_into_the_model_and_unknown_types_name_the_accepted(tmp_path):
    from transformers import GPT2Config, LlamaForCausalLM

    plain, scaled = _tiny_config(), _tiny_config()
    apply_to_config(scaled, {"rope_scaling": {"type": "linear", "factor": 4.0},
                             "max_position_embeddings": 2048})  # fmt: skip
    assert scaled.max_position_embeddings == 2048
    torch.manual_seed(0)
    a = LlamaForCausalLM(plain).eval()
    b = LlamaForCausalLM(scaled).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.arange(1, 60)[None]
    position_ids = torch.arange(59)[None]
    with torch.no_grad():
        la = a(ids).logits
        lb = b(ids).logits
        # Linear scaling = positions divided by the factor (Chen et al. 2023, arXiv 2306.15595).
        lq = a(ids, position_ids=position_ids / 4.0).logits
    assert not torch.allclose(la, lb, atol=1e-4)
    torch.testing.assert_close(lb, lq, rtol=1e-5, atol=1e-5)

    with pytest.raises(
        ConfigError,
        match=r"type 'ntk' is not one LlamaConfig accepts: .*dynamic.*linear.*llama3.*yarn",
    ):
        apply_to_config(_tiny_config(), {"rope_scaling": {"type": "ntk", "factor": 2.0}})
    with pytest.raises(ConfigError, match="rejects it: .*low_freq_factor"):
        apply_to_config(_tiny_config(), {"rope_scaling": {"type": "llama3", "factor": 8.0}})
    with pytest.raises(ConfigError, match="gpt2 models have no rotary position embedding"):
        apply_to_config(GPT2Config(n_layer=1), {"rope_scaling": {"type": "linear", "factor": 2}})
    cfg = _tiny_config()
    apply_to_config(cfg, {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    assert cfg.rope_parameters["original_max_position_embeddings"] == 512  # the native length


def test_config_types_are_checked():
    base = ["--model", "m/", "--data", "packed/"]
    with pytest.raises(ConfigError, match="rope_scaling must be a mapping with a type"):
        load_config(None, [*base, "--rope_scaling", "{factor: 2}"])
    with pytest.raises(ConfigError, match="new_special_tokens lists a token twice"):
        load_config(None, [*base, "--new_special_tokens", "[a, a]"])
    with pytest.raises(ConfigError, match="modules_to_save applies to method lora or qlora"):
        load_config(None, [*base, "--method", "full", "--lora.modules_to_save", "[lm_head]"])
    cfg = load_config(
        None, [*base, "--new_special_tokens", "<x>", "--max_position_embeddings", "8192"]
    )
    assert cfg.new_special_tokens == ["<x>"] and cfg.max_position_embeddings == 8192


# --- a LoRA run with the whole set-up, and its exports ---------------------------------------

STEPS = 4


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_tokenizer, generated_chats):
    from pyfast_tune.launch import launch_command
    from pyfast_tune.trainer.tiny import make_tiny_llama, trimmed_conversations

    d = tmp_path_factory.mktemp("setup")
    chats = trimmed_conversations(generated_chats, d / "c0.jsonl", records=24, turns=2)
    with open(chats) as f, open(d / "c.jsonl", "w") as out:
        for line in f:  # every answer calls a tool: the new tokens are in the data
            rec = json.loads(line)
            rec["messages"][-1]["content"] = "<tool>look</tool> " + rec["messages"][-1]["content"]
            out.write(json.dumps(rec) + "\n")
    model = make_tiny_llama(d / "tiny", tiny_tokenizer, seed=0, init_std=0.1)  # tied embeddings
    config = d / "run.yaml"
    config.write_text(
        f"model: {model}\ndata: {{inputs: [{d / 'c.jsonl'}], format: openai, "
        f"tokenizer: {tiny_tokenizer}, cache_dir: {d / 'cache'}}}\nmax_length: 256\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        f"new_special_tokens: {json.dumps(NEW)}\n"
        "rope_scaling: {type: linear, factor: 2.0}\nmax_position_embeddings: 8192\n"
        f"max_steps: {STEPS}\nsave_steps: 1\nsave_total_limit: 2\nwarmup_ratio: 0.5\n"
        "lr: 3.0e-3\nlr_scheduler: constant\nglobal_batch_size: 1\n"
        "gradient_checkpointing: false\ntensorboard: false\nprogress_bar: false\n"
    )
    out = d / "run"
    cmd = launch_command(config, nproc=1, extra_args=["--output_dir", str(out)])
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYFAST_TUNE_CACHE=str(d / "pcache"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"out": out, "model": model, "dir": d}


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_run_keeps_the_newest_checkpoints_and_warms_up_by_ratio(lora_run):
    from pyfast_tune.trainer.metrics import read_metrics

    out = lora_run["out"]
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert steps == [f"step_{STEPS - 1:08d}", f"step_{STEPS:08d}"]
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl")]
    assert lrs == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3])  # ceil(0.5 * 4) = 2 warm-up steps


def test_setup_is_recorded_and_the_data_holds_the_new_tokens(lora_run):
    from pyfast_tune.data import PackedDataset

    ckpt = lora_run["out"] / "checkpoints" / f"step_{STEPS:08d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    setup = state["model_setup"]
    assert setup["tokens"] == setup["base_tokens"] + 2
    assert setup["modules_to_save"] == ["embed_tokens"]  # tied: the head follows it
    assert setup["rope_scaling"] == {"type": "linear", "factor": 2.0}
    ds = PackedDataset(state["packed_dir"])  # packed at start-up with the extended tokenizer
    ids = set(ds.sample(0)["input_ids"].tolist())
    assert {setup["base_tokens"], setup["base_tokens"] + 1} <= ids  # one id each, not pieces


@pytest.fixture(scope="module")
def reference(lora_run):
    """The trained model as training left it: the base with the run's set-up plus the
    checkpoint's hf/ adapter (saved by peft from the live model), and a prompt that uses the
    new tokens."""
    from peft import PeftModel

    hf = lora_run["out"] / "checkpoints" / f"step_{STEPS:08d}" / "hf"
    setup = json.loads((hf.parent / "trainer_state.json").read_text())["model_setup"]
    base = load_base(lora_run["model"], setup, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, hf).eval()
    ids = [5, 17, setup["base_tokens"], 40, setup["base_tokens"] + 1, 9] + list(range(60, 400, 7))
    return {"hf": hf, "setup": setup, "ids": ids, "logits": _logits(model, ids), "model": model}


def test_embeddings_trained_under_lora_are_saved_with_the_adapter(reference, lora_run):
    from safetensors.torch import load_file

    saved = load_file(reference["hf"] / "adapter_model.safetensors")
    names = [k for k in saved if "embed_tokens" in k]
    assert names, sorted(saved)[:5]
    emb = saved[names[0]]
    base_tokens = reference["setup"]["base_tokens"]
    assert emb.shape[0] == reference["setup"]["tokens"]
    # Trained: the new rows left their mean initialisation.
    mean = emb[:base_tokens].float().mean(0)
    assert float((emb[base_tokens].float() - mean).abs().max()) > 1e-4


def test_convert_and_merge_give_the_trained_logits_in_plain_transformers(
    reference, lora_run, tmp_path
):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pyfast_tune.export import convert, merge

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert convert(lora_run["out"], adapter)["kind"] == "adapter"
    info = json.loads((adapter / "pyfast_tune.json").read_text())
    assert info["model_setup"]["tokens"] == reference["setup"]["tokens"]
    tok = AutoTokenizer.from_pretrained(adapter)
    assert len(tok) == reference["setup"]["tokens"]
    assert tok.convert_tokens_to_ids("<tool>") == reference["setup"]["base_tokens"]

    # The converted adapter on the set-up base (what chat --adapter loads).
    conv = PeftModel.from_pretrained(
        load_base(lora_run["model"], info["model_setup"], dtype=torch.float32), adapter
    ).eval()
    torch.testing.assert_close(_logits(conv, reference["ids"]), reference["logits"],
                               rtol=1e-5, atol=1e-5)  # fmt: skip

    # merge -> a plain model folder: rope, length and vocabulary in its config.
    merge(lora_run["model"], adapter, merged, dtype="fp32")
    config = AutoConfig.from_pretrained(merged)
    assert config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["factor"] == 2.0
    assert config.max_position_embeddings == 8192
    assert config.vocab_size == reference["setup"]["tokens"]
    assert "model_setup" not in json.loads((merged / "pyfast_tune.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(plain, reference["ids"]), reference["logits"],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    assert len(AutoTokenizer.from_pretrained(merged)) == reference["setup"]["tokens"]


def test_adapter_loads_in_plain_peft_on_a_base_set_up_by_hand(reference, lora_run):
    """The recipe docs/evaluate-and-serve.md gives for the adapter alone: the run's rope in
    the config, embeddings grown to len(tokenizer) with the new rows at the mean."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    setup = reference["setup"]
    config = AutoConfig.from_pretrained(lora_run["model"])
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    config.max_position_embeddings = 8192
    base = AutoModelForCausalLM.from_pretrained(lora_run["model"], config=config,
                                                dtype=torch.float32)  # fmt: skip
    n = setup["base_tokens"]
    base.resize_token_embeddings(setup["tokens"], mean_resizing=False)
    with torch.no_grad():
        w = base.get_input_embeddings().weight
        w[n:] = w[:n].mean(0)
    model = PeftModel.from_pretrained(base, reference["hf"]).eval()
    torch.testing.assert_close(_logits(model, reference["ids"]), reference["logits"],
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_convert_builds_a_full_model_with_the_runs_setup(tiny_tokenizer, tmp_path):
    """convert of a full run builds the architecture with the run's rope and grown vocabulary
    (else the saved, resized weights would not fit it), and run_setup finds the set-up of a
    converted adapter and of a checkpoint's hf/ folder."""
    from pyfast_tune.export import RUN_FILE, _empty_model, run_setup
    from pyfast_tune.trainer.tiny import make_tiny_llama, tokenizer_vocab_size

    model_dir = make_tiny_llama(tmp_path / "tiny", tiny_tokenizer)
    n = tokenizer_vocab_size(tiny_tokenizer)
    setup = {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 9000,
             "new_special_tokens": NEW, "base_tokens": n, "tokens": n + 2}  # fmt: skip
    model = _empty_model(model_dir, None, False, setup)
    assert model.get_input_embeddings().weight.shape[0] == n + 2
    assert model.config.rope_parameters["rope_type"] == "dynamic"
    assert model.config.max_position_embeddings == 9000
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / RUN_FILE).write_text(json.dumps({"model_setup": setup}))
    assert run_setup(tmp_path / "adapter") == setup
    (tmp_path / "ckpt" / "hf").mkdir(parents=True)
    (tmp_path / "ckpt" / "trainer_state.json").write_text(json.dumps({"model_setup": setup}))
    assert run_setup(tmp_path / "ckpt" / "hf") == setup
    assert run_setup(model_dir) is None


def test_packed_dir_must_hold_the_new_tokens_at_the_models_ids(tiny_tokenizer, generated_chats,
                                                                tmp_path):  # fmt: skip
    """data.path was packed before training: packed with the plain tokenizer, '<tool>' in its
    text became pieces, so training refuses it; packed with the tokenizer prepare_tokenizer
    writes, it trains, and that tokenizer packs '<tool>' as one id."""
    from pyfast_tune.data import PackedDataset, pack
    from pyfast_tune.trainer.model_setup import prepare_tokenizer

    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "use <tool> now"},
                                            {"role": "assistant", "content": "ok </tool>"}]}) + "\n")  # fmt: skip
    pack([src], tmp_path / "plain", tokenizer=tiny_tokenizer, max_length=64, format="openai")
    cfg = load_config(None, ["--model", "m/", "--data", str(tmp_path / "plain"),
                             "--new_special_tokens", json.dumps(NEW)])  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"packed with .*'<tool>' is no token.*ids \[\d+, \d+\].*re-pack with --tokenizer",
    ):
        prepare_tokenizer(cfg, str(tiny_tokenizer), tmp_path / "cache")
    extended = next((tmp_path / "cache").glob("tokenizer-*"))
    pack([src], tmp_path / "ext", tokenizer=extended, max_length=64, format="openai")
    cfg = load_config(None, ["--model", "m/", "--data", str(tmp_path / "ext"),
                             "--new_special_tokens", json.dumps(NEW)])  # fmt: skip
    assert prepare_tokenizer(cfg, str(tiny_tokenizer), tmp_path / "cache") == str(extended)
    assert cfg.tokenizer == str(extended)
    ids = PackedDataset(tmp_path / "ext").sample(0)["input_ids"].tolist()
    info = json.loads((extended / "pyfast_tune_tokens.json").read_text())
    assert info["ids"]["<tool>"] in ids and info["ids"]["</tool>"] in ids


@pytest.fixture(scope="module")
def full_zero3_run(lora_run):
    """The same set-up, full fine-tune under ZeRO-3: the model is built partitioned
    (zero.Init), so the embeddings are grown and their new rows set while partitioned."""
    from pyfast_tune.launch import launch_command

    d = lora_run["dir"]
    out = d / "full"
    cmd = launch_command(d / "run.yaml", nproc=1, deepspeed="zero3",
                         extra_args=["--output_dir", str(out), "--method", "full",
                                     "--max_steps", "2", "--lr", "1e-3"])  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYFAST_TUNE_CACHE=str(d / "pcache"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def test_full_zero3_run_converts_to_a_plain_model_with_the_setup(
    full_zero3_run, lora_run, tmp_path
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pyfast_tune.export import convert

    ckpt = full_zero3_run / "checkpoints" / f"step_{2:08d}"
    setup = json.loads((ckpt / "trainer_state.json").read_text())["model_setup"]
    n, total = setup["base_tokens"], setup["tokens"]
    convert(full_zero3_run, tmp_path / "model", dtype="fp32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    live = AutoModelForCausalLM.from_pretrained(ckpt / "hf", dtype=torch.float32).eval()
    assert plain.config.vocab_size == total == live.config.vocab_size
    assert plain.config.rope_parameters["rope_type"] == "linear"
    ids = [5, 17, n, 40, n + 1, 9] + list(range(60, 400, 7))
    torch.testing.assert_close(_logits(plain, ids), _logits(live, ids), rtol=1e-5, atol=1e-5)
    # The new rows started at the mean of the base rows: after 2 steps at lr 1e-3 they are
    # still near it, far nearer than any base row is.
    base = load_file(lora_run["model"] / "model.safetensors")["model.embed_tokens.weight"]
    rows = plain.get_input_embeddings().weight.detach()
    mean = base[:n].mean(0)
    assert float((rows[n:total] - mean).abs().max()) < 0.01
    assert float((base[:n] - mean).abs().amax(1).min()) > 0.05
