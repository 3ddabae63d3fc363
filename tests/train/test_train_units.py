"""Single-process tests of the training layer: config, DeepSpeed presets, order, labels, FLOPs,
checkpoint pointers. No DeepSpeed engine, no ../shared data (see test_train_packed.py)."""

import json

import numpy as np
import pytest

from pyfast_tune.config import load_config, parse_overrides
from pyfast_tune.trainer.batches import (
    IGNORE,
    PackOrder,
    collate,
    global_normalizer,
    shifted_targets,
)
from pyfast_tune.trainer.ds_config import PRESETS, deepspeed_config
from tests.conftest import ROOT

# ---------------------------------------------------------------- config and overrides


def test_overrides_are_typed_and_dotted():
    over = parse_overrides(
        ["--lr", "0.0001", "--lora.r=16", "--save_optimizer", "false", "--tensorboard"]
    )
    assert over == {"lr": 1e-4, "lora": {"r": 16}, "save_optimizer": False, "tensorboard": True}


def test_yaml_then_overrides(tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text("model: m/\ndata: packed/\nlora: {r: 8, alpha: 32}\nlr: 2.0e-5\n")
    cfg = load_config(cfg_path, ["--lora.r", "4", "--data.template", "default", "--method", "full"])
    assert (cfg.lora.r, cfg.lora.alpha) == (4, 32)  # override one nested key, keep the other
    assert cfg.data.path == "packed/" and cfg.data.template == "default"
    assert cfg.method == "full" and cfg.lr == 2e-5
    # YAML 1.1 reads 1e-4 as a string: float keys convert it.
    assert load_config(cfg_path, ["--lr", "1e-4"]).lr == 1e-4
    with pytest.raises(ValueError, match="lr must be a float"):
        load_config(cfg_path, ["--lr", "fast"])


def test_unknown_and_invalid_keys_are_rejected():
    with pytest.raises(ValueError, match="lora.rank"):
        load_config(None, ["--model", "m", "--data", "d", "--lora.rank", "4"])
    with pytest.raises(ValueError, match="method"):
        load_config(None, ["--model", "m", "--data", "d", "--method", "adapter"])
    with pytest.raises(ValueError, match="data.path"):
        load_config(None, ["--model", "m"])


# ---------------------------------------------------------------- DeepSpeed presets


def _has_auto(node) -> bool:
    if isinstance(node, dict):
        return any(_has_auto(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_auto(v) for v in node)
    return node == "auto"


GEOMETRY = dict(
    micro_batch_size=2,
    grad_accum=3,
    world_size=4,
    lr=1e-4,
    betas=(0.9, 0.95),
    eps=1e-8,
    weight_decay=0.1,
    max_grad_norm=1.0,
    dtype="bfloat16",
    hidden_size=64,
)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_fill_every_auto(preset):
    ds = deepspeed_config(preset, **GEOMETRY)
    assert not _has_auto(ds)
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    stage = int(preset[4])
    assert ds["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in ds["zero_optimization"]) == preset.endswith("offload")


def test_user_json_passes_through(tmp_path):
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 2, "my_knob": 7},
        "optimizer": {"type": "Adam", "params": {"lr": 3e-4}},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    ds = deepspeed_config(str(path), **GEOMETRY)
    assert ds["zero_optimization"] == {"stage": 2, "my_knob": 7}
    assert ds["optimizer"] == {"type": "Adam", "params": {"lr": 3e-4}}
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert "train_batch_size" not in ds  # not added when the user did not ask for it

    path.write_text(json.dumps({"train_batch_size": 5}))
    with pytest.raises(ValueError, match="train_batch_size=5"):
        deepspeed_config(str(path), **GEOMETRY)


def test_zero3_on_gloo_gathers_one_parameter_at_a_time(tmp_path):
    """DeepSpeed's coalesced ZeRO-3 gather waits for its last all-gather only, which gloo
    does not order (see deepspeed_config): on the CPU every ZeRO-3 run gathers sequentially,
    a user's explicit choice stays, and GPU runs (NCCL) and other stages are left alone."""
    key = "stage3_allgather_sequential"
    for preset in ("zero3", "zero3_offload"):
        assert deepspeed_config(preset, **GEOMETRY, gloo=True)["zero_optimization"][key] is True
        assert key not in deepspeed_config(preset, **GEOMETRY)["zero_optimization"]
    assert key not in deepspeed_config("zero2", **GEOMETRY, gloo=True)["zero_optimization"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, key: False}}))
    assert deepspeed_config(str(path), **GEOMETRY, gloo=True)["zero_optimization"][key] is False


# ---------------------------------------------------------------- order and rank split


def test_order_is_a_pure_function_and_an_epoch_is_a_permutation():
    a = PackOrder(num_packs=23, global_batch=4, seed=7)
    b = PackOrder(num_packs=23, global_batch=4, seed=7)
    assert a.steps_per_epoch == 5
    seen = np.concatenate([a.global_batch(s) for s in range(5)])
    assert len(set(seen.tolist())) == 20  # no pack twice in an epoch; 3 left over
    np.testing.assert_array_equal(a.global_batch(7), b.global_batch(7))  # fresh object, same
    assert not np.array_equal(a.permutation(0), a.permutation(1))  # epochs reshuffle
    assert not np.array_equal(a.permutation(0), PackOrder(23, 4, seed=8).permutation(0))


@pytest.mark.parametrize("world,micro", [(1, 1), (2, 1), (4, 1), (2, 2), (1, 4)])
def test_rank_split_covers_the_global_batch(world, micro):
    order = PackOrder(num_packs=40, global_batch=8, seed=0)
    for step in (0, 3, 6):
        parts = [
            order.micro_batches(step, rank, world, micro) for rank in range(world)
        ]  # [rank][accum] -> packs
        assert all(len(p) == 8 // (world * micro) for p in parts)
        got = sorted(np.concatenate([np.concatenate(p) for p in parts]).tolist())
        assert got == sorted(order.global_batch(step).tolist())
        # The row at global index accum*world + rank holds the same packs on any world size.
        rows = {
            a * world + r: parts[r][a].tolist() for r in range(world) for a in range(len(parts[r]))
        }
        batch = order.global_batch(step).tolist()
        assert all(rows[i] == batch[i * micro : (i + 1) * micro] for i in rows)


# ---------------------------------------------------------------- labels at sample boundaries


def _pack(samples):
    """A dict shaped like PackedDataset[i] from [(ids, labels), ...]."""
    ids = np.concatenate([np.asarray(s[0]) for s in samples]).astype(np.int64)
    labels = np.concatenate([np.asarray(s[1]) for s in samples]).astype(np.int64)
    pos = np.concatenate([np.arange(len(s[0])) for s in samples]).astype(np.int64)
    cu = np.concatenate([[0], np.cumsum([len(s[0]) for s in samples])]).astype(np.int32)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu}


def test_targets_shift_within_each_sample():
    # Pretraining-style samples (every token trained): a plain labels[1:] shift would make
    # the last token of sample 1 predict 20, the first token of sample 2.
    pack = _pack([([10, 11, 12], [10, 11, 12]), ([20, 21], [20, 21]), ([30], [30])])
    targets = shifted_targets(pack["labels"], pack["cu_seqlens"])
    assert targets.tolist() == [11, 12, IGNORE, 21, IGNORE, IGNORE]


def test_token_loss_weights_sum_to_one_over_the_global_batch():
    packs = [
        _pack([([1, 2, 3, 4], [-100, -100, 3, 4]), ([5, 6], [5, 6])]),
        _pack([([7, 8, 9], [-100, 8, 9])]),
    ]
    # Targets: pack 0 -> [-, 3, 4, -] + [6, -] = 3 trained, pack 1 -> [8, 9, -] = 2 trained.
    norm = global_normalizer(packs, [0, 1], "token")
    assert norm == 5
    rows = [collate([p], "token", norm) for p in packs]
    assert sum(r.weights.sum() for r in rows) == pytest.approx(1.0)
    assert {float(w) for r in rows for w in r.weights if w} == {0.2}
    # One row of both packs: same weights, cu_seqlens continue across packs.
    both = collate(packs, "token", norm)
    np.testing.assert_allclose(both.weights, np.concatenate([r.weights for r in rows]))
    assert both.cu_seqlens.tolist() == [0, 4, 6, 9] and both.max_seqlen == 4


def test_sample_loss_weights_average_samples_not_tokens():
    packs = [_pack([([1, 2, 3, 4], [1, 2, 3, 4]), ([5, 6], [5, 6])])]
    norm = global_normalizer(packs, [0], "sample")
    assert norm == 2
    row = collate(packs, "sample", norm)
    # sample 0 has 3 targets (1/3 each), sample 1 has 1 target; each sample weighs 1/2.
    np.testing.assert_allclose(row.weights, [1 / 6, 1 / 6, 1 / 6, 0, 1 / 2, 0])


# ---------------------------------------------------------------- FLOPs for MFU


def test_flops_count_attention_per_sample_and_lora_honestly():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyfast_tune.trainer.metrics import FlopCounter

    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    # Per layer: q 32x32, k 32x16, v 32x16, o 32x32, gate/up 32x64, down 64x32; lm_head 32x100.
    macs = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3) + 32 * 100
    full = FlopCounter(model)
    assert full.linear_flops_per_token == 6 * macs
    lengths = np.array([100, 28])
    attention = 3 * 2 * (100**2 + 28**2) * 32 * 2
    assert full.step_flops(lengths) == 6 * macs * 128 + attention
    assert full.step_flops(np.array([128])) > full.step_flops(lengths)  # a pack is not a sample
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = FlopCounter(model)
    assert frozen.linear_flops_per_token == 4 * macs  # no weight gradients
    del torch


# ---------------------------------------------------------------- checkpoint pointer


def test_latest_pointer_never_names_a_partial_checkpoint(tmp_path):
    from pyfast_tune.trainer.checkpoint import checkpoint_root, latest_checkpoint

    assert latest_checkpoint(tmp_path) is None
    root = checkpoint_root(tmp_path)
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "trainer_state.json").write_text("{}")
    (root / ".tmp-step_00000004").mkdir()  # a save killed half-way
    (root / "latest").write_text("step_00000002\n")
    assert latest_checkpoint(tmp_path) == root / "step_00000002"
    (root / "latest").write_text("step_00000004\n")  # pointer to something incomplete
    assert latest_checkpoint(tmp_path) == root / "step_00000002"  # newest complete, not .tmp
    (root / "step_00000003").mkdir()  # no trainer_state.json: not complete
    assert latest_checkpoint(tmp_path) == root / "step_00000002"


def test_launch_command_is_an_argument_list():
    from pyfast_tune.launch import launch_command

    cmd = launch_command("run.yaml", nproc=2, deepspeed="zero3", extra_args=["--lora.r", "16"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert cmd[-6:] == ["--config", "run.yaml", "--deepspeed", "zero3", "--lora.r", "16"]
    cmd = launch_command("a b.yaml", num_gpus=8)
    assert cmd[1:5] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "8"]
    assert "a b.yaml" in cmd  # one argument, no shell quoting involved


# ---------------------------------------------------------------- example configs

CONFIGS = ROOT / "pyfast_tune" / "configs"


@pytest.mark.parametrize("name", ["full", "lora", "qlora", "pretrain"])
def test_example_configs_open_with_their_command_and_load(name):
    path = CONFIGS / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "pyfast_tune/train.py" in first
    assert f"configs/{name}.yaml" in first
    cfg = load_config(path)
    assert cfg.method == {"pretrain": "full"}.get(name, name)
    deepspeed_config(cfg.deepspeed, **GEOMETRY)  # its preset resolves


# ---------------------------------------------------------------- HF wiring and launch env


def test_patch_apply_and_revert_on_a_peft_model():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyfast_tune import patch

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    before = model.get_base_model().config._attn_implementation
    patch.apply(model, lora=True, attention_backend="ref")
    assert model.get_base_model().config._attn_implementation == "pyfast_varlen"
    lora_layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert "forward" in lora_layer.__dict__  # the fused LoRA op is routed in
    ids = torch.randint(0, 64, (1, 9))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits  # boundaries from position_ids
        # A left-padded batch is unpadded: row 1 = the 3 tokens of sample 2 after 6 pads.
        rows = torch.stack([ids[0], torch.cat([torch.zeros(6, dtype=ids.dtype), ids[0, 4:7]])])
        mask = torch.tensor([[1] * 9, [0] * 6 + [1] * 3])
        padded = model(
            input_ids=rows, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
        ).logits
        patch.revert(model)
        assert model.get_base_model().config._attn_implementation == before
        assert "forward" not in lora_layer.__dict__
        alone = model(input_ids=ids[:, 4:7]).logits
    torch.testing.assert_close(packed[:, 4:7], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1:, 6:], alone, rtol=1e-5, atol=1e-5)


def test_cu_seqlens_from_position_ids():
    import torch

    from pyfast_tune.patch import cu_seqlens_from_position_ids

    pos = torch.tensor([[0, 1, 2, 0, 0, 1]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 4, 6]
    assert cu_seqlens_from_position_ids(torch.tensor([5, 6, 0])).tolist() == [0, 2, 3]


def test_slurm_variables_become_torch_distributed_ones(monkeypatch):
    from pyfast_tune.trainer.runtime import distributed_env

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert distributed_env() == (5, 8, 1)


def test_attention_op_falls_back_to_ref_when_it_cannot_build(monkeypatch, caplog):
    import torch

    from pyfast_tune import patch
    from pyfast_tune.kernels.varlen_attention import cpu as _cpp

    def no_compiler():
        raise _cpp.ExtensionBuildError("no C++ compiler found (looked for 'c++')")

    monkeypatch.setattr(_cpp, "load_varlen_attention", no_compiler)
    with caplog.at_level("WARNING"):
        assert patch.usable_attention_backend("op", torch.device("cpu")) == "ref"
    assert "no C++ compiler" in caplog.text
    assert patch.usable_attention_backend("ref", torch.device("cpu")) == "ref"


def test_training_uses_the_attention_op_by_default():
    from pyfast_tune.config import TrainConfig

    assert TrainConfig().attention == "op"


def test_short_and_torch_dtype_names_resolve_alike():
    """The config accepts bf16/fp16/fp32 as well as torch's names; the model is built with
    torch's (a short name once passed validation and failed at start-up)."""
    from pyfast_tune.config import ConfigError
    from pyfast_tune.trainer.model import resolve_dtype

    assert [resolve_dtype(n) for n in ("bf16", "fp16", "fp32")] == [
        "bfloat16",
        "float16",
        "float32",
    ]
    assert resolve_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ConfigError, match="dtype must be auto"):
        resolve_dtype("fp8")
