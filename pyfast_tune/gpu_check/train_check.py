"""The kit's training part: a tiny Llama trained 30 steps on packed data, ours against the reference.

Generated chats (the demo's world) are packed by the Rust engine, and a Llama built from a
config (never downloaded) trains with a peft LoRA under transformers' ``Trainer`` with
``PackedCollator`` — the path a user without DeepSpeed takes — twice from the same seed:

- ours: ``patch.apply`` with our attention (Triton on CUDA, the C++ op on CPU), every LoRA
  layer through the fused ``lora_linear`` (Triton on CUDA; its torch backend in the dry mode,
  the interpreter being too slow for a training run), and the fused linear cross-entropy as
  the loss (the LM head returns it; no logits);
- reference: per-segment SDPA attention (``attention_backend="ref"``), peft's own LoRA
  layers, transformers' own loss over the logits.

Verdict: the loss falls, and the two runs' losses agree step by step within the dtype's
tolerance (bf16 on a GPU: 2% of the loss; fp32 dry: 1e-3). The guard must have kept our
attention (a fallback would hide a broken kernel behind a passing run).
"""

from __future__ import annotations

import time

# (GPU, dry): model, data, steps. GPU: head dim 128 (hidden 512 / 4 heads), GQA 2.
SETUPS = {
    "gpu": {"hidden": 512, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 1024,
            "max_length": 2048, "records": 1500, "dtype": "bfloat16", "rel_tol": 0.02},
    "dry": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128,
            "max_length": 256, "records": 300, "dtype": "float32", "rel_tol": 1e-3},
}  # fmt: skip
STEPS, BATCH, LR, RANK, SEED = 30, 2, 1e-2, 16, 0


def _data(work, setup):
    from pyfast_tune.data import pack
    from pyfast_tune.demo import make_tokenizer, synth_conversations, write_jsonl
    from pyfast_tune.trainer.tiny import make_tiny_llama

    root = work / "train"
    chats = synth_conversations(setup["records"], seed=3)
    tok = make_tokenizer(chats, root / "tokenizer")
    jsonl = write_jsonl(chats, root / "chats.jsonl")
    packed = root / "packed"
    if not (packed / "meta.json").exists():
        pack([jsonl], packed, tokenizer=tok, max_length=setup["max_length"], format="openai")
    model_dir = make_tiny_llama(root / "model", tok, hidden_size=setup["hidden"],
                                layers=setup["layers"], heads=setup["heads"],
                                kv_heads=setup["kv_heads"],
                                intermediate_size=setup["intermediate"], seed=SEED)  # fmt: skip
    return packed, model_dir


def _fused_loss_trainer():
    import torch
    import transformers

    from pyfast_tune.trainer.loss_head import fused_loss_head

    class FusedLossTrainer(transformers.Trainer):
        """The loss from the LM head (fused linear cross-entropy), the mean over trained
        tokens — the number transformers' own loss gives for the same collated row."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")[0]  # (T,), unshifted; -100 at each sample's start
            targets = torch.full_like(labels, -100)
            targets[:-1] = labels[1:]
            trained = targets != -100
            weights = trained.float() / trained.sum().clamp(min=1)
            head = fused_loss_head(model, inputs)
            if head is None:
                raise RuntimeError("the fused loss does not apply to this model (see the log)")
            with head.computing_loss(targets, weights):
                loss = model(**inputs).logits
            return (loss, None) if return_outputs else loss

    return FusedLossTrainer


def _train(which, mode, setup, packed, model_dir, out_dir) -> dict:
    import peft
    import torch
    import transformers

    from pyfast_tune import patch
    from pyfast_tune.hf import PackedCollator, PackedTorchDataset
    from pyfast_tune.kernels import guard
    from pyfast_tune.kernels.lora import patch_peft_lora

    cuda = mode == "gpu"
    dtype = getattr(torch, setup["dtype"])
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    model.to("cuda" if cuda else "cpu")
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK,
                                                       lora_dropout=0.0, target_modules="all-linear"))  # fmt: skip
    info = {}
    if which == "ours":
        attention = "triton" if cuda else "cpp"
        patch.apply(model, lora=False, attention_backend=attention)
        info["lora_layers_fused"] = patch_peft_lora(model, backend="triton" if cuda else "torch")
        shape = {"dtype": setup["dtype"], "head_dim": setup["hidden"] // setup["heads"],
                 "gqa": setup["heads"] // setup["kv_heads"], "window": [-1, 0]}  # fmt: skip
        device = next(model.parameters()).device
        # The decision patch.apply made (cached in-process): the backend training ran.
        info["attention"] = guard.decide("varlen_attention", device, shape, attention).chosen
        info["attention_asked"] = attention
        trainer_cls = _fused_loss_trainer()
    else:
        patch.apply(model, lora=False, attention_backend="ref")
        info["attention"] = "ref (per-segment SDPA)"
        trainer_cls = transformers.Trainer
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=not cuda, disable_tqdm=True,
        dataloader_num_workers=0, seed=SEED, data_seed=SEED,
    )  # fmt: skip
    trainer = trainer_cls(model=model, args=args, train_dataset=PackedTorchDataset(packed),
                          data_collator=PackedCollator())  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
        info["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    info["seconds"] = round(time.perf_counter() - start, 2)
    info["losses"] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return info


def run_train_check(ctx) -> dict:
    from pyfast_tune.gpu_check.parts import PartFailed

    setup = SETUPS[ctx.mode]
    packed, model_dir = _data(ctx.work, setup)
    results = {"setup": setup, "steps": STEPS, "batch_packs": BATCH, "lr": LR, "rank": RANK}
    runs = {}
    for which in ("ours", "ref"):
        runs[which] = _train(which, ctx.mode, setup, packed, model_dir, ctx.work / f"train-{which}")
        results[which] = runs[which]
        ctx.save(results)
    ours, ref = runs["ours"]["losses"], runs["ref"]["losses"]
    results["backends"] = {"attention": runs["ours"]["attention"],
                           "lora_layers_fused": runs["ours"].get("lora_layers_fused")}  # fmt: skip
    results["loss_first"], results["loss_last"] = ours[:1], ours[-1:]
    results["ref_loss_last"] = ref[-1:]
    problems = []
    if len(ours) != STEPS or len(ref) != STEPS:
        problems.append(f"logged {len(ours)} / {len(ref)} losses for {STEPS} steps")
    else:
        diffs = [abs(a - b) for a, b in zip(ours, ref)]
        results["max_abs_diff"] = round(max(diffs), 5)
        tol = setup["rel_tol"] * max(ref)
        results["tolerance"] = round(tol, 5)
        if max(diffs) > tol:
            step = diffs.index(max(diffs))
            problems.append(f"ours and the reference differ by {max(diffs):.4g} at step {step + 1} "
                            f"(tolerance {tol:.4g}): {ours[step]:.4f} vs {ref[step]:.4f}")  # fmt: skip
        head, tail = sum(ours[:5]) / 5, sum(ours[-5:]) / 5
        if not tail < 0.95 * head:
            problems.append(f"the loss did not fall: first 5 steps {head:.4f}, last 5 {tail:.4f}")
    asked = runs["ours"]["attention_asked"]
    if runs["ours"]["attention"] != asked:
        problems.append(f"the guard replaced our {asked} attention by {runs['ours']['attention']}")
    if problems:
        raise PartFailed("; ".join(problems), results)
    return results
