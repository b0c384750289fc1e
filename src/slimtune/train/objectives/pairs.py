"""Preference pairs, shared by DPO / IPO / ORPO / SimPO: the batch is [chosen rows; rejected rows]
(one forward for both, as TRL's DataCollatorForPreference builds it), and the per-sequence
log-probabilities of the two completions.

    input_ids        (2B, T)   prompt + chosen, then prompt + rejected, right-padded
    completion_mask  (2B, T)   1 on completion tokens

Where the model allows it (`use_shared_prompt`, set by the trainer), the batch is instead one row
per pair, the prompt computed once (shared.py): the same log-probs for about half the work when
answers are short. The reference log-probs of a pair do not change during a run (the adapter-off
model is the frozen base), so with `cache_ref` each row keeps them once computed: a pair met again
(a later epoch, every evaluation) costs the policy's forward only.
"""
from __future__ import annotations

from typing import Any

import torch

from . import shared
from .base import Objective, completion_logps, pad_right, reference


class PairObjective(Objective):
    data = "pairs"
    shared = False  # one row per pair (shared.py); the trainer turns it on where the model allows
    cache_ref = False  # keep each row's reference log-probs once computed (the adapter-off reference)
    prefix = None  # shared.Prefix: blocks below the first adapted one once for policy and reference

    def use_shared_prompt(self, model, log=print) -> tuple[bool, str]:
        """Turn on the one-row-per-pair layout where `model` allows it (and, for an objective with
        a reference, the frozen prefix once per step); (on, why) for the log."""
        self.shared, why = shared.status(model)
        if self.shared and self.needs_reference:
            self.prefix = shared.Prefix(model, log)
            why += (f"; blocks 0..{self.prefix.k - 1} once for policy and reference ({self.prefix.why})"
                    if self.prefix.on else f"; every block for policy and reference ({self.prefix.why})")
        return self.shared, why

    def policy_and_ref(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) policy and reference log-probs. A reference not yet known runs first when the frozen
        prefix is shared, so the policy starts from its block-k input."""
        if "ref_logps" in batch or "pair_mask" not in batch or self.prefix is None or not self.prefix.on:
            return self.seq_logps(model, batch), self.ref_logps(model, batch)
        pol, ref = shared.policy_and_reference(model, self.reference_model(model), batch, self.prefix)
        self._keep(batch, ref)
        return pol, ref

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        batch = shared.collate(examples, pad_id) if self.shared else self._padded(examples, pad_id)
        if all("ref_logps" in e for e in examples):  # precomputed or kept: (chosen, rejected) per row
            ref = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float32)
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        elif self.cache_ref:
            batch["rows"] = examples  # ref_logps() writes each row's reference back
        return batch

    @staticmethod
    def _padded(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + \
               [e["prompt_ids"] + e["rejected_ids"] for e in examples]
        comp = [[0] * len(e["prompt_ids"]) + [1] * len(e["chosen_ids"]) for e in examples] + \
               [[0] * len(e["prompt_ids"]) + [1] * len(e["rejected_ids"]) for e in examples]
        return {"input_ids": pad_right(seqs, pad_id), "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
                "completion_mask": pad_right(comp, 0)}

    @staticmethod
    def seq_logps(model, batch: dict[str, Any]) -> torch.Tensor:
        """(2B,) summed completion log-probs, chosen rows then rejected rows, in either layout."""
        if "pair_mask" in batch:
            return shared.seq_logps(model, batch)
        return completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum(1)

    @staticmethod
    def lengths(batch: dict[str, Any]) -> torch.Tensor:
        if "n_tokens" in batch:
            return batch["n_tokens"]
        return batch["completion_mask"][:, 1:].sum(1).clamp(min=1).float()

    def ref_logps(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """(2B,) summed completion log-probs under the reference: precomputed or kept, else the
        adapter-off model (then kept in the rows under cache_ref)."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        ref_model = self.reference_model(model)
        with reference(ref_model):
            out = self.seq_logps(ref_model, batch).float()
        self._keep(batch, out)
        return out

    @staticmethod
    def _keep(batch: dict[str, Any], ref: torch.Tensor) -> None:
        """cache_ref: each row keeps its reference log-probs (the batch carries its rows)."""
        rows = batch.get("rows")
        if rows is not None:
            c, r = ref.detach().cpu().chunk(2)
            for e, x, y in zip(rows, c.tolist(), r.tolist()):
                e["ref_logps"] = (x, y)

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
            clean = [{k: v for k, v in e.items() if k != "ref_logps"} for e in chunk]
            b = to_device(shared.collate(clean, pad_id) if self.shared else self._padded(clean, pad_id), device)
            lp = self.seq_logps(model, b).float().cpu()
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
