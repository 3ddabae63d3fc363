"""Preference objectives on per-pair sequence figures: DPO (and its loss variants), ORPO, SimPO
and the Bradley–Terry reward-model loss, with the metrics TRL logs.

Pure functions of tensors — no model, no batch layout — so the formulas can be checked
against TRL's one by one (tests/train/test_preference_objectives.py). Every function returns
per-pair values (shape ``(P,)``); the trainer sums them over a row's pairs and divides by the
pairs of the global batch, so each pair weighs the same whatever pack or rank it sits in.

The formulas and their names follow TRL 1.16: ``DPOTrainer._compute_loss`` for the DPO loss
types, ``ORPOTrainer.odds_ratio_loss`` (Hong et al. 2024, eqs. 4 and 7),
``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` (Meng et al. 2024, eq. 6) and
``RewardTrainer.compute_loss``.

>>> import torch
>>> pol = SequenceLogps(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([4.0]),
...                     torch.tensor([3.0]))
>>> ref = SequenceLogps(torch.tensor([-5.0]), torch.tensor([-5.0]), pol.chosen_tokens,
...                     pol.rejected_tokens)
>>> round(float(dpo_losses(pol, ref, beta=0.1, loss_type="sigmoid")[0]), 6)
0.598139
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfast_tune.choices import DPO_LOSS_TYPES


@dataclass
class SequenceLogps:
    """Per pair: the summed log-probabilities of the chosen and rejected completions (their
    trained tokens only) and how many tokens each sum covers. All (P,) float tensors."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def averages(self) -> tuple[Tensor, Tensor]:
        """Per-token means (ORPO, SimPO and IPO use these): (chosen, rejected)."""
        return (self.chosen / self.chosen_tokens.clamp(min=1.0),
                self.rejected / self.rejected_tokens.clamp(min=1.0))  # fmt: skip


def dpo_losses(pol: SequenceLogps, ref: SequenceLogps, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> Tensor:  # fmt: skip
    """Per-pair DPO loss of ``loss_type`` (Rafailov et al. 2023 and the variants TRL names).

    ``sigmoid``: -log σ(β Δ); ``hinge``: relu(1 - β Δ); ``ipo``: (Δ̄ - 1/(2β))² on per-token
    log-ratios (as TRL, confirmed with the IPO authors); ``robust``: the label-noise unbiased
    form (Chowdhury et al. 2024); ``sppo_hard``: SPPO with hard win probabilities;
    ``nca_pair``: NCA's pairwise form. Δ = (log π_c - log π_ref,c) - (log π_r - log π_ref,r).
    """
    chosen_ratio = pol.chosen - ref.chosen
    rejected_ratio = pol.rejected - ref.rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        if label_smoothing:
            # cDPO (Mitchell 2023): the labels are flipped with probability label_smoothing.
            return (-F.logsigmoid(beta * delta) * (1 - label_smoothing)
                    - F.logsigmoid(-beta * delta) * label_smoothing)  # fmt: skip
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        avg = (chosen_ratio / pol.chosen_tokens.clamp(min=1.0)
               - rejected_ratio / pol.rejected_tokens.clamp(min=1.0))  # fmt: skip
        return (avg - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "sppo_hard":
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if loss_type == "nca_pair":
        c, r = beta * chosen_ratio, beta * rejected_ratio
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Mächler 2012: switch at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(pol: SequenceLogps, beta: float) -> Tensor:
    """Per pair: ORPO's ``-β log σ(log odds(y_c) - log odds(y_r))`` on per-token mean
    log-probabilities; the trainer adds the NLL of the chosen completions."""
    avg_c, avg_r = (a.float() for a in pol.averages())
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    return -beta * F.logsigmoid(log_odds)


def simpo_losses(pol: SequenceLogps, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> Tensor:  # fmt: skip
    """Per pair: SimPO, ``-log σ(β (avg log π_c - avg log π_r) - γ)`` (label-smoothed as TRL)."""
    avg_c, avg_r = pol.averages()
    z = beta * (avg_c - avg_r) - gamma
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def reward_losses(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                  center_rewards_coefficient: float | None = None) -> Tensor:  # fmt: skip
    """Per pair: Bradley–Terry ``-log σ(r_c - r_r - margin)`` plus, as TRL's
    ``center_rewards_coefficient`` (Eisenstein et al. 2023), ``c (r_c + r_r)²``."""
    diff = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen + rejected) ** 2
    return loss


# The figures every objective logs, summed over pairs (divided by the pairs at the end), under
# TRL's names. Reward models have no log-probabilities: their logps entries are absent.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")  # fmt: skip


def pair_metrics(objective: str, beta: float, pol: SequenceLogps | None,
                 ref: SequenceLogps | None = None, scores: tuple[Tensor, Tensor] | None = None
                 ) -> dict[str, Tensor]:  # fmt: skip
    """Per-pair metric values (detached), as TRL computes them for each trainer.

    DPO: rewards β·(log π - log π_ref), logps summed; ORPO and SimPO: rewards β·avg log π,
    logps averaged per token (TRL's ORPO/CPO trainers log the averages); reward: the scores.
    """
    if objective == "reward":
        c, r = (s.detach() for s in scores)
        return {"rewards/chosen": c, "rewards/rejected": r,
                "rewards/accuracies": (c > r).to(c.dtype), "rewards/margins": c - r}  # fmt: skip
    if objective == "dpo":
        lc, lr = pol.chosen.detach(), pol.rejected.detach()
        c, r = beta * (lc - ref.chosen), beta * (lr - ref.rejected)
    else:
        lc, lr = (a.detach() for a in pol.averages())
        c, r = beta * lc, beta * lr
    return {"rewards/chosen": c, "rewards/rejected": r, "rewards/accuracies": (c > r).to(c.dtype),
            "rewards/margins": c - r, "logps/chosen": lc, "logps/rejected": lr}  # fmt: skip
