"""One forward pass on a packed batch (model inputs, the weighted next-token loss) and one
optimizer step of a rank (its micro batches, forward, backward and DeepSpeed's step)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pyfast_tune.trainer import preference
from pyfast_tune.trainer.batches import IGNORE, PackedBatch, collate
from pyfast_tune.trainer.loss_head import fused_loss_head
from pyfast_tune.trainer.sequence_parallel import shard_row


def model_inputs(batch: PackedBatch, device: torch.device | str, sequence_parallel=None) -> dict:
    """Keyword arguments for a HF causal LM forward on one packed row (no attention mask).

    ``cu_seq_lens_q/k`` and ``max_length_q/k`` are the kwargs transformers forwards to the
    attention function (see ``pyfast_tune.patch``); position_ids restart at 0 per sample so
    rotary embeddings see each sample from position 0. ``sequence_parallel``: the group a
    sharded row (``sequence_parallel.shard_row``) attends with, forwarded to attention too.
    """
    cu = torch.from_numpy(batch.cu_seqlens).to(device)
    extra = {} if sequence_parallel is None else {"sequence_parallel": sequence_parallel}
    if hasattr(batch, "extra_inputs"):  # a LLaVA batch's images (pyfast_tune.vision.data)
        extra.update(batch.extra_inputs(device))
    return {
        **extra,
        "input_ids": torch.from_numpy(batch.input_ids).to(device).unsqueeze(0),  # (1, T)
        "position_ids": torch.from_numpy(batch.position_ids).to(device).unsqueeze(0),  # (1, T)
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": batch.max_seqlen,
        "max_length_k": batch.max_seqlen,
        "use_cache": False,
    }


def weighted_loss(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_t weights[t] * CE(logits[t], targets[t])`` in fp32.

    logits: (T, V) any float dtype, targets: (T,) int64 (-100 = none), weights: (T,) float.
    """
    ce = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")  # (T,)
    return (ce * weights.to(ce.dtype)).sum()


def batch_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    device: torch.device | str,
    fused: bool = True,
    sequence_parallel=None,
) -> torch.Tensor:
    """This row's share of the global-batch loss (summing all rows gives the batch loss).

    ``fused``: the LM head returns the loss itself (``pyfast_tune.trainer.loss_head``: fused
    linear cross-entropy, the (T, V) logits never exist) where the model allows it, else —
    and with ``fused=False`` — the loss of the model's full logits. Both compute the same sum.
    """
    inputs = model_inputs(batch, device, sequence_parallel)
    targets = torch.from_numpy(batch.targets).to(device)
    weights = torch.from_numpy(batch.weights).to(device)
    head = fused_loss_head(model, inputs) if fused else None
    if head is None:
        logits = model(**inputs).logits[0]  # (T, V)
        return weighted_loss(logits, targets, weights)
    with head.computing_loss(targets, weights):
        loss = model(**inputs).logits  # what the head returned: the loss
    if loss.dim() != 0:
        raise RuntimeError(
            f"fused loss: the model returned logits of shape {tuple(loss.shape)} where its head "
            "returned the loss; set fused_loss: false"
        )
    return loss


def optimizer_step(engine, dataset, order, step, topo, normalizer, flops, cfg, device,
                   reference=None):  # fmt: skip
    """This rank's micro batches of optimizer step ``step``, forward/backward/step each.

    Returns float64 [loss share, tokens, trained tokens, model FLOPs, padding tokens] of this
    rank; their sum over ranks is the step's global figures (the loss share sums to the
    global-batch loss). With sequence parallelism (``topo.sequence``) the rank trains on its
    shard of each row (``pyfast_tune.trainer.sequence_parallel``). A preference objective
    (``cfg.objective`` other than sft; ``normalizer`` is then a ``PairNormalizer`` and
    ``reference`` the DPO reference) appends the pairs and the sums of its metrics
    (``pyfast_tune.trainer.preference.row_loss``).
    """
    sp = topo.sequence
    paired = cfg.objective != "sft"
    micro_batches = order.micro_batches(step, topo.data_rank, topo.data_world, cfg.micro_batch_size)
    totals = torch.zeros(5 + (preference.NUM_FIGURES if paired else 0), dtype=torch.float64)
    for accum_index, pack_ids in enumerate(micro_batches):
        row = accum_index * topo.data_world + topo.data_rank  # the row's index in the global batch
        # Dropout masks depend on (seed, step, row) only: identical under any world size
        # (a shard of a sequence-parallel row draws its own: its rank is in the seed too).
        key = [cfg.seed, step, row] + ([sp.rank] if sp is not None else [])
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
        # a dataset may bring its own collate (LLaVA: the images beside the row)
        batch = getattr(dataset, "collate", collate)(
            [dataset[int(i)] for i in pack_ids], cfg.loss_reduction, 1 if paired else normalizer
        )
        if sp is not None:
            batch = shard_row(batch, sp.size, sp.rank)
        calls = sp.attention_calls if sp is not None else 0
        figures = None
        if paired:
            loss, reported, figures = preference.row_loss(engine, batch, device, cfg, normalizer,
                                                          reference, sp)  # fmt: skip
        else:
            loss = batch_loss(engine, batch, device, fused=cfg.fused_loss, sequence_parallel=sp)
            reported = loss.detach()
        if sp is not None:
            sp.require_attention_since(calls)
        # DeepSpeed divides by grad_accum and averages gradients over all ranks (the shards of
        # a sequence-parallel row too); undo both so the gradient is that of the global-batch
        # loss (the sum of all rows' and shards' shares).
        engine.backward(loss * (len(micro_batches) * topo.world))
        engine.step()
        row = torch.tensor(
            [
                float(reported),
                batch.num_tokens,
                batch.num_trained,
                flops.step_flops(batch.sample_lengths),
                batch.num_padding,
            ],
            dtype=torch.float64,
        )
        totals += row if figures is None else torch.cat([row, figures])
    return totals
