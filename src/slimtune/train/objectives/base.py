"""What every objective shares: per-token log-probs of completions, the reference model (the same
model with its adapters off), and the interface the trainer calls.

    examples = obj.encode(rows)                # rows (TRL's formats) -> token ids, one message per bad row
    batch = obj.collate(examples, pad_id)      # padded tensors, completion_mask = 1 on completion tokens
    loss, stats = obj.loss(model, batch)       # stats: detached (rows,) tensors the log averages
    metrics = obj.evaluate(model, examples)    # held-out eval_loss, reward_accuracy, reward_margin, ...

The reference of DPO / IPO / KTO is `model.disable_adapter()` under no_grad: no second copy of the
model in memory. When the disabled state is not the reference (an adapter resumed from a checkpoint,
a method whose "off" is not the base), `train.precompute_ref` computes the reference log-probs once
at the start, before any step changes the model.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..config import TrainConfig


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     completion_mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) log-probability of each next token, zero outside completions.

    The LM head runs only at the positions that predict a completion token in some row
    (transformers' `logits_to_keep` as an index tensor): with short answers that is a few positions of
    a long prompt, so the (B, T, V) logits (1 GB for 50 rows of 100 tokens over a 49k vocabulary) are
    never built. Prompt-learning methods (prefix / prompt tuning) prepend virtual positions to the
    output; for them the whole output is computed and its last T positions are the real tokens. The
    log-softmax is gather - logsumexp, so no second vocabulary-sized tensor is allocated."""
    B, T = input_ids.shape
    target = input_ids[:, 1:]
    mask = completion_mask[:, 1:]
    cfg = getattr(model, "active_peft_config", None)
    keep = mask.any(0).nonzero().squeeze(1)  # (K,) positions t whose next token is a completion token
    try:
        if getattr(cfg, "is_prompt_learning", False):
            raise TypeError("virtual positions: logits_to_keep indices would be shifted")
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    except TypeError:  # prompt learning, or a model whose forward has no logits_to_keep: the whole output
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, -T:-1].float()  # (B, T-1, V): position t predicts token t+1
        tok = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return tok * mask.to(tok.dtype)
    logits = logits.float()  # (B, K, V)
    tgt = target[:, keep]
    part = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, K)
    out = part.new_zeros(B, T - 1)
    out[:, keep] = part
    return out * mask.to(out.dtype)


@contextlib.contextmanager
def reference(model):
    """The reference model: the adapters switched off, no gradients."""
    with torch.no_grad(), model.disable_adapter():
        yield


class Objective:
    """One training objective. Subclasses set `name`, `data` (the row format they read), and
    implement `loss`; `metric` is the held-out number that picks the best checkpoint."""

    name = ""
    data = ""  # "pairs" | "unpaired" | "prompts"
    default_beta = 0.1
    metric = "reward_accuracy"
    maximize = True
    needs_reference = False

    def __init__(self, t: TrainConfig) -> None:
        self.t = t
        self.beta = t.beta if t.beta is not None else self.default_beta
        self.ref_model = None  # set by the trainer: the unwrapped model whose adapters can be disabled

    def metrics(self) -> list[str]:
        return ["eval_loss", "reward_accuracy", "reward_margin"]

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def reference_model(self, model):
        return self.ref_model if self.ref_model is not None else model

    @torch.no_grad()
    def evaluate(self, model, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                 device: torch.device) -> dict[str, float]:
        """The held-out loss and reward statistics, averaged over rows (eval batches of `batch_size`)."""
        total: dict[str, float] = {}
        n_rows = 0
        loss_sum = 0.0
        for i in range(0, len(examples), batch_size):
            batch = to_device(self.collate(examples[i:i + batch_size], pad_id), device)
            loss, stats = self.loss(model, batch)
            rows = len(examples[i:i + batch_size])
            loss_sum += float(loss) * rows
            n_rows += rows
            for k, v in stats.items():
                total[k] = total.get(k, 0.0) + float(v.float().sum())
                total[k + "#n"] = total.get(k + "#n", 0.0) + v.numel()
        res = {"eval_loss": loss_sum / max(n_rows, 1)}
        res.update({k: total[k] / max(total[k + "#n"], 1) for k in total if not k.endswith("#n")})
        return res


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    """Right-padded (B, T) long tensor of ragged rows."""
    from torch.nn.utils.rnn import pad_sequence

    return pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True, padding_value=value)
