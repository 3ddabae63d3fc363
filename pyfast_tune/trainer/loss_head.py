"""The LM head computes the loss: fused linear cross-entropy inside ``lm_head``'s own forward.

Training never needs the (tokens × vocabulary) logits, only their cross-entropy, so for the
duration of one forward the output embedding's ``forward`` is swapped for one that returns
``linear_cross_entropy(hidden, lm_head.weight, targets, lm_head.bias, weights=...)`` — the
loss, a scalar — which the model's own forward then hands back as ``out.logits``.

Doing it *inside* the head's forward, rather than calling the decoder body and the weight
ourselves, keeps every wrapper around the model working unchanged: the DeepSpeed engine's
forward; ZeRO-3, whose forward hooks gather the head's weight (the full, gathered weight is
what the op sees) and whose backward hook on the head's output — now the loss — gathers it
again before the gradient reaches it; peft; tied embeddings (the weight is the shared
parameter, autograd adds both uses).

It applies to any causal LM whose output embedding is a plain ``torch.nn.Linear`` and which
returns that layer's output unchanged as its logits. Otherwise — a LoRA-adapted or quantised
head, a config that scales or soft-caps logits (Gemma 2's ``final_logit_softcapping``,
Cohere's ``logit_scale``, Granite's ``logits_scaling``, ...), or any other processing a probe
forward reveals — training uses the plain logits path, with one warning naming the reason.
Soft-capped models fall back too although the op can soft-cap: the model's forward applies
its cap to whatever the head returns, and editing its config in flight would be a hack.

>>> head = fused_loss_head(model)                     # doctest: +SKIP
>>> with head.computing_loss(targets, weights):       # doctest: +SKIP
...     loss = model(**inputs).logits
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch

from pyfast_tune.kernels.linear_cross_entropy import linear_cross_entropy
from pyfast_tune.trainer.batches import IGNORE

log = logging.getLogger(__name__)

# Config keys with which transformers' models scale or cap the head's output (nested under
# text_config in multimodal configs). Scales equal to 1 change nothing.
_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
_CAPS = ("final_logit_softcapping", "softcap")
_PROBE_TOKENS = 16

_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine and/or a peft wrapper."""
    m = model
    for _ in range(4):
        if "module" in m._modules and hasattr(m, "zero_optimization_stage"):  # DeepSpeedEngine
            m = m._modules["module"]
        elif hasattr(m, "get_base_model") and hasattr(m, "peft_config"):
            m = m.get_base_model()
        else:
            break
    return m


class FusedLossHead:
    """An output embedding that can return the loss instead of logits (see the module doc)."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head

    @contextlib.contextmanager
    def computing_loss(self, targets: torch.Tensor, weights: torch.Tensor | None,
                       reduction: str = "sum"):  # fmt: skip
        """While inside, ``head(hidden)`` returns ``Σ_t weights[t] * CE(hidden[t] Wᵀ + b, targets[t])``.

        targets: (T,) int64 (-100 = none), weights: (T,) float; hidden: (..., T, H) with one
        row (training's packed batches are one row). ``reduction="none"`` (weights None): the
        (T,) per-token cross-entropies instead, 0 where the target is -100 — the negated
        log-probabilities the preference objectives sum per sequence.
        """
        head = self.head
        had_own = "forward" in head.__dict__
        previous = head.__dict__.get("forward")

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            h = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
            if h.shape[0] != targets.shape[0]:
                raise ValueError(
                    f"fused loss: the head got {h.shape[0]} positions for {targets.shape[0]} "
                    "targets (the model keeps only some logits?)"
                )
            w = head.weight
            return linear_cross_entropy(
                h.to(w.dtype), w, targets, head.bias, weights=weights, ignore_index=IGNORE,
                reduction=reduction,
            )  # fmt: skip

        head.forward = forward
        try:
            yield self
        finally:
            if had_own:
                head.forward = previous
            else:
                del head.forward


def _unsupported_reason(hf: torch.nn.Module) -> str | None:
    """Why the fused loss cannot apply to ``hf`` judging by its structure and config, or None."""
    get = getattr(hf, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return f"{type(hf).__name__} has no output embedding (get_output_embeddings() is None)"
    if type(head) is not torch.nn.Linear:
        return (
            f"its output embedding is a {type(head).__module__}.{type(head).__name__} "
            "(adapted, quantised or custom), not a plain torch.nn.Linear"
        )
    configs = [getattr(hf, "config", None)]
    text = getattr(configs[0], "text_config", None)
    if text is not None:
        configs.append(text)
    for cfg in configs:
        for key in _SCALES + _CAPS:
            value = getattr(cfg, key, None)
            if value is None or (key in _SCALES and value == 1):
                continue
            return f"the model's config sets {key}={value!r}, applied to the logits after lm_head"
    return None


def _probe_reason(model, hf, head, inputs: dict) -> str | None:
    """Run the model on the first few tokens: does it return the head's output unchanged?

    Catches logit processing no config key announces. It leaves no trace: RNG state is
    restored, so the next step draws the dropout masks it would have drawn without the probe,
    and it runs in training mode, since an eval-mode no-grad forward is a state change for
    some layers (bitsandbytes' Linear4bit on CPU repacks its weights for a bf16 inference
    kernel, which every later forward then uses).
    """
    n = int(min(_PROBE_TOKENS, int(inputs["cu_seq_lens_q"][1]), inputs["input_ids"].shape[-1]))
    device = inputs["input_ids"].device
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    # The probe runs on this process's own tokens: no sequence-parallel collectives.
    local = {k: v for k, v in inputs.items() if k != "sequence_parallel"}
    probe = dict(local, input_ids=inputs["input_ids"][:, :n],
                 position_ids=torch.arange(n, device=device)[None],
                 cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)  # fmt: skip
    seen = []
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    devices = [device] if device.type == "cuda" else []
    modes = {m: m.training for m in model.modules()}
    try:
        model.train()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            logits = model(**probe).logits
    finally:
        hook.remove()
        for m, training in modes.items():
            m.training = training
    if len(seen) != 1:
        return f"the model called its output embedding {len(seen)} times in one forward"
    out = seen[0]
    if logits.shape != out.shape or not torch.equal(logits.to(out.dtype), out):
        return "the model transforms the output embedding's result before returning logits"
    return None


def fused_loss_head(model: torch.nn.Module, inputs: dict) -> FusedLossHead | None:
    """The model's head as a ``FusedLossHead``, or None (plain logits) with one warning saying why.

    Decided once per model (structure, config, then one probe forward on ``inputs``' first
    sample); later calls return the cached decision.
    """
    hf = hf_model(model)
    if hf in _PLANS:
        return _PLANS[hf]
    reason = _unsupported_reason(hf)
    head = None if reason else hf.get_output_embeddings()
    if head is not None:
        reason = _probe_reason(model, hf, head, inputs)
    plan = FusedLossHead(head) if reason is None else None
    if plan is not None:
        log.info(
            "fused_loss: %s: the LM head computes the loss (fused linear cross-entropy); "
            "no logits are materialised",
            type(hf).__name__,
        )
    else:
        log.warning(
            "fused_loss: %s: %s; training on full logits instead (set fused_loss: false to "
            "silence this)",
            type(hf).__name__,
            reason,
        )
    _PLANS[hf] = plan
    return plan
