"""GRPO (Shao et al. 2024, DeepSeekMath): per prompt, a group of completions sampled with the adapter
(`generate` with the KV cache, the whole batch of prompts x num_generations in one call), scored by
the reward functions (rewards.py), and each completion's advantage is its reward against its group's:

    A_i      = (r_i - mean(r_group)) / (std(r_group) + 1e-4)          (std unbiased, as TRL)
    ratio    = pi(tok) / pi_old(tok)      (one update per sample: pi_old = pi detached, ratio 1, gradient A)
    loss_tok = -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) + beta * KL_tok
    KL_tok   = e^(ref - logp) - (ref - logp) - 1                      (k3 estimator; beta 0: no reference forward)
    loss     = sum over completion tokens / completion tokens in the batch   (TRL's default `dapo`)
               (several processes: over the whole batch, collectives.world_share)

The completion ends at its first EOS (kept, later tokens masked). `policy_loss` and
`group_advantages` equal TRL GRPOTrainer's given the same completions and rewards
(tests/test_objective_trl.py).

The fast path, where the model allows it (shared.status: a plain LM head, a 4-D mask; the trainer
turns it on, `train.chunked_ce=off` turns it off): sampling runs the N prompts' KV cache once and
repeats it per completion instead of `generate(num_return_sequences=G)` running each prompt G
times, and the loss puts a prompt and its G completions in one row (shared.group_collate), so the
prompt goes through the model once, not G times; both equal the plain path
(tests/test_objective_grpo_fast.py). The held-out evaluation adds `top_share` and
`reward_balanced` (collapse_metrics): what a model that answers every prompt alike cannot fake.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from ..collectives import world_share
from .base import Objective, completion_logps, reference
from . import rewards as R
from . import shared


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(N,) rewards of N/group prompts x group completions -> group-normalised advantages."""
    g = rewards.view(-1, group)
    mean = g.mean(1, keepdim=True)
    std = g.std(1, keepdim=True)  # unbiased, as TRL's nanstd
    return ((g - mean) / (std + 1e-4)).reshape(-1)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                beta: float = 0.0, ref_logps: torch.Tensor | None = None, eps_low: float = 0.2,
                eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean KL per completion token): the clipped surrogate over (N, C) completion tokens."""
    eps_high = eps_low if eps_high is None else eps_high
    coef1 = torch.exp(logps - old_logps)
    coef2 = torch.clamp(coef1, 1 - eps_low, 1 + eps_high)
    a = advantages.unsqueeze(1)
    per_tok = -torch.min(coef1 * a, coef2 * a)
    m = mask.to(logps.dtype)
    kl = logps.new_zeros(())
    if beta != 0.0:
        d = ref_logps - logps
        per_kl = torch.exp(d) - d - 1
        per_tok = per_tok + beta * per_kl
        kl = ((per_kl * m).sum() / m.sum().clamp(min=1.0)).detach()
    n = world_share(m.sum()).clamp(min=1.0)  # the global batch's completion tokens (TRL's dapo), as one process
    return (per_tok * m).sum() / n, kl


class GRPO(Objective):
    name = "grpo"
    data = "prompts"
    default_beta = 0.0  # TRL's default: no KL term (DAPO, Dr GRPO), so no reference forward
    metric = "reward"
    shared = False  # one row per prompt and its group (shared.py); the trainer turns it on where the model allows

    def __init__(self, t) -> None:
        super().__init__(t)
        self.funcs = R.build(t.rewards)
        w = t.reward_weights
        if w is not None and len(w) != len(self.funcs):
            from ..config import JobConfigError

            raise JobConfigError(f"train.reward_weights has {len(w)} weights for {len(self.funcs)} rewards; give one "
                                 "per reward (or leave it out: all 1)")
        self.weights = torch.tensor(w if w is not None else [1.0] * len(self.funcs))
        self.tok = None  # set by the trainer
        self.needs_reference = self.beta != 0.0

    def metrics(self) -> list[str]:
        return ["reward"] + [f"reward_{n}" for n, _ in self.funcs] + ["completion_length", "top_share",
                                                                        "reward_balanced"]

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        n = max(len(e["prompt_ids"]) for e in examples)
        ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        for j, e in enumerate(examples):  # left-padded: generation continues every row at the same column
            L = len(e["prompt_ids"])
            ids[j, n - L:] = torch.tensor(e["prompt_ids"])
            mask[j, n - L:] = 1
        return {"input_ids": ids, "attention_mask": mask, "rows": examples}

    @torch.no_grad()
    def sample(self, model, batch: dict[str, Any], group: int, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(completion ids, completion mask), (N*group, C): sampled with the adapter and the KV cache."""
        was = model.training
        model.eval()
        try:
            kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=self.t.temperature, top_k=0,
                                                             top_p=1.0)
            kw.update(max_new_tokens=self.t.max_completion_length, pad_token_id=self.tok.pad_token_id, use_cache=True)
            ids, att = batch["input_ids"], batch["attention_mask"]
            cache = self._prefill(model, ids, att, group) if self.shared and group > 1 and ids.shape[1] > 1 else None
            if cache is not None:  # the prompts' cache once, copied per completion: generate runs the last token on
                out = model.generate(input_ids=ids.repeat_interleave(group, 0),
                                     attention_mask=att.repeat_interleave(group, 0), cache=cache, **kw)
            else:
                out = model.generate(input_ids=ids, attention_mask=att, num_return_sequences=group, **kw)
        finally:
            if was:
                model.train()
        comp = out[:, batch["input_ids"].shape[1]:]
        eos = self.tok.eos_token_id
        is_eos = comp == eos if eos is not None else torch.zeros_like(comp, dtype=torch.bool)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(comp[:, 0], comp.shape[1]))
        mask = (torch.arange(comp.shape[1], device=comp.device).unsqueeze(0) <= first.unsqueeze(1)).long()
        return comp, mask

    @staticmethod
    def _prefill(model, ids: torch.Tensor, att: torch.Tensor, group: int):
        """The KV cache of the N prompts but their last token, run once and repeated per completion
        (`generate(num_return_sequences=G)` would run every prompt G times); None for prompt learning
        (its virtual tokens go in front of the cache: generate builds that cache itself)."""
        cfg = getattr(model, "active_peft_config", None)
        if getattr(cfg, "is_prompt_learning", False):
            return None
        pos = (att.cumsum(1) - 1).clamp(min=0)  # the positions generate gives left-padded rows
        out = model(input_ids=ids[:, :-1], attention_mask=att[:, :-1], position_ids=pos[:, :-1], use_cache=True)
        out.cache.batch_repeat_interleave(group)
        return out.cache

    def score(self, rows: list[dict[str, Any]], comp: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
        """(N*group, F) rewards of the decoded completions."""
        texts = self.tok.batch_decode(comp * mask + self.tok.pad_token_id * (1 - mask), skip_special_tokens=True)
        reps = [r for r in rows for _ in range(group)]
        keys = sorted({k for r in reps for k in r["columns"]})
        cols = {k: [r["columns"].get(k) for r in reps] for k in keys}
        return R.score(self.funcs, [r["prompt"] for r in reps], texts, cols)

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        G = self.t.num_generations
        gen_model = self.reference_model(model)
        comp, cmask = self.sample(gen_model, batch, G)
        per_fn = self.score(batch["rows"], comp, cmask, G).to(comp.device)
        rewards = (per_fn * self.weights.to(per_fn.device)).sum(1)  # not a matmul: autocast would round it to bf16
        adv = group_advantages(rewards, G)
        logps, ref = self.logps(model, gen_model, batch, comp, cmask)
        loss, kl = policy_loss(logps, logps.detach(), adv, cmask, self.beta, ref, self.t.clip_epsilon)
        stats = {"reward": rewards, "completion_length": cmask.sum(1).float(), "kl": kl.reshape(1)}
        stats.update({f"reward_{n}": per_fn[:, i] for i, (n, _) in enumerate(self.funcs)})
        return loss, stats

    def use_shared_prompt(self, model, log=print) -> tuple[bool, str]:
        """Turn on the one-row-per-group layout (shared.group_collate) and the prompts' KV cache once
        per group when sampling, where `model` allows it; (on, why)."""
        self.shared, why = shared.status(model)
        return self.shared, why.replace("per pair, chosen and rejected beside it", "per group, its completions "
                                        "beside it") if self.shared else why

    def logps(self, model, gen_model, batch: dict[str, Any], comp: torch.Tensor,
              cmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N*G, C) policy per-token log-probs of the sampled completions, and the reference's (adapter
        off) when beta != 0: one row per prompt and its group (shared.py), else G rows per prompt."""
        G, C = self.t.num_generations, comp.shape[1]
        ref = None
        if self.shared:
            b = shared.group_collate([r["prompt_ids"] for r in batch["rows"]], comp, cmask, G, self.tok.pad_token_id)
            b = {k: v.to(comp.device) for k, v in b.items()}
            logps = shared.group_logps(model, b, comp.shape)
            if self.beta != 0.0:
                with reference(gen_model):
                    ref = shared.group_logps(gen_model, b, comp.shape)
            return logps, ref
        p_ids = batch["input_ids"].repeat_interleave(G, 0)
        p_mask = batch["attention_mask"].repeat_interleave(G, 0)
        ids, att = torch.cat([p_ids, comp], 1), torch.cat([p_mask, cmask], 1)
        full_mask = torch.cat([torch.zeros_like(p_mask), cmask], 1)
        logps = completion_logps(model, ids, att, full_mask)[:, -C:]
        if self.beta != 0.0:
            with reference(gen_model):
                ref = completion_logps(gen_model, ids, att, full_mask)[:, -C:]
        return logps, ref

    @torch.no_grad()
    def evaluate(self, model, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                 device: torch.device) -> dict[str, float]:
        """The held-out reward: one greedy completion per validation prompt, scored by the same functions."""
        from .base import to_device

        per, lens, texts = [], [], []
        gen_model = self.reference_model(model)
        for i in range(0, len(examples), batch_size):
            b = to_device(self.collate(examples[i:i + batch_size], pad_id), device)
            comp, mask = self.sample(gen_model, b, 1, greedy=True)
            per.append(self.score(b["rows"], comp, mask, 1))
            lens.append(mask.sum(1).float().cpu())
            texts += self.tok.batch_decode(comp * mask + self.tok.pad_token_id * (1 - mask), skip_special_tokens=True)
        s = torch.cat(per)
        total = (s * self.weights).sum(1)  # fp32 (a matmul would autocast)
        res = {"reward": float(total.mean())}
        res.update({f"reward_{n}": float(s[:, i].mean()) for i, (n, _) in enumerate(self.funcs)})
        res["completion_length"] = float(torch.cat(lens).mean())
        res.update(collapse_metrics(total, texts, [e["columns"].get("answer") for e in examples]))
        return res


def collapse_metrics(rewards: torch.Tensor, texts: list[str], answers: list[Any]) -> dict[str, float]:
    """What a model that gives every prompt the same answer cannot fake: `top_share`, the share of
    the most common completion (its first word, lower-cased: 1.0 is a collapse), and
    `reward_balanced`, the mean reward per distinct answer averaged over the
    answers (balanced accuracy for an exact-match reward: always naming the majority answer of two
    scores 0.5 however skewed the split; with no `answer` column it is the plain mean reward)."""
    firsts = [(re.findall(r"[\w'-]+", t.lower()) or [""])[0] for t in texts]
    out = {"top_share": max(Counter(firsts).values()) / max(len(firsts), 1)}
    keys = [str(a).strip().lower() for a in answers]  # rows without an answer are one class of their own
    by = {k: [float(rewards[i]) for i, a in enumerate(keys) if a == k] for k in set(keys)}
    out["reward_balanced"] = sum(sum(v) / len(v) for v in by.values()) / max(len(by), 1)
    return out
