"""One forward pass on a packed batch: model inputs and the weighted next-token loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyfast_tune.trainer.batches import IGNORE, PackedBatch
from pyfast_tune.trainer.loss_head import fused_loss_head


def model_inputs(batch: PackedBatch, device: torch.device | str, sequence_parallel=None) -> dict:
    """Keyword arguments for a HF causal LM forward on one packed row (no attention mask).

    ``cu_seq_lens_q/k`` and ``max_length_q/k`` are the kwargs transformers forwards to the
    attention function (see ``pyfast_tune.patch``); position_ids restart at 0 per sample so
    rotary embeddings see each sample from position 0. ``sequence_parallel``: the group a
    sharded row (``sequence_parallel.shard_row``) attends with, forwarded to attention too.
    """
    cu = torch.from_numpy(batch.cu_seqlens).to(device)
    extra = {} if sequence_parallel is None else {"sequence_parallel": sequence_parallel}
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
