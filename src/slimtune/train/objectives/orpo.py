"""ORPO (Hong et al. 2024): no reference model; the SFT loss on the chosen completion plus an
odds-ratio term that pushes the chosen answer's odds above the rejected one's.

    logp      = mean log pi(y|x) over completion tokens (length-normalised, as the paper)
    log_odds  = (logp_c - logp_r) - (log(1 - e^logp_c) - log(1 - e^logp_r))
    loss      = NLL(chosen completion tokens) - beta * mean(log s(log_odds))
    rewards   = beta * logp

The odds-ratio term, rewards and log-probs equal TRL's ORPOTrainer.odds_ratio_loss /
get_batch_logps (tests/test_objective_trl.py). Its NLL is on the chosen completion's tokens (the
paper's L_SFT; TRL's trainer also counts the prompt tokens).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..collectives import world_share
from .pairs import PairObjective


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class ORPO(PairObjective):
    name = "orpo"
    default_beta = 0.1  # the paper's lambda: the odds-ratio term's weight beside the SFT loss

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = self.seq_logps(model, batch)
        n = self.lengths(batch)
        mean = total / n
        c, r = mean.chunk(2)
        c_sum, _ = total.chunk(2)
        c_n, _ = n.chunk(2)
        nll = -c_sum.sum() / world_share(c_n.sum())  # the global batch's token mean under several processes
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
        ratio = F.logsigmoid(log_odds)
        stats = self.pair_stats(self.beta * c.detach(), self.beta * r.detach(), c, r)
        stats["log_odds"] = log_odds.detach()
        return nll - self.beta * ratio.mean(), stats
