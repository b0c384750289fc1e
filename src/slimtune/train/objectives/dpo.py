"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) against the adapter-off reference.

    logratio  = log pi(y|x) - log pi_ref(y|x)         summed over completion tokens
    delta     = logratio(chosen) - logratio(rejected)
    sigmoid:  -(1-eps) log s(beta*delta) - eps log s(-beta*delta)   (eps = label_smoothing: cDPO)
    hinge:    relu(1 - beta*delta)                                   (SLiC)
    ipo:      (delta / n - 1/(2 beta))^2, delta per completion token (TRL's normalisation, which the
              IPO authors confirmed)
    rewards   = beta * logratio (summed), as TRL logs them
    + sft_weight * NLL of the chosen completion tokens (RPO; TRL's loss_type [.., "sft"])

With label_smoothing 0 these are TRL DPOTrainer's `sigmoid`, `hinge` and `ipo` losses
(tests/test_objective_trl.py checks the steps against it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..collectives import world_share
from .pairs import PairObjective


class DPO(PairObjective):
    name = "dpo"
    default_beta = 0.1  # the DPO paper's value; larger keeps the policy closer to the reference
    needs_reference = True
    default_loss = "sigmoid"

    def __init__(self, t) -> None:
        super().__init__(t)
        self.loss_type = t.loss_type or self.default_loss
        # sum (the DPO paper) unless asked; IPO normalises per token in its loss below
        self.normalize = bool(t.length_normalize) if t.length_normalize is not None else self.loss_type == "ipo"

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, ref = self.policy_and_ref(model, batch)
        n = self.lengths(batch)
        ratio = logps - ref
        c_ratio, r_ratio = ratio.chunk(2)
        c_n, r_n = n.chunk(2)
        if self.normalize:
            delta = c_ratio / c_n - r_ratio / r_n
        else:
            delta = c_ratio - r_ratio
        b, eps = self.beta, self.t.label_smoothing
        if self.loss_type == "sigmoid":
            per = -(1 - eps) * F.logsigmoid(b * delta) - eps * F.logsigmoid(-b * delta)
        elif self.loss_type == "hinge":
            per = torch.relu(1 - b * delta)
        else:  # ipo
            per = (delta - 1 / (2 * b)) ** 2
        c_logps, r_logps = logps.chunk(2)
        loss = per.mean()
        if self.t.sft_weight:  # RPO: the mean NLL over every chosen completion token of the batch
            loss = loss - self.t.sft_weight * c_logps.sum() / world_share(c_n.sum())  # global token mean
        return loss, self.pair_stats(b * c_ratio.detach(), b * r_ratio.detach(), c_logps, r_logps)


class IPO(DPO):
    """`objective: ipo` = DPO with loss_type ipo."""

    name = "ipo"
    default_beta = 0.1  # TRL's (IPO's tau); the squared loss targets a log-ratio gap of 1/(2 tau) per token
    default_loss = "ipo"
