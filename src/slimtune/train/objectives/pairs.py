"""Preference pairs, shared by DPO / IPO / ORPO / SimPO: the batch is [chosen rows; rejected rows]
(one forward for both, as TRL's DataCollatorForPreference builds it), and the per-sequence
log-probabilities of the two completions.

    input_ids        (2B, T)   prompt + chosen, then prompt + rejected, right-padded
    completion_mask  (2B, T)   1 on completion tokens
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Objective, completion_logps, pad_right, reference


class PairObjective(Objective):
    data = "pairs"

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + \
               [e["prompt_ids"] + e["rejected_ids"] for e in examples]
        comp = [[0] * len(e["prompt_ids"]) + [1] * len(e["chosen_ids"]) for e in examples] + \
               [[0] * len(e["prompt_ids"]) + [1] * len(e["rejected_ids"]) for e in examples]
        batch = {"input_ids": pad_right(seqs, pad_id), "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
                 "completion_mask": pad_right(comp, 0)}
        if "ref_logps" in examples[0]:  # train.precompute_ref: (chosen, rejected) per row
            ref = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float32)
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch

    @staticmethod
    def token_logps(model, batch: dict[str, Any]) -> torch.Tensor:
        return completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])

    @staticmethod
    def lengths(batch: dict[str, Any]) -> torch.Tensor:
        return batch["completion_mask"][:, 1:].sum(1).clamp(min=1).float()

    def ref_logps(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """(2B,) summed completion log-probs under the reference: precomputed, or the adapter-off model."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with reference(self.reference_model(model)):
            return self.token_logps(self.reference_model(model), batch).sum(1)

    @torch.no_grad()
    def precompute(self, model, examples: list[dict[str, Any]], pad_id: int, batch_size: int, device) -> None:
        """Store each row's reference (chosen, rejected) log-probs in the row (train.precompute_ref): the
        model as training starts, its adapter on (a resumed adapter is its own reference, as TRL's
        "ref" adapter copy makes it), computed once before the first step."""
        from .base import to_device

        was = model.training
        model.eval()
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            b = to_device(self.collate([{k: v for k, v in e.items() if k != "ref_logps"} for e in chunk], pad_id),
                          device)
            lp = self.token_logps(model, b).sum(1).float().cpu()
            c, r = lp.chunk(2)
            for e, x, y in zip(chunk, c.tolist(), r.tolist()):
                e["ref_logps"] = (x, y)
        if was:
            model.train()

    @staticmethod
    def pair_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                   rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
        """What TRL logs per pair: rewards, their margin and accuracy, the policy log-probs."""
        return {"reward_accuracy": (chosen_rewards > rejected_rewards).float(),
                "reward_margin": (chosen_rewards - rejected_rewards).detach(),
                "rewards_chosen": chosen_rewards.detach(), "rewards_rejected": rejected_rewards.detach(),
                "logps_chosen": chosen_logps.detach(), "logps_rejected": rejected_logps.detach()}
