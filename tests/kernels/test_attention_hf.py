"""The varlen attention op inside a Hugging Face model.

A tiny Llama built from a config (no download): with ``pyfast_tune.patch`` switched to the op
(``attention_backend="op"``, the C++ kernel on CPU) loss and every parameter gradient equal
those of the reference per-segment path, for a packed row and for unpacked rows; and a packed
row gives each sample exactly the logits it gets alone under stock SDPA.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from pyfast_tune import patch  # noqa: E402

LENS = [5, 1, 11, 7]


def tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float().train()


def packed_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (1, sum(LENS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in LENS])[None]
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu


def loss_and_grads(model, backend, **inputs):
    patch.apply(model, lora=False, attention_backend=backend)
    try:
        model.zero_grad()
        out = model(**inputs, labels=inputs["input_ids"], use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.loss.detach(), out.logits.detach(), grads
    finally:
        patch.revert(model)


def assert_same(a, b):
    loss_a, logits_a, grads_a = a
    loss_b, logits_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_op_matches_reference_path():
    model = tiny_llama()
    ids, pos, cu = packed_batch()
    m = max(LENS)
    kw = dict(
        input_ids=ids,
        position_ids=pos,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=m,
        max_length_k=m,
    )
    op = loss_and_grads(model, "op", **kw)
    assert_same(op, loss_and_grads(model, "ref", **kw))
    # Boundaries from position_ids alone give the same result.
    assert_same(op, loss_and_grads(model, "op", input_ids=ids, position_ids=pos))


def test_unpacked_op_matches_reference_path():
    model = tiny_llama()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    assert_same(
        loss_and_grads(model, "op", input_ids=ids), loss_and_grads(model, "ref", input_ids=ids)
    )


def test_packed_row_equals_samples_alone():
    """No token attends across a sample boundary: packed logits = per-sample stock SDPA logits."""
    model = tiny_llama().eval()
    ids, pos, _ = packed_batch()
    patch.apply(model, lora=False, attention_backend="op")
    try:
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    finally:
        patch.revert(model)
    model.set_attn_implementation("sdpa")
    start = 0
    with torch.no_grad():
        for n in LENS:
            alone = model(input_ids=ids[:, start : start + n], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-4, atol=1e-5)
            start += n
