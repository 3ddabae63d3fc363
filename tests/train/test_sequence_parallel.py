"""Sequence parallelism (DeepSpeed-Ulysses over packed rows) gives the unsplit run's training.

Single process: the sharding, padding and target rules (``shard_row``), the key/value head
repeats, the all-to-all layout, and ``ulysses_attention`` and a whole tiny GQA Llama run by
N threads that exchange through memory (one model replica per thread, as one per rank), whose
summed loss and gradients equal the unsplit row's.
Two processes (torchrun, gloo, DeepSpeed): ``sequence_parallel_size: 2`` trains to the same
losses (fp32, rel <= 1e-5), gradient norms and weights as one process on the same global
batches, for LoRA and full fine-tuning under ZeRO-2 and ZeRO-3, and resume works into and out
of it.

Weights are compared only after plain SGD steps: Adam divides by the root of the squared
gradient, so a near-zero gradient whose rounding differs between the runs (another CPU's
kernels sum in another order) moves its weight by up to lr either way. Adam runs are compared
by their losses and gradient norms, which stay within rounding of each other.
"""

import copy
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pyfast_tune.trainer.batches import IGNORE, collate, shifted_targets
from pyfast_tune.trainer.sequence_parallel import (
    check_heads,
    heads_from_received,
    heads_to_send,
    kv_repeats,
    padded_length,
    sequence_from_received,
    sequence_to_send,
    shard_row,
    ulysses_attention,
)
from tests.conftest import packed_chats, sgd_deepspeed_json, train_metrics, train_process


def _pack(lengths, seed=0):
    """A pack of samples of these lengths with random ids and some untrained labels."""
    rng = np.random.default_rng(seed)
    total = sum(lengths)
    ids = rng.integers(1, 100, total).astype(np.int64)
    labels = np.where(rng.random(total) < 0.3, IGNORE, ids)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu}


# ---------------------------------------------------------------- sharding, padding, targets


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_are_the_whole_row_padded_at_the_end(size):
    packs = [_pack([5, 9, 1, 7], seed=1), _pack([4, 3], seed=2)]  # 29 tokens
    row = collate(packs, "token", normalizer=10)
    shards = [shard_row(row, size, r) for r in range(size)]
    padded = padded_length(29, size)
    pad = padded - 29
    assert {len(s.input_ids) for s in shards} == {padded // size}
    cat = {k: np.concatenate([getattr(s, k) for s in shards]) for k in
           ("input_ids", "position_ids", "targets", "weights")}  # fmt: skip
    # The real tokens are the row's, in order, with the row's targets (shifted over the whole
    # row before the split) and weights; the padding trains nothing and restarts positions.
    for k in cat:
        np.testing.assert_array_equal(cat[k][:29], getattr(row, k))
    np.testing.assert_array_equal(cat["targets"][29:], np.full(pad, IGNORE))
    np.testing.assert_array_equal(cat["weights"][29:], np.zeros(pad))
    np.testing.assert_array_equal(cat["position_ids"][29:], np.arange(pad))
    # Attention covers the whole padded row; the padding is one segment of its own.
    want_cu = list(row.cu_seqlens) + ([padded] if pad else [])
    for s in shards:
        assert s.cu_seqlens.tolist() == want_cu
        assert s.max_seqlen == max(row.max_seqlen, pad)
    # Counts: real tokens and trained targets add up to the row's; padding counted apart.
    assert sum(s.num_tokens for s in shards) == 29
    assert sum(s.num_trained for s in shards) == row.num_trained
    assert sum(s.num_padding for s in shards) == pad
    assert shards[-1].num_padding == pad  # the padding is at the end
    # A row's FLOPs are counted once: its samples are on the group's first rank only.
    assert shards[0].sample_lengths.tolist() == row.sample_lengths.tolist()
    assert all(len(s.sample_lengths) == 0 for s in shards[1:])


def test_a_target_at_a_shard_boundary_stays_with_the_predicting_token():
    # One 8-token sample split in two: token 3 (last of shard 0) predicts token 4 (first of
    # shard 1), so shard 0 holds that target; the sample's last token predicts nothing.
    p = _pack([8], seed=3)
    p["labels"] = p["input_ids"].copy()
    row = collate([p], "token", normalizer=7)
    first, second = shard_row(row, 2, 0), shard_row(row, 2, 1)
    assert first.targets[-1] == p["input_ids"][4]
    assert second.targets.tolist() == p["input_ids"][5:].tolist() + [IGNORE]
    assert first.num_trained == 4 and second.num_trained == 3
    np.testing.assert_allclose(first.weights.sum() + second.weights.sum(), 1.0)
    # Two samples meeting exactly at the boundary: no target crosses it.
    q = _pack([4, 4], seed=4)
    q["labels"] = q["input_ids"].copy()
    row = collate([q], "token", normalizer=6)
    assert shard_row(row, 2, 0).targets[-1] == IGNORE
    np.testing.assert_array_equal(
        np.concatenate([shard_row(row, 2, r).targets for r in (0, 1)]),
        shifted_targets(q["labels"], q["cu_seqlens"]),
    )


@pytest.mark.parametrize("value", [0, -2, 1.5, "two"])
def test_config_rejects_a_bad_sequence_parallel_size(value):
    from pyfast_tune.config import ConfigError, load_config

    base = ["--model", "m", "--data", "packed/"]
    assert load_config(None, [*base, "--sequence_parallel_size", "4"]).sequence_parallel_size == 4
    with pytest.raises(ConfigError, match="sequence_parallel_size must be an? int"):
        load_config(None, [*base, "--sequence_parallel_size", str(value)])


def test_shard_row_rejects_a_rank_outside_the_group():
    row = collate([_pack([4])], "token", normalizer=3)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        shard_row(row, 2, 2)


# ---------------------------------------------------------------- heads and the all-to-all


@pytest.mark.parametrize(
    "heads,kv_heads,size,repeats",
    [(4, 4, 2, 1), (4, 2, 2, 1), (8, 4, 2, 1), (4, 1, 2, 2), (4, 2, 4, 2), (8, 1, 4, 4),
     (6, 3, 2, 2), (12, 4, 6, 3), (6, 3, 3, 1)],
)  # fmt: skip
def test_kv_heads_are_split_or_repeated_just_enough(heads, kv_heads, size, repeats):
    assert kv_repeats(heads, kv_heads, size) == repeats
    kv = kv_heads * repeats
    assert kv % size == 0
    # Every rank gets the key/value heads its query heads read, in order.
    group, group_rep = heads // kv_heads, heads // kv
    for rank in range(size):
        q_heads = range(rank * heads // size, (rank + 1) * heads // size)
        kv_local = range(rank * kv // size, (rank + 1) * kv // size)
        for i, h in enumerate(q_heads):
            assert kv_local[i // group_rep] // repeats == h // group


def test_heads_must_divide_over_the_group():
    with pytest.raises(ValueError, match="must divide the model's 9 attention heads"):
        check_heads(9, 3, 2)
    check_heads(9, 3, 3)


def _simulated_exchange(sends):
    """What every rank receives when rank r sends sends[r] (slot j to rank j)."""
    n = len(sends)
    return [torch.stack([sends[s][r] for s in range(n)]) for r in range(n)]


def test_all_to_all_layout_moves_heads_and_tokens_to_the_right_ranks():
    n, s, h, d = 3, 4, 6, 5
    full = torch.randn(n * s, h, d)
    shards = list(full.chunk(n))
    received = _simulated_exchange([heads_to_send(x, n) for x in shards])
    by_heads = [sequence_from_received(x) for x in received]
    for r in range(n):  # rank r: the whole row, its block of heads
        torch.testing.assert_close(
            by_heads[r], full[:, r * h // n : (r + 1) * h // n], rtol=0, atol=0
        )
    back = _simulated_exchange([sequence_to_send(x, n) for x in by_heads])
    for r in range(n):
        torch.testing.assert_close(heads_from_received(back[r]), shards[r], rtol=0, atol=0)


class ThreadGroup:
    """N threads standing in for N ranks: an all-to-all over dim 0 through shared memory."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots = [None] * size

    def exchange(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = x
        self.barrier.wait()
        out = torch.stack([self.slots[s][rank] for s in range(self.size)])
        self.barrier.wait()  # nobody overwrites a slot before every rank has read it
        return out

    def run(self, fn):
        """fn(rank) on every rank at once; their results, rank order (errors re-raised)."""
        results, errors = [None] * self.size, []

        def target(rank):
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadSequenceParallel:
    """``SequenceParallel``'s interface over a ``ThreadGroup`` (what patch.py calls)."""

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.size, self.rank = group, group.size, rank

    def attention(self, q, k, v, attend):
        return ulysses_attention(
            q, k, v, self.size, lambda x: self.group.exchange(self.rank, x), attend
        )


@pytest.mark.parametrize(
    "heads,kv_heads,size", [(4, 2, 2), (4, 1, 2), (4, 2, 4), (6, 3, 2), (8, 8, 4), (6, 2, 3)]
)
def test_ulysses_attention_equals_attention_over_the_whole_row(heads, kv_heads, size):
    """Forward and every input's gradient, segments crossing shard boundaries included."""
    from pyfast_tune.patch import varlen_attention_ref

    torch.manual_seed(0)
    lengths = [7, 1, 13, 3]
    total = padded_length(sum(lengths), size)
    lengths.append(total - sum(lengths))  # padding segment (possibly empty)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q = torch.randn(total, heads, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(total, kv_heads, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(total, kv_heads, 8, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(total, heads, 8, dtype=torch.float64)

    def attend(q, k, v):
        return varlen_attention_ref(q, k, v, cu)

    want = attend(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    group = ThreadGroup(size)
    s = total // size

    def rank_fn(r):
        part = [x.detach()[r * s : (r + 1) * s].requires_grad_() for x in (q, k, v)]
        out = ThreadSequenceParallel(group, r).attention(*part, attend)
        grads = torch.autograd.grad(out, part, grad_out[r * s : (r + 1) * s])
        return out.detach(), grads

    results = group.run(rank_fn)
    torch.testing.assert_close(torch.cat([o for o, _ in results]), want.detach())
    for i in range(3):
        torch.testing.assert_close(torch.cat([g[i] for _, g in results]), want_grads[i])


# ---------------------------------------------------------------- a whole model, threads as ranks


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_tokenizer, generated_chats):
    return packed_chats(tmp_path_factory.mktemp("sp_data"), tiny_tokenizer, generated_chats, 150)


@pytest.fixture(scope="module")
def gqa_models(tmp_path_factory, tiny_tokenizer):
    """Tiny causal Llamas with grouped key/value heads: 4 query heads over 2 (split over 2
    ranks) and over 1 (repeated for 2 ranks)."""
    from pyfast_tune.trainer.tiny import make_tiny_llama

    d = tmp_path_factory.mktemp("sp_models")
    return {
        kv: make_tiny_llama(
            d / f"kv{kv}", tiny_tokenizer, heads=4, kv_heads=kv, seed=0, init_std=0.1
        )  # fmt: skip
        for kv in (2, 1)
    }


@pytest.mark.parametrize(
    "kv_heads,size,fused,reduction",
    [(2, 2, True, "token"), (1, 2, False, "sample"), (2, 4, True, "token")],
)
def test_model_on_shards_gives_the_rows_loss_and_gradients(packed, gqa_models, kv_heads, size,
                                                            fused, reduction):  # fmt: skip
    """Rotary positions, boundary targets, padding and GQA heads together: N replicas of a
    tiny Llama on the N shards of packed rows (odd lengths, so padded) sum to the loss and
    the gradients of the unsplit rows, under either loss reduction."""
    from transformers import AutoModelForCausalLM

    from pyfast_tune import patch
    from pyfast_tune.data import PackedDataset
    from pyfast_tune.trainer.batches import global_normalizer
    from pyfast_tune.trainer.step import batch_loss

    ds = PackedDataset(packed)
    ids = [i for i in range(len(ds)) if len(ds[i]["input_ids"]) % size][:2]
    assert len(ids) == 2, "the test needs rows whose length is not a multiple of the group"
    model = AutoModelForCausalLM.from_pretrained(gqa_models[kv_heads], dtype=torch.float64)
    patch.apply(model, lora=False, attention_backend="ref")
    norm = global_normalizer(ds, ids, reduction)
    rows = [collate([ds[i]], reduction, norm) for i in ids]

    model.zero_grad()
    want = sum(batch_loss(model, row, "cpu", fused=fused) for row in rows)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    replicas = [copy.deepcopy(model) for _ in range(size)]
    group = ThreadGroup(size)

    def rank_fn(r):
        m = replicas[r]
        m.zero_grad()
        sp = ThreadSequenceParallel(group, r)
        loss = sum(batch_loss(m, shard_row(row, size, r), "cpu", fused=fused,
                              sequence_parallel=sp) for row in rows)  # fmt: skip
        loss.backward()
        return loss.detach()

    losses = group.run(rank_fn)
    torch.testing.assert_close(sum(losses), want.detach(), rtol=1e-10, atol=0)
    for name, grad in want_grads.items():
        got = sum(dict(m.named_parameters())[name].grad for m in replicas)
        torch.testing.assert_close(got, grad, rtol=1e-8, atol=1e-12, msg=name)


# ---------------------------------------------------------------- two processes under DeepSpeed

STEPS = 4


# Learning rates that make the tiny model's loss fall within STEPS steps.
LR = {("adamw", "lora"): 1e-2, ("adamw", "full"): 3e-3, ("sgd", "lora"): 1.0, ("sgd", "full"): 1.0}


def _deepspeed_json(tmp: Path, preset: str, optimizer: str) -> str:
    """The preset itself (AdamW), or the preset with plain SGD (see the module's docstring)."""
    return preset if optimizer == "adamw" else str(sgd_deepspeed_json(tmp, preset))


def _config(tmp: Path, packed: Path, model: Path, method: str, preset: str,
            optimizer: str) -> Path:  # fmt: skip
    config = tmp / "run.yaml"
    config.write_text(
        f"model: {model}\n"
        f"data: {packed}\n"
        "max_length: 256\n"
        f"method: {method}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"  # dropout masks are drawn per shard
        f"deepspeed: {_deepspeed_json(tmp, preset, optimizer)}\n"
        f"max_steps: {STEPS}\n"
        f"lr: {LR[optimizer, method]}\n"
        "warmup_steps: 1\n"
        "micro_batch_size: 1\n"
        "global_batch_size: 2\n"
        "save_steps: 2\n"
        "progress_bar: false\n"
        "report_to: none\n"
    )
    return config


def _weights(run: Path, step: int = STEPS) -> dict:
    from safetensors.torch import load_file

    hf = run / "checkpoints" / f"step_{step:08d}" / "hf"
    (path,) = [p for p in hf.glob("*.safetensors")]
    return load_file(path)


def _assert_same_training(got: list[dict], want: list[dict]):
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"] and a["trained_tokens"] == b["trained_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        # The gradient itself, not only Adam's scale-free update of it, is the unsplit one.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)


def _assert_same_weights(got: dict, want: dict):
    """Weights after SGD steps (see the module's docstring for why not after Adam's)."""
    assert got.keys() == want.keys() and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def runs(packed, gqa_models, tmp_path_factory):
    """Trained runs by (preset, method, kv_heads, sequence_parallel_size, optimizer), each
    once; optimizer is adamw (the preset's) or sgd."""
    done = {}

    def get(preset, method, kv_heads, sp, optimizer="adamw"):
        key = (preset, method, kv_heads, sp, optimizer)
        if key not in done:
            d = tmp_path_factory.mktemp(f"{preset}_{method}_kv{kv_heads}_sp{sp}_{optimizer}")
            config = _config(d, packed, gqa_models[kv_heads], method, preset, optimizer)
            metrics = train_metrics(config, d / "run", sp, "--sequence_parallel_size", str(sp))
            done[key] = (config, d / "run", metrics)
        return done[key]

    return get


@pytest.mark.parametrize(
    "preset,method,kv_heads",
    [
        ("zero2", "lora", 2),
        # slow: the default run keeps zero2-lora; ZeRO-3 full is the same path partitioned
        pytest.param("zero3", "full", 1, marks=pytest.mark.slow),
        pytest.param("zero3", "lora", 2, marks=pytest.mark.slow),
        pytest.param("zero2", "full", 1, marks=pytest.mark.slow),
    ],
)
def test_two_ranks_train_like_one(runs, preset, method, kv_heads):
    """sequence_parallel_size 2 on 2 processes = 1 process on the same global batches: the
    same losses, gradient norms and (after SGD steps) weights."""
    _, one_dir, one = runs(preset, method, kv_heads, 1, "sgd")
    _, two_dir, two = runs(preset, method, kv_heads, 2, "sgd")
    _assert_same_training(two, one)
    assert one[-1]["loss"] < one[0]["loss"]  # it trains
    # Packs of odd length were padded, and the padding is counted apart from the tokens.
    assert all(m["padding_tokens"] == 0 for m in one)
    assert any(m["padding_tokens"] > 0 for m in two)
    assert [m["tokens"] for m in two] == [m["tokens"] for m in one]
    _assert_same_weights(_weights(two_dir), _weights(one_dir))
    state = json.loads(
        (two_dir / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text()
    )
    assert state["global_batch"] == 2 and state["world_size"] == 2


@pytest.mark.parametrize(
    "saved_by,resumed_by",
    # slow: one direction in the default run (into sequence parallelism), both in -m slow
    [pytest.param(2, 1, marks=pytest.mark.slow), (1, 2)],
)
def test_resume_into_and_out_of_sequence_parallelism(runs, tmp_path, saved_by, resumed_by):
    """A checkpoint of step 2 saved with sequence_parallel_size ``saved_by`` continues with
    ``resumed_by`` (as many processes) to the losses and gradient norms of the uninterrupted
    run. AdamW, whose moments the universal checkpoint reshards between world sizes; so the
    weights are not compared (see the module's docstring)."""
    config, saved_dir, _ = runs("zero2", "lora", 2, saved_by)
    _, _, full = runs("zero2", "lora", 2, 1)
    step2 = saved_dir / "checkpoints" / "step_00000002"
    out = tmp_path / "resumed"
    resumed = train_metrics(config, out, resumed_by, "--sequence_parallel_size", str(resumed_by),
                     "--resume", str(step2))  # fmt: skip
    _assert_same_training(resumed, full[2:])


def test_sequence_parallel_size_must_divide_the_processes(runs, tmp_path):
    config, _, _ = runs("zero2", "lora", 2, 1)
    proc = train_process(config, tmp_path / "run", 2, "--sequence_parallel_size", "4",
                         check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "sequence_parallel_size 4 must divide the number of processes (2)" in proc.stderr


def test_stock_attention_is_refused_under_sequence_parallelism(packed, gqa_models):
    """The model's own attention would attend within each shard: the config refuses it, and a
    model whose attention never reaches ours fails the step instead of training wrong."""
    from transformers import AutoModelForCausalLM

    from pyfast_tune.config import ConfigError, load_config
    from pyfast_tune.data import PackedDataset
    from pyfast_tune.trainer.sequence_parallel import SequenceParallel
    from pyfast_tune.trainer.step import batch_loss

    base = ["--model", "m", "--data", "packed/", "--sequence_parallel_size", "2"]
    with pytest.raises(ConfigError, match="needs our attention"):
        load_config(None, [*base, "--attention", "sdpa"])
    load_config(None, [*base, "--attention", "ref"])

    ds = PackedDataset(packed)
    model = AutoModelForCausalLM.from_pretrained(gqa_models[2], dtype=torch.float32)  # sdpa
    sp = SequenceParallel(group=None, size=2, rank=0)
    row = shard_row(collate([ds[0]], "token", 100), 2, 0)
    with torch.no_grad():
        batch_loss(model, row, "cpu", fused=False, sequence_parallel=sp)
    with pytest.raises(RuntimeError, match="never called pyfast_tune's attention"):
        sp.require_attention_since(0)
