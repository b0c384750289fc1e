"""KTO (Ethayarajh et al. 2024): unpaired rows, each completion desirable or not.

    logratio = log pi(y|x) - log pi_ref(y|x)                 summed over completion tokens
    z        = max(0, mean over the batch of logratio(x_i, y_{i-1}))   (detached)
               the KL estimate from mismatched pairs: completions rotated by one within the batch,
               as TRL's KTOTrainer builds them; under several processes the rotation and the mean
               are the global micro-batch's (one process's numbers, tests/test_distributed_objectives.py)
    desirable:    w_d * (1 - s(beta * (logratio - z)))
    undesirable:  w_u * (1 - s(beta * (z - logratio)))
    loss     = mean over rows; rewards = beta * logratio

Equal to TRL KTOTrainer's `kto` loss (tests/test_objective_trl.py), in either layout: TRL's (each
row and its KL row padded, four forwards) or, where the model allows, shared.py's one row per example
(the prompt once, the completion and the KL completion beside it; one policy and one reference
forward, the frozen blocks below the first adapter once for both; tests/test_objective_kto_fast.py).
"""
from __future__ import annotations

from typing import Any

import torch

from ..collectives import world_mean, world_sum
from . import shared
from .base import Objective, completion_logps, pad_right, reference


def _seqs(prompts: list[list[int]], comps: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    seqs = [p + c for p, c in zip(prompts, comps)]
    return {"input_ids": pad_right(seqs, pad_id), "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
            "completion_mask": pad_right([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, comps)], 0)}


class KTO(Objective):
    name = "kto"
    data = "unpaired"
    default_beta = 0.1  # the KTO paper's value
    needs_reference = True
    shared = False  # the one-row layout (shared.py); the trainer turns it on where the model allows
    prefix = None  # shared.Prefix: blocks below the first adapted one once for policy and reference

    def use_shared_prompt(self, model, log=print) -> tuple[bool, str]:
        """Turn on the one-row layout where `model` allows it: each prompt once with its completion
        and its mismatched KL completion beside it, the head only at completion tokens, and the frozen
        blocks below the first adapter once for policy and reference. (on, why) for the log."""
        self.shared, why = shared.status(model)
        if not self.shared:
            return False, why
        self.prefix = shared.Prefix(model, log)
        return True, ("each prompt once, its completion and the KL term's mismatched completion beside it (one "
                      "row), the head only at completion tokens; " +
                      (f"blocks 0..{self.prefix.k - 1} once for policy and reference ({self.prefix.why})"
                       if self.prefix.on else f"every block for policy and reference ({self.prefix.why})"))

    def metrics(self) -> list[str]:
        return ["eval_loss", "reward_accuracy", "reward_margin", "kl"]

    def collate(self, examples: list[dict[str, Any]], pad_id: int, before: dict[str, Any] | None = None) -> dict[str, Any]:
        """The rows and their KL rows (x_i, y_{i-1}). `before`: under several processes, the row
        preceding this rank's first one in the global micro-batch (the previous rank's last; rank
        0: the global batch's last), so the mismatched pairs are one process's on the whole batch."""
        if len(examples) < 2 and before is None:
            from ..config import JobConfigError

            raise JobConfigError("KTO's KL estimate pairs each prompt with another row's completion: train.batch_size "
                                 "and eval.batch_size must be at least 2")
        prompts = [e["prompt_ids"] for e in examples]
        comps = [e["completion_ids"] for e in examples]
        last = [before["completion_ids"]] if before is not None else comps[-1:]
        kl_comps = last + comps[:-1]  # (x_i, y_{i-1})
        if self.shared:
            batch = shared.collate_unpaired(examples, kl_comps, pad_id)
        else:
            batch = _seqs(prompts, comps, pad_id)
            batch.update({f"kl_{k}": v for k, v in _seqs(prompts, kl_comps, pad_id).items()})
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
        return batch

    @staticmethod
    def _logps(model, batch: dict[str, Any], prefix: str = "") -> torch.Tensor:
        return completion_logps(model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                                batch[prefix + "completion_mask"]).sum(1)

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ref_model = self.reference_model(model)
        if "pair_mask" in batch:  # one row: completion and KL completion in one forward each for policy and reference
            pol, ref_all = shared.policy_and_reference(model, ref_model, batch, self.prefix)
            logps, kl_logps = pol.chunk(2)
            kl_logps = kl_logps.detach()
            ref, ref_kl = ref_all.chunk(2)
        else:
            logps = self._logps(model, batch)
            with torch.no_grad():
                kl_logps = self._logps(model, batch, "kl_")
            with reference(ref_model):
                ref = self._logps(ref_model, batch)
                ref_kl = self._logps(ref_model, batch, "kl_")
        z = world_mean((kl_logps - ref_kl).mean().detach()).clamp(min=0)  # the global batch's, as TRL gathers it
        ratio = logps - ref
        lab = batch["label"]
        b = self.beta
        desirable = 1 - torch.sigmoid(b * (ratio - z))
        undesirable = 1 - torch.sigmoid(b * (z - ratio))
        per = torch.where(lab, self.t.desirable_weight * desirable, self.t.undesirable_weight * undesirable)
        rewards = b * ratio.detach()
        ch, rj = rewards[lab], rewards[~lab]
        # the margin of the global batch's means (a rank may hold few or no rows of a label)
        cs, cn, rs, rn = world_sum(torch.stack([ch.sum(), lab.sum().to(ch.dtype), rj.sum(), (~lab).sum().to(ch.dtype)]))
        stats = {"reward_accuracy": ((rewards > 0) == lab).float(),
                 "reward_margin": (cs / cn.clamp(min=1) - rs / rn.clamp(min=1)).reshape(1),
                 "rewards_chosen": ch, "rewards_rejected": rj, "kl": z.reshape(1),
                 "logps_chosen": logps.detach()[lab], "logps_rejected": logps.detach()[~lab]}
        return per.mean(), stats
