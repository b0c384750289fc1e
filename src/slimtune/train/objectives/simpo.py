"""SimPO (Meng et al. 2024): no reference model; the length-averaged log-prob is the reward, with a
target margin gamma.

    logp     = mean log pi(y|x) over completion tokens
    loss     = -(1-eps) log s(beta*(logp_c - logp_r) - gamma) - eps log s(-(beta*(logp_c - logp_r) - gamma))
    rewards  = beta * logp

This is TRL's CPO loss with loss_type simpo and cpo_alpha 0 (tests/test_objective_trl.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .pairs import PairObjective


class SimPO(PairObjective):
    name = "simpo"
    default_beta = 2.0  # the paper's range 2.0-2.5: its rewards are per-token averages, so beta is larger than DPO's

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        normalize = self.t.length_normalize is not False  # averaging is what SimPO is; false sums (ablation)
        logp = self.seq_logps(model, batch) / (self.lengths(batch) if normalize else 1.0)
        c, r = logp.chunk(2)
        logits = self.beta * (c - r) - self.t.simpo_gamma
        eps = self.t.label_smoothing
        per = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return per.mean(), self.pair_stats(self.beta * c.detach(), self.beta * r.detach(), c, r)
