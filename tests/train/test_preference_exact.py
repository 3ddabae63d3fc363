"""Preference objectives on packed pairs equal TRL 1.16's on the same pairs, padded.

The same tiny Llama weights (fp32, CPU) see the same pairs twice: as one packed row (our
varlen attention, per-segment log-probabilities from the fused head, pairs from pairs.bin)
and as TRL's padded batch ([chosen..., rejected...], completion mask = our loss mask). The
loss and every parameter's gradient must agree within 1e-5 relative. The reference model
differs from the policy (another seed), so the DPO loss is not log 2 and its gradient is not
the one of the untrained case. The tokenizer's id 0 ("<|endoftext|>", as Qwen's "!") sits in
every chosen completion: it must count in the log-probabilities.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("trl", reason="the exactness tests compare with TRL (the dev extra)")

from pyfast_tune import patch  # noqa: E402
from pyfast_tune.config import PreferenceConfig  # noqa: E402
from pyfast_tune.data import PackedDataset, pack  # noqa: E402
from pyfast_tune.trainer.batches import collate  # noqa: E402
from pyfast_tune.trainer.preference import (  # noqa: E402
    Reference,
    compute_table,
    global_pairs,
    pair_layout,
    row_loss,
    score_positions,
)

PACKS = 5  # packs in the compared row: several pairs, from several packs


def _pairs_jsonl(path, records: int = 16):
    """Pairs whose chosen completion holds id 0 of the tiny tokenizer."""
    rows = []
    for i in range(records):
        q = f"what does the cat {['see', 'eat', 'paint', 'count'][i % 4]} on day {i}"
        chosen = f"the cat sees {i % 7} red apples<|endoftext|> and sleeps"
        rejected = " ".join(["boats"] * (1 + i % 5)) + " near the sea"
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_setup(tmp_path_factory, tiny_tokenizer):
    from pyfast_tune.trainer.tiny import make_tiny_llama

    d = tmp_path_factory.mktemp("pref_exact")
    pack([_pairs_jsonl(d / "pairs.jsonl")], d / "packed", tokenizer=tiny_tokenizer,
         max_length=96, format="preference", template="default")  # fmt: skip
    policy = make_tiny_llama(d / "policy", tiny_tokenizer, seed=0, init_std=0.1)
    reference = make_tiny_llama(d / "reference", tiny_tokenizer, seed=1, init_std=0.1)
    ds = PackedDataset(d / "packed")
    ids = list(range(PACKS))
    batch = collate([ds[i] for i in ids], "token", 1)
    assert (batch.input_ids[batch.targets != -100] == 0).any(), "id 0 is never trained"
    return SimpleNamespace(dir=d, ds=ds, ids=ids, batch=batch, policy=policy,
                           reference=reference, tok=tiny_tokenizer)  # fmt: skip


def _load(path, seq_cls: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if seq_cls:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                   dtype=torch.float32)  # fmt: skip
        model.config.pad_token_id = 1  # an id no sample ends with
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def _ours(model):
    """The same weights with our varlen attention (exact per-segment SDPA)."""
    ours = copy.deepcopy(model)
    patch.apply(ours, lora=False, attention=True, attention_backend="ref")
    return ours


def _padded(batch, seq_cls: bool = False) -> dict:
    """TRL's padded batch of ``batch``'s pairs: chosen rows, then rejected rows."""
    chosen, rejected = pair_layout(batch.pairs)
    cu = batch.cu_seqlens
    mask = np.concatenate([[0], (batch.targets[:-1] != -100)])  # loss mask (unshifted)
    seqs = [(batch.input_ids[cu[k] : cu[k + 1]], mask[cu[k] : cu[k + 1]])
            for k in list(chosen) + list(rejected)]  # fmt: skip
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), 1, dtype=torch.long)  # pad 1: masked out
    att = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for r, (s, m) in enumerate(seqs):
        ids[r, : len(s)] = torch.from_numpy(s)
        att[r, : len(s)] = 1
        comp[r, : len(s)] = torch.from_numpy(m.astype(np.int64))
    if seq_cls:
        return {"input_ids": ids, "attention_mask": att}
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp}


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}  # fmt: skip


def _assert_same(loss, expected, grads, expected_grads):
    torch.testing.assert_close(loss.detach(), expected.detach().to(loss.dtype), rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        g, e = grads[name], expected_grads[name]
        scale = e.abs().max().clamp(min=1e-12)
        assert float((g - e).abs().max() / scale) < 1e-5, name


def _cfg(objective, **pref):
    return SimpleNamespace(
        objective=objective, preference=PreferenceConfig(**pref), fused_loss=True
    )


def _dpo_trainer(policy, ref_model, tok, tmp, **args):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tok)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(1)
    config = DPOConfig(output_dir=str(tmp), report_to=[], use_cpu=True, bf16=False,
                       gradient_checkpointing=False, **args)  # fmt: skip
    data = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    return DPOTrainer(model=policy, ref_model=ref_model, args=config, train_dataset=data,
                      processing_class=tokenizer)  # fmt: skip


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_equals_trl(pairs_setup, loss_type, tmp_path):
    s = pairs_setup
    cfg = _cfg("dpo", beta=0.1, loss_type=loss_type)
    policy, ref_model = _load(s.policy), _load(s.reference)
    # Ours: the reference precomputed (a table over every sample of the pack), the policy packed.
    table = compute_table(_ours(ref_model), s.ds, "cpu", cfg,
                          SimpleNamespace(data_world=1, data_rank=0, sequence=None))  # fmt: skip
    ours = _ours(policy)
    norm = global_pairs(s.ds, s.ids)
    assert norm.pairs == len(pair_layout(s.batch.pairs)[0]) >= 4
    loss, reported, figures = row_loss(ours, s.batch, "cpu", cfg, norm, Reference(table))
    loss.backward()
    assert abs(float(loss) - np.log(2)) > 1e-3  # the policy is not the reference
    # TRL: the same weights, padded.
    trainer = _dpo_trainer(policy, ref_model, s.tok, tmp_path, beta=0.1, loss_type=[loss_type])
    trainer.model.train()
    expected = trainer._compute_loss(trainer.model, _padded(s.batch), False)
    expected.backward()
    _assert_same(loss, expected, _grads(ours), _grads(trainer.model))
    # TRL's metrics, from the same pairs.
    m = trainer._metrics["train"]
    for k, name in enumerate(("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                              "rewards/margins", "logps/chosen", "logps/rejected"), start=1):  # fmt: skip
        assert figures[k] / figures[0] == pytest.approx(m[name][-1], rel=1e-5, abs=1e-6), name


def test_dpo_lora_reference_is_the_base(pairs_setup, tmp_path):
    """With LoRA, reference: policy = the adapters disabled, each step; TRL does the same with
    a peft model and no ref_model. The adapters' B is random, so policy != reference."""
    from peft import get_peft_model

    from pyfast_tune.trainer.model import lora_config

    s = pairs_setup
    torch.manual_seed(3)
    model = get_peft_model(_load(s.policy), lora_config({"r": 4, "alpha": 8, "dropout": 0.0}, None))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    cfg = _cfg("dpo", beta=0.5)
    ours = _ours(model)
    loss, _, _ = row_loss(ours, s.batch, "cpu", cfg, global_pairs(s.ds, s.ids), Reference(None))
    loss.backward()
    assert abs(float(loss) - np.log(2)) > 1e-3
    trainer = _dpo_trainer(model, None, s.tok, tmp_path, beta=0.5, loss_type=["sigmoid"])
    # Given a model with an adapter, TRL keeps a copy of it as the reference ("ref"): the
    # starting weights, as ours — which, for the new adapter a run starts, are the base's.
    # Without the copy TRL's reference is the base with adapters disabled, like ours.
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    trainer.model.train()
    expected = trainer._compute_loss(trainer.model, _padded(s.batch), False)
    expected.backward()
    _assert_same(loss, expected, _grads(ours), _grads(trainer.model))


def _trl_logps(model, padded, average: bool):
    """Per-sequence completion log-probs of a padded batch, as TRL's ORPO/CPO trainers compute
    them (``get_batch_logps`` on the model's logits)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    labels = padded["input_ids"].masked_fill(padded["completion_mask"] == 0, -100)
    return ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average), logits, labels


def test_orpo_equals_trl_formula(pairs_setup):
    """ORPO: TRL's odds_ratio_loss on its per-token mean log-probs, plus the NLL of the chosen
    completions (token mean; TRL's ORPO also counts prompt tokens in its NLL, the paper's
    L_SFT and XTuner's do not — we follow the paper)."""
    import torch.nn.functional as F
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    s = pairs_setup
    beta = 0.25
    policy = _load(s.policy)
    ours = _ours(policy)
    loss, _, _ = row_loss(ours, s.batch, "cpu", _cfg("orpo", beta=beta),
                          global_pairs(s.ds, s.ids), None)  # fmt: skip
    loss.backward()
    padded = _padded(s.batch)
    avg, logits, labels = _trl_logps(policy, padded, average=True)
    p = len(avg) // 2
    fake = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    ratio_losses = ORPOTrainer.odds_ratio_loss(fake, avg[:p], avg[p:])[0]
    nll = F.cross_entropy(logits[:p, :-1].reshape(-1, logits.shape[-1]), labels[:p, 1:].reshape(-1))
    expected = nll - ratio_losses.mean()
    expected.backward()
    _assert_same(loss, expected, _grads(ours), _grads(policy))


def test_simpo_equals_trl_formula(pairs_setup):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    s = pairs_setup
    beta, gamma, smoothing = 2.0, 0.7, 0.1
    policy = _load(s.policy)
    ours = _ours(policy)
    cfg = _cfg("simpo", beta=beta, gamma=gamma, label_smoothing=smoothing)
    loss, _, _ = row_loss(ours, s.batch, "cpu", cfg, global_pairs(s.ds, s.ids), None)
    loss.backward()
    avg, _, _ = _trl_logps(policy, _padded(s.batch), average=True)
    p = len(avg) // 2
    fake = SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=smoothing, alpha=0.0,
                           loss_type="simpo", accelerator=SimpleNamespace(device="cpu"))  # fmt: skip
    expected = CPOTrainer.cpo_loss(fake, avg[:p], avg[p:])[0].mean()
    expected.backward()
    _assert_same(loss, expected, _grads(ours), _grads(policy))


def test_reward_equals_trl(pairs_setup, tmp_path):
    """Bradley-Terry with centering: RewardTrainer.compute_loss on the padded pairs."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    s = pairs_setup
    torch.manual_seed(5)
    model = _load(s.policy, seq_cls=True)
    ours = _ours(model)
    cfg = _cfg("reward", center_rewards_coefficient=0.01)
    loss, _, figures = row_loss(ours, s.batch, "cpu", cfg, global_pairs(s.ds, s.ids), None)
    loss.backward()
    tokenizer = AutoTokenizer.from_pretrained(s.tok)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(1)
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                        center_rewards_coefficient=0.01, gradient_checkpointing=False)  # fmt: skip
    data = Dataset.from_list([{"chosen": "a b", "rejected": "a c"}])
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, _padded(s.batch, seq_cls=True))
    expected.backward()
    _assert_same(loss, expected, _grads(ours), _grads(trainer.model))
    assert figures[3] / figures[0] == pytest.approx(trainer._metrics["train"]["accuracy"][-1])


def test_reward_with_margins_equals_trl(pairs_setup, tmp_path):
    """A `margin` column: packed per sample (margins.bin), subtracted as RewardTrainer does."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    s = pairs_setup
    rows = [json.loads(x) for x in (s.dir / "pairs.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        if i % 3:  # a pair without a margin has margin 0
            r["margin"] = 0.25 * i - 1.5
    src = tmp_path / "margins.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pack([src], tmp_path / "packed", tokenizer=s.tok, max_length=96, format="preference",
         template="default")  # fmt: skip
    ds = PackedDataset(tmp_path / "packed")
    assert ds.verify()["ok"]
    records = np.asarray(ds.samples)[:, 4]
    expect = np.array([rows[k].get("margin", 0.0) for k in records], dtype=np.float32)
    np.testing.assert_array_equal(ds.margins, expect)
    batch = collate([ds[i] for i in range(PACKS)], "token", 1)
    assert batch.margins is not None and (batch.margins != 0).any()
    model = _load(s.policy, seq_cls=True)
    ours = _ours(model)
    loss, _, _ = row_loss(ours, batch, "cpu", _cfg("reward"), global_pairs(ds, range(PACKS)), None)
    loss.backward()
    tokenizer = AutoTokenizer.from_pretrained(s.tok)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(1)
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                        gradient_checkpointing=False)  # fmt: skip
    data = Dataset.from_list([{"chosen": "a b", "rejected": "a c"}])
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.model.train()
    inputs = _padded(batch, seq_cls=True)
    inputs["margin"] = torch.from_numpy(batch.margins[pair_layout(batch.pairs)[0]])
    expected = trainer.compute_loss(trainer.model, inputs)
    expected.backward()
    _assert_same(loss, expected, _grads(ours), _grads(trainer.model))


def test_a_margin_that_is_not_a_number_names_the_record(tmp_path, tiny_tokenizer):
    from pyfast_tune.data import PackError

    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}))
    with pytest.raises(PackError, match=r'bad.jsonl.*"margin": expected a number, got a string'):
        pack([src], tmp_path / "out", tokenizer=tiny_tokenizer, max_length=64,
             format="preference")  # fmt: skip


def test_score_positions_follow_transformers_rule():
    ids = np.array([5, 6, 7, 2, 8, 9, 2, 2])
    cu = np.array([0, 4, 8])
    assert score_positions(ids, cu, 2, None).tolist() == [3, 7]
    assert score_positions(ids, cu, 2, 2).tolist() == [2, 5]  # the last token that is not pad


def test_qwen_token_zero_counts_in_the_log_probs(tmp_path):
    """Qwen3's id 0 is "!": in a completion it is trained, and DPO's sequence log-prob sums
    it like any other token (XTuner's packed DPO treats label 0 as "ignore")."""
    from pyfast_tune.trainer.preference import sequence_logps
    from pyfast_tune.trainer.tiny import make_tiny_llama
    from tests.conftest import shared_path

    tok = shared_path("tokenizers", "qwen3")
    rows = [{"prompt": [{"role": "user", "content": f"Say it {i} times"}],
             "chosen": [{"role": "assistant", "content": "Yes!" * (i + 1)}],
             "rejected": [{"role": "assistant", "content": "no"}]} for i in range(3)]  # fmt: skip
    src = tmp_path / "bang.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pack([src], tmp_path / "packed", tokenizer=str(tok), max_length=256, format="preference",
         template="qwen_chat")  # fmt: skip
    ds = PackedDataset(tmp_path / "packed")
    batch = collate([ds[i] for i in range(len(ds))], "token", 1)
    bang = batch.targets == 0
    assert bang.sum() >= 6, "no trained id 0"
    model = _load(make_tiny_llama(tmp_path / "m", tok, hidden_size=32, layers=1, heads=2,
                                  kv_heads=1, intermediate_size=64))  # fmt: skip
    ours = _ours(model)
    with torch.no_grad():
        per_token, sums, _ = sequence_logps(ours, batch, "cpu", fused=True)
        logits = ours(input_ids=torch.from_numpy(batch.input_ids)[None],
                      position_ids=torch.from_numpy(batch.position_ids)[None]).logits[0]  # fmt: skip
    logp = torch.log_softmax(logits.float(), -1)
    t = torch.from_numpy(batch.targets)
    manual = torch.where(t != -100, logp.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(per_token, manual, rtol=1e-5, atol=1e-5)
    assert (per_token[torch.from_numpy(bang)] < 0).all()  # counted, not masked
    seg = np.repeat(np.arange(len(batch.sample_lengths)), batch.sample_lengths)
    expect = torch.zeros(len(batch.sample_lengths)).index_add(0, torch.from_numpy(seg), manual)
    torch.testing.assert_close(sums, expect, rtol=1e-5, atol=1e-4)
