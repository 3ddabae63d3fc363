"""Packed training is exact: a packed row gives the loss and gradients of its samples run one by
one. Generated conversations packed by the Rust engine with a tokenizer trained on them (so it
runs on any clone), and a tiny Llama built from a config. Single process, no DeepSpeed."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyfast_tune import patch
from pyfast_tune.trainer.batches import IGNORE, collate, global_normalizer
from pyfast_tune.trainer.step import batch_loss, model_inputs
from tests.conftest import packed_chats


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_tokenizer, generated_chats):
    from pyfast_tune.data import PackedDataset

    d = packed_chats(tmp_path_factory.mktemp("packed"), tiny_tokenizer, generated_chats, 40)
    return PackedDataset(d), tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_model(packed, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from pyfast_tune.trainer.tiny import make_tiny_llama

    # A wide init makes predictions depend strongly on context (a 0.02 init is near-uniform
    # over the vocabulary), so a leak across samples shows in the loss.
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny"), packed[1], seed=0, init_std=0.3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def _multi_sample_packs(ds, n):
    ids = [i for i in range(len(ds)) if len(ds[i]["cu_seqlens"]) > 2][:n]
    assert len(ids) == n, "the test data must pack several samples per pack"
    return ids


def _reference(model, ds, pack_ids, reduction):
    """Loss of each sample alone (stock HF attention, HF's own label shift), gradients."""
    model.zero_grad()
    samples = []
    for i in pack_ids:
        p = ds[i]
        cu = p["cu_seqlens"]
        for a, b in zip(cu[:-1], cu[1:]):
            samples.append((p["input_ids"][a:b], p["labels"][a:b]))
    sums, counts = [], []
    for ids, labels in samples:
        ids = torch.from_numpy(ids)[None]
        labels = torch.from_numpy(labels)[None]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        target = labels[0, 1:]
        sums.append(F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum"))
        counts.append(int((target != IGNORE).sum()))
    if reduction == "token":
        loss = torch.stack(sums).sum() / sum(counts)
    else:
        means = [s / c for s, c in zip(sums, counts) if c]
        loss = torch.stack(means).sum() / len(means)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed(model, ds, pack_ids, reduction, rows):
    """The training path: packs split into ``rows`` rows, weighted loss summed over rows."""
    model.zero_grad()
    norm = global_normalizer(ds, pack_ids, reduction)
    total = 0.0
    for row_ids in np.array_split(np.asarray(pack_ids), rows):
        batch = collate([ds[int(i)] for i in row_ids], reduction, norm)
        loss = batch_loss(model, batch, "cpu")
        loss.backward()
        total += float(loss.detach())
    return torch.tensor(total), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "backend,reduction", [("ref", "token"), ("ref", "sample"), ("op", "token")]
)
def test_packed_equals_unpacked_loss_and_gradients(packed, tiny_model, reduction, backend):
    ds, _ = packed
    pack_ids = _multi_sample_packs(ds, 3)
    ref_model = copy.deepcopy(tiny_model)
    ref_loss, ref_grads = _reference(ref_model, ds, pack_ids, reduction)
    model = patch.apply(copy.deepcopy(tiny_model), lora=False, attention_backend=backend)
    for rows in (1, 3):  # one long row of 3 packs, or 3 accumulated rows
        loss, grads = _packed(model, ds, pack_ids, reduction, rows)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_comparison_catches_leaks_across_samples(packed, tiny_model):
    """The two ways packing usually goes wrong change the loss far beyond the tolerance above
    (1e-5): by more than 100 times it."""
    ds, _ = packed
    pack_ids = _multi_sample_packs(ds, 3)
    ref_loss, _ = _reference(copy.deepcopy(tiny_model), ds, pack_ids, "token")
    batch = collate([ds[int(i)] for i in pack_ids], "token", 1)

    # 1. Attention crosses samples: stock sdpa over the row, ignoring sample boundaries.
    leaky = copy.deepcopy(tiny_model)
    inputs = model_inputs(batch, "cpu")
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"):
        inputs.pop(key)
    logits = leaky(**inputs).logits[0]
    weights = torch.from_numpy(batch.targets != IGNORE).float()
    ce = F.cross_entropy(
        logits, torch.from_numpy(batch.targets), ignore_index=IGNORE, reduction="none"
    )
    leaky_attention = ((ce * weights).sum() / weights.sum()).detach()
    assert abs(float(leaky_attention) - float(ref_loss)) > 1e-3

    # 2. Labels cross samples: a plain labels[1:] shift over the packed row, pretraining-style
    # data (every token trained) so the first token of each sample becomes a target.
    model = patch.apply(copy.deepcopy(tiny_model), lora=False)
    ids = torch.from_numpy(batch.input_ids)
    logits = model(**model_inputs(batch, "cpu")).logits[0]
    naive = F.cross_entropy(logits[:-1], ids[1:])
    cu = batch.cu_seqlens
    keep = torch.ones(len(ids) - 1, dtype=torch.bool)
    keep[torch.from_numpy(cu[1:-1].astype(np.int64)) - 1] = False  # per-sample shift
    exact = F.cross_entropy(logits[:-1][keep], ids[1:][keep])
    assert abs(float(naive) - float(exact)) > 1e-3


def test_qlora_trains_on_cpu(packed, tmp_path):
    """bitsandbytes nf4 + double quant + LoRA: the loss falls over a few AdamW steps on CPU."""
    pytest.importorskip("bitsandbytes")
    from pyfast_tune.config import load_config
    from pyfast_tune.trainer.model import build_model
    from pyfast_tune.trainer.tiny import make_tiny_llama

    ds, tok = packed
    path = make_tiny_llama(tmp_path / "tiny", tok, seed=1)
    cfg = load_config(None, ["--model", str(path), "--data", "x", "--method", "qlora"])
    model = patch.apply(build_model(cfg, "float32"), lora=True)
    base = model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit"
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    pack_ids = _multi_sample_packs(ds, 2)
    norm = global_normalizer(ds, pack_ids, "token")
    batch = collate([ds[i] for i in pack_ids], "token", norm)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = batch_loss(model, batch, "cpu")
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
