"""Evaluation during training (``eval`` config section, pyfast_tune.trainer.evaluate).

Generated chats packed by the engine with a tokenizer trained on them and a tiny Llama, so it
runs on any clone. Unit tests check the held-out split and the eval loss against a direct
computation; end-to-end runs (one process, through the launcher) check the schedule, resume,
the logged loss against the saved checkpoint and the answers against a plain greedy decode; a
2-process ZeRO-3 run must give the 1-process eval loss and answers.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyfast_tune.trainer.batches import IGNORE
from tests.conftest import sgd_deepspeed_json, tiny_training, train_process

STEPS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, generated_chats):
    from pyfast_tune.data import pack
    from pyfast_tune.trainer.tiny import trimmed_conversations

    d = tmp_path_factory.mktemp("eval")
    run = tiny_training(d, tiny_tokenizer, generated_chats, records=120, turns=4)
    # A separate eval set: other conversations of the same generated world.
    other = trimmed_conversations(generated_chats, d / "all.jsonl", records=140, turns=4)
    lines = other.read_text().splitlines()[120:]
    (d / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    pack([d / "heldout.jsonl"], d / "eval_packed", tokenizer=tiny_tokenizer, max_length=256,
         format="openai", template="default")  # fmt: skip
    return {**run, "eval_packed": d / "eval_packed"}


def _samples(view) -> Counter:
    """Every sample of a pack-indexable set, as (input ids, labels) tuples, with multiplicity."""
    out = Counter()
    for i in range(len(view)):
        p = view[i]
        cu = p["cu_seqlens"]
        assert p["position_ids"].tolist() == [t - a for a, b in zip(cu[:-1], cu[1:])
                                               for t in range(a, b)]  # fmt: skip
        for a, b in zip(cu[:-1], cu[1:]):
            out[(tuple(p["input_ids"][a:b]), tuple(p["labels"][a:b]))] += 1
    return out


def _sample_tuple(ds, j) -> tuple:
    s = ds.sample(j)
    return (tuple(s["input_ids"]), tuple(s["labels"]))


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,match",
    [
        (["--eval.split", "1.0"], r"eval.split must be in \[0, 1\)"),
        (["--eval.split", "-0.1"], r"eval.split must be in \[0, 1\)"),
        (["--eval.split", "[0.1]"], "eval.split must be a number"),
        (["--eval.split", "0.1", "--eval.data", "x/"], "set one of eval.data"),
        (["--eval.steps", "-1"], "eval.steps must be an integer >= 0"),
        (["--eval.steps", "2"], "nothing to evaluate"),
        (["--eval.at_start", "true"], "nothing to evaluate"),
        (["--eval.at_start", "yes please"], "eval.at_start must be true or false"),
        (["--eval.prompts", "[hi, '']"], "eval.prompts must be a list of non-empty strings"),
        (["--eval.max_new_tokens", "0"], "eval.max_new_tokens must be an integer >= 1"),
        (["--eval.system", "[a]"], "eval.system must be a string"),
        (["--eval.step", "2"], r"unknown config key\(s\) eval.step; known: eval.data, eval.split"),
        (["--eval", "x/"], "config key eval must be a mapping"),
    ],
)
def test_eval_config_errors_say_what_is_allowed(args, match):
    from pyfast_tune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["--model", "m/", "--data", "p/", *args])


def test_eval_config_values():
    from pyfast_tune.config import load_config

    cfg = load_config(None, ["--model", "m/", "--data", "p/", "--eval.split", "0.05",
                             "--eval.steps", "10", "--eval.prompts", "What is 2+2?"])  # fmt: skip
    assert (cfg.eval.split, cfg.eval.steps, cfg.eval.prompts) == (0.05, 10, ["What is 2+2?"])
    assert load_config(None, ["--model", "m/", "--data", "p/"]).eval.data is None


# --- held-out split -----------------------------------------------------------------------


def test_split_holds_out_records_by_their_source_not_by_packing(setup, tmp_path):
    from pyfast_tune.data import PackedDataset, pack
    from pyfast_tune.trainer.evaluate import SamplePacks, TrainingPacks, held_out_samples

    ds = PackedDataset(setup["packed"])
    held = held_out_samples(ds, 0.1, seed=0)
    assert len(held) == round(0.1 * ds.num_samples) and len(set(held.tolist())) == len(held)
    assert held.tolist() == held_out_samples(ds, 0.1, seed=0).tolist()  # deterministic
    sources = {ds.sample(int(j))["source"] for j in held}
    assert sources != {ds.sample(int(j))["source"] for j in held_out_samples(ds, 0.1, seed=1)}
    # The same records are held out whatever the packing and wherever the file lies: a copy
    # elsewhere packed at another max_length (other packs, other sample order) holds out the
    # same record indices.
    moved = tmp_path / "elsewhere" / "chat.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(setup["jsonl"].read_bytes())
    pack([moved], tmp_path / "p512", tokenizer=setup["tok"], max_length=512, format="openai",
         template="default")  # fmt: skip
    other = PackedDataset(tmp_path / "p512")
    assert len(other) < len(ds) and other.files != ds.files
    records = {other.sample(int(j))["source"][1] for j in held_out_samples(other, 0.1, 0)}
    assert records == {record for _, record in sources}
    # A larger fraction holds out a superset (the smallest keys first).
    assert set(held.tolist()) <= set(held_out_samples(ds, 0.3, seed=0).tolist())

    train = TrainingPacks(ds, held)
    evals = SamplePacks(ds, held, max_length=256)
    kept = [j for j in range(ds.num_samples) if j not in set(held.tolist())]
    assert _samples(train) == Counter(_sample_tuple(ds, j) for j in kept)
    assert _samples(evals) == Counter(_sample_tuple(ds, int(j)) for j in held)
    assert all(len(evals[i]["input_ids"]) <= 256 for i in range(len(evals)))
    # Packs not touched by the split are the packed directory's, byte for byte.
    assert train.num_samples == len(kept) and len(train) <= len(ds)
    assert train.pack_lengths.tolist() == [len(train[i]["input_ids"]) for i in range(len(train))]
    untouched = [i for i in range(len(train)) if not train.touched[train.packs[i]]]
    assert untouched and all(
        np.array_equal(train[i]["input_ids"], ds[int(train.packs[i])]["input_ids"])
        for i in untouched
    )
    assert train.meta["fingerprint"] != ds.meta["fingerprint"]
    assert train.meta["packed_fingerprint"] == ds.meta["fingerprint"]


def test_split_must_leave_samples_on_both_sides(setup):
    from pyfast_tune.data import PackedDataset
    from pyfast_tune.trainer.evaluate import held_out_samples

    ds = PackedDataset(setup["packed"])
    with pytest.raises(ValueError, match="holds out 0"):
        held_out_samples(ds, 0.1 / ds.num_samples, seed=0)


def test_eval_data_must_share_the_training_tokenizer(setup, tmp_path, tiny_tokenizer_bos):
    from pyfast_tune.config import load_config
    from pyfast_tune.data import PackedDataset, pack
    from pyfast_tune.trainer.evaluate import split_data

    pack([setup["jsonl"]], tmp_path / "bos", tokenizer=tiny_tokenizer_bos, max_length=256,
         format="openai", template="default")  # fmt: skip
    cfg = load_config(None, ["--model", "m/", "--data", str(setup["packed"]),
                             "--eval.data", str(tmp_path / "bos")])  # fmt: skip
    with pytest.raises(ValueError, match="packed with another tokenizer"):
        split_data(cfg, PackedDataset(setup["packed"]))


def test_eval_data_is_hash_checked_like_the_training_data(setup, tmp_path):
    import shutil

    from pyfast_tune.config import load_config
    from pyfast_tune.data import CorruptDataError, PackedDataset
    from pyfast_tune.trainer.evaluate import split_data

    bad = tmp_path / "eval"
    shutil.copytree(setup["eval_packed"], bad)
    ids = bytearray((bad / "input_ids.bin").read_bytes())
    ids[8] ^= 1  # one token id changed, the size kept
    (bad / "input_ids.bin").write_bytes(bytes(ids))
    cfg = load_config(None, ["--model", "m/", "--data", str(setup["packed"]),
                             "--eval.data", str(bad)])  # fmt: skip
    train = PackedDataset(setup["packed"])
    with pytest.raises(CorruptDataError, match="input_ids.bin"):
        split_data(cfg, train, tmp_path / "cache")
    cfg.data.verify = False  # as for the training data, verify: false skips the check
    assert len(split_data(cfg, train, tmp_path / "cache")[1]) == len(PackedDataset(bad))


# --- loggers ------------------------------------------------------------------------------

EVAL_RECORD = {"step": 4, "loss": 1.5, "trained_tokens": 120, "samples": 6, "seconds": 0.2,
               "answers": [{"prompt": "Hi?", "answer": "Hello."}]}  # fmt: skip


def test_eval_records_reach_every_logger_and_resume_cuts_them(tmp_path, monkeypatch):
    import sys
    import types

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pyfast_tune.trainer.metrics import MetricsLog

    calls = []
    wandb = types.ModuleType("wandb")

    class Run:
        summary: dict = {}

        def log(self, data, step):
            calls.append(("wandb", data, step))

        def finish(self):
            pass

    wandb.init = lambda **kw: Run()
    wandb.Table = lambda columns, data: ("table", columns, data)
    mlflow = types.ModuleType("mlflow")
    for fn in ("set_tracking_uri", "set_experiment", "start_run", "log_params", "set_tags",
               "log_metrics", "log_text", "end_run"):  # fmt: skip
        setattr(mlflow, fn, lambda *a, _fn=fn, **kw: calls.append((_fn, a, kw)))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    log = MetricsLog(tmp_path, 0, ["tensorboard", "wandb", "mlflow"])
    log.log_eval(EVAL_RECORD)
    log.log_eval({**EVAL_RECORD, "step": 8, "loss": 1.25})
    log.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(4, 1.5), (8, 1.25)]
    text = events.Tensors("eval/answers/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**Q:** Hi?" in text and "**A:** Hello." in text
    logged = [c for c in calls if c[0] == "wandb"]
    assert logged[0][1]["eval/loss"] == 1.5 and logged[0][2] == 4
    assert logged[0][1]["eval/answers"] == ("table", ["prompt", "answer"], [["Hi?", "Hello."]])
    metrics = [c for c in calls if c[0] == "log_metrics"]
    assert metrics[0][1][0]["eval_loss"] == 1.5 and metrics[0][2]["step"] == 4
    texts = [c for c in calls if c[0] == "log_text"]
    assert texts[0][1][1] == "eval/answers_step_00000004.md" and "Hello." in texts[0][1][0]
    assert [e["step"] for e in _evals(tmp_path)] == [4, 8]
    # Resuming from step 6 drops the records of steps after it: they are about to be redone.
    MetricsLog(tmp_path, 6, []).close()
    assert [e["step"] for e in _evals(tmp_path)] == [4]


# --- eval loss ----------------------------------------------------------------------------


def _direct_loss(model, eval_set, reduction="token") -> float:
    """Mean over trained tokens (or of per-sample means) of each sample run alone through the
    model's stock attention with transformers' own label shift."""
    sums, counts = [], []
    with torch.no_grad():
        for i in range(len(eval_set)):
            p = eval_set[i]
            cu = p["cu_seqlens"]
            for a, b in zip(cu[:-1], cu[1:]):
                ids = torch.from_numpy(p["input_ids"][a:b])[None]
                labels = torch.from_numpy(p["labels"][a:b])
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
                ce = F.cross_entropy(logits.double(), labels[1:], ignore_index=IGNORE,
                                     reduction="sum")  # fmt: skip
                sums.append(float(ce))
                counts.append(int((labels[1:] != IGNORE).sum()))
    if reduction == "token":
        return sum(sums) / sum(counts)
    return float(np.mean([s / c for s, c in zip(sums, counts) if c]))


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_eval_loss_is_the_mean_over_trained_tokens_on_any_number_of_ranks(setup, reduction):
    from transformers import AutoModelForCausalLM

    from pyfast_tune import patch
    from pyfast_tune.data import PackedDataset
    from pyfast_tune.trainer.batches import global_normalizer
    from pyfast_tune.trainer.evaluate import eval_loss
    from pyfast_tune.trainer.step import batch_loss

    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    eval_set = PackedDataset(setup["eval_packed"])
    assert len(eval_set) >= 3
    expected = _direct_loss(model, eval_set, reduction)
    patch.apply(model, lora=False, attention_backend="ref")
    try:
        norm = global_normalizer(eval_set, range(len(eval_set)), reduction)

        def loss_of(batch):
            return batch_loss(model, batch, "cpu", fused=True)

        one = eval_loss(loss_of, eval_set, norm, 0, 1, 1, reduction)
        # Three ranks, two packs per micro batch: the shares (with a zero-weight filler row on
        # the ranks past the end) sum to the same loss, every token counted once.
        shares = [eval_loss(loss_of, eval_set, norm, r, 3, 2, reduction) for r in range(3)]
    finally:
        patch.revert(model)
    trained = sum(
        int((np.asarray(eval_set[i]["labels"])[1:] != IGNORE).sum()) for i in range(len(eval_set))
    )
    assert one[0].item() == pytest.approx(expected, rel=1e-5)
    assert sum(s[0].item() for s in shares) == pytest.approx(expected, rel=1e-5)
    assert one[1].item() == sum(s[1].item() for s in shares) <= trained
    assert one[2].item() == sum(s[2].item() for s in shares) == eval_set.num_samples


def test_prompts_are_answered_greedily_in_the_training_template_with_a_system(setup):
    """In process, on a model patched with our (cache-less) attention: the answers equal a
    plain greedy decode of the prompt the training encoder builds with the system text, and
    the model's attention and modes are restored afterwards."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from pyfast_tune import patch
    from pyfast_tune.config import load_config
    from pyfast_tune.data import ChatEncoder
    from pyfast_tune.trainer.evaluate import Evaluator

    system = "You answer in one sentence."
    cfg = load_config(None, ["--model", "m/", "--data", "p/", "--eval.prompts",
                             json.dumps(PROMPTS), "--eval.system", system,
                             "--eval.max_new_tokens", "10"])  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    patch.apply(model, lora=False, attention_backend="ref")
    model.train()
    ours = model.config._attn_implementation
    lines = []
    evaluator = Evaluator(cfg, None, model, template="default", tokenizer=str(setup["tok"]),
                          rank=0, world=1, zero_stage=0, device="cpu",
                          write=lines.append)  # fmt: skip
    assert evaluator.due(3, 5) is False and evaluator.due(5, 5) is True  # steps 0: at the end
    record = evaluator.evaluate(5)
    assert model.training and model.config._attn_implementation == ours
    tok = Tokenizer.from_file(str(setup["tok"] / "tokenizer.json"))
    encoder = ChatEncoder(setup["tok"], "default", system)
    ref = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    eos = {tok.token_to_id("<|im_end|>")}
    assert [qa["prompt"] for qa in record["answers"]] == PROMPTS
    for qa in record["answers"]:
        ids = list(encoder.encode([(qa["prompt"], None)])[0])
        assert tok.decode(ids).startswith("<|System|>:You answer in one sentence.\n")
        assert qa["answer"] == tok.decode(_greedy(ref, ids, eos, 10), skip_special_tokens=False)
    assert lines and lines[0].startswith("eval step 5:") and f"  Q: {PROMPTS[0]}" in lines[0]


# --- training runs ------------------------------------------------------------------------


def _config(setup, path: Path, eval_section: str, **keys) -> Path:
    """A LoRA run on the packed chats with ``eval_section`` (YAML) and top-level ``keys``."""
    values = {"model": setup["model"], "data": setup["packed"], "max_length": 256,
              "method": "lora", "lora": "{r: 8, alpha: 16, dropout: 0.1}", "max_steps": STEPS,
              "lr": "1.0e-2", "warmup_steps": 1, "global_batch_size": 4, "save_steps": 3,
              "progress_bar": "false", "report_to": "tensorboard", **keys}  # fmt: skip
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()) + eval_section)
    return path


def _evals(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines() if x.strip()]


PROMPTS = ["Tell me about the moon.", "What do you know?", "Where is the river?"]
SPLIT_EVAL = (
    "eval:\n  split: 0.1\n  steps: 2\n  at_start: true\n  max_new_tokens: 12\n"
    f"  prompts: {json.dumps(PROMPTS)}\n"
)


@pytest.fixture(scope="module")
def split_run(setup, tmp_path_factory):
    d = tmp_path_factory.mktemp("split_run")
    config = _config(setup, d / "run.yaml", SPLIT_EVAL)
    out = d / "run"
    return config, out, train_process(config, out)


def _greedy(model, prompt_ids: list[int], stop: set[int], max_new: int) -> list[int]:
    """Argmax decoding by full forwards (no KV cache): the plainest greedy decode."""
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(
                model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()
            )
            if token in stop:
                break
            out.append(token)
            ids.append(token)
    return out


def test_eval_runs_on_schedule_with_the_training_loss_and_greedy_answers(setup, split_run):
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from pyfast_tune.data import ChatEncoder, PackedDataset
    from pyfast_tune.trainer.batches import PackOrder
    from pyfast_tune.trainer.evaluate import SamplePacks, TrainingPacks, held_out_samples
    from pyfast_tune.trainer.metrics import read_metrics

    _, out, proc = split_run
    evals = _evals(out)
    assert [e["step"] for e in evals] == [0, 2, 4, 5]  # before training, every 2, the last
    assert "eval step 2: loss " in proc.stdout and "  Q: Tell me about the moon." in proc.stdout
    # Training saw exactly the training packs, step by step: each step's token count is that of
    # the packs the order gives it over the split's training packs (the held-out ones are gone).
    ds = PackedDataset(setup["packed"])
    held = held_out_samples(ds, 0.1, seed=0)
    train, eval_set = TrainingPacks(ds, held), SamplePacks(ds, held, 256)
    order = PackOrder(len(train), 4, 0)
    metrics = read_metrics(out / "metrics.jsonl")
    for m in metrics:
        packs = order.global_batch(m["step"] - 1)
        assert m["tokens"] == sum(len(train[int(i)]["input_ids"]) for i in packs)
    # The logged eval loss is the mean trained-token loss of the held-out samples under the
    # checkpoint of that step.
    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    # Step 0 is the untrained model.
    assert evals[0]["loss"] == pytest.approx(_direct_loss(base, eval_set), rel=1e-5)
    tuned = PeftModel.from_pretrained(base, out / "checkpoints" / "step_00000005" / "hf").eval()
    last = evals[-1]
    assert last["loss"] == pytest.approx(_direct_loss(tuned, eval_set), rel=1e-5)
    assert last["samples"] == len(held) and evals[0]["loss"] > evals[1]["loss"] > last["loss"]
    # The answers are the plain greedy decode of the training template's prompt.
    tok = Tokenizer.from_file(str(setup["tok"] / "tokenizer.json"))
    encoder = ChatEncoder(setup["tok"], "default", None)
    eos = {tok.token_to_id("<|im_end|>")}
    assert [qa["prompt"] for qa in last["answers"]] == PROMPTS
    for qa in last["answers"]:
        ids = list(encoder.encode([(qa["prompt"], None)])[0])
        expected = tok.decode(_greedy(tuned, ids, eos, 12), skip_special_tokens=False)
        assert qa["answer"] == expected
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_keeps_the_eval_schedule(setup, split_run, tmp_path):
    config, full_out, _ = split_run
    out = tmp_path / "run"
    train_process(config, out, 1, "--stop_after_steps", "3")
    assert [e["step"] for e in _evals(out)] == [0, 2]
    train_process(config, out, 1, "--resume", "true")
    resumed, full = _evals(out), _evals(full_out)
    assert [e["step"] for e in resumed] == [0, 2, 4, 5]  # no second evaluation at the start
    for a, b in zip(resumed, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["answers"] == b["answers"]


def test_resume_refuses_another_split(setup, split_run, tmp_path):
    """The training packs depend on the split: a checkpoint of one split does not resume
    on another (its data fingerprint names the held-out samples)."""
    import shutil

    config, full_out, _ = split_run
    out = tmp_path / "run"
    shutil.copytree(full_out / "checkpoints", out / "checkpoints")
    proc = train_process(config, out, 1, "--resume", "true", "--eval.split", "0.2", check=False)
    assert proc.returncode != 0 and "trained on different data" in proc.stderr


def _zero3(setup) -> dict:
    """A 2-step ZeRO-3 full fine-tune with plain SGD: runs on 1 and 2 processes round their
    sums differently, and only after SGD steps (not Adam's) are the weights, and so the
    greedy answers compared below, the same on any CPU (conftest.sgd_deepspeed_json)."""
    ds = sgd_deepspeed_json(setup["dir"], "zero3")
    return {"max_steps": 2, "save_steps": 0, "save_hf": "false", "deepspeed": ds,
            "method": "full", "lr": "0.5"}  # fmt: skip


@pytest.fixture(scope="module")
def zero3_one_process(setup, tmp_path_factory):
    """A 2-step ZeRO-3 full fine-tune on 1 process evaluating eval.data and the prompts after
    each step: (config, its eval records)."""
    d = tmp_path_factory.mktemp("zero3")
    section = (f"eval:\n  data: {setup['eval_packed']}\n  steps: 1\n  max_new_tokens: 8\n"
               f"  prompts: {json.dumps(PROMPTS)}\n")  # fmt: skip
    config = _config(setup, d / "run.yaml", section, **_zero3(setup))
    return config, _evals(_train_out(config, d / "one", 1))


def _assert_same_evals(got: list[dict], want: list[dict]) -> None:
    assert [e["step"] for e in got] == [e["step"] for e in want] == [1, 2]
    for a, b in zip(want, got):
        assert len(a["answers"]) == len(PROMPTS) and a["trained_tokens"] > 0
        assert (b["trained_tokens"], b["samples"]) == (a["trained_tokens"], a["samples"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["answers"] == a["answers"]


@pytest.mark.slow  # the default run checks the eval loss on any number of ranks in-process
def test_zero3_two_processes_give_the_eval_of_one(zero3_one_process, tmp_path):
    """ZeRO-3 partitions the parameters: the eval loss (rows dealt over 2 ranks, the one past
    the end running a zero-weight filler) and the greedy answers (every rank decoding in
    lockstep, or a gather would hang) equal those of one process."""
    config, one = zero3_one_process
    _assert_same_evals(_evals(_train_out(config, tmp_path / "two", 2)), one)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sp2", "zero2"])
def test_two_processes_evaluate_like_one(setup, zero3_one_process, tmp_path, how):
    """Each row split over a sequence-parallel group of 2 (ZeRO-3); ZeRO-2, where every
    process holds the model and answers its share of the prompts: the eval of 1 process.
    (ZeRO-2 with plain SGD as the ZeRO-3 run has: the bare ``zero2`` preset's AdamW would
    train other weights.)"""
    config, one = zero3_one_process
    if how == "sp2":
        args = ("--sequence_parallel_size", "2")
    else:
        args = ("--deepspeed", str(sgd_deepspeed_json(setup["dir"], "zero2")))
    _assert_same_evals(_evals(_train_out(config, tmp_path / "run", 2, *args)), one)


@pytest.mark.slow
def test_evaluating_changes_no_training_loss(setup, zero3_one_process, tmp_path):
    """Modes are restored and no RNG is drawn from training's stream: the same losses."""
    from pyfast_tune.trainer.metrics import read_metrics

    config, _ = zero3_one_process
    plain = _config(setup, tmp_path / "plain.yaml", "", **_zero3(setup))
    with_eval = read_metrics(_train_out(config, tmp_path / "eval", 2) / "metrics.jsonl")
    without = read_metrics(_train_out(plain, tmp_path / "plain", 2) / "metrics.jsonl")
    assert [m["loss"] for m in with_eval] == [m["loss"] for m in without]


def _train_out(config: Path, out: Path, nproc: int, *args: str) -> Path:
    train_process(config, out, nproc, *args)
    return out
