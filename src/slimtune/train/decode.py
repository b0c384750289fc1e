"""Greedy generation for held-out evaluation, from the pass that measured the loss.

The loss pass already runs each validation example — prompt, then the reference answer — through
the model. Greedy decoding from the prompt picks, at each step, the argmax of the next-token
logits; while its picks equal the reference's tokens, those logits are exactly the ones the loss
pass computed at the reference's positions (same prefix, same model). So the reference is a free
draft, verified in one pass (speculative decoding with the answer as the draft model):

    picks = verify(lm, h, items)          # argmax at the reference's positions, until the first miss
    more = continue_from_cache(...)       # rows that missed: decode on from the pass's KV cache

A trained model that answers right costs no generation step at all. A row that leaves the
reference at step j continues from the loss pass's KV cache, masked to the prompt and the j
accepted tokens (the rest of the reference is hidden by the attention mask; RoPE positions are
given), one batched step per token. Where the pass kept no KV cache (it started at the prefix
cache's block k), those rows are generated afresh by `generate`.

It is greedy decoding as `generate(do_sample=False)` does it: stop at the generation config's end
tokens, at most max_new_tokens. `plain_greedy` refuses configs whose logits processors change the
picks (repetition penalty, banned words, forced tokens...); the evaluation then uses `generate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


# GenerationConfig fields that change what greedy picks; any of them set -> use generate()
_PROCESSORS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
               "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
               "min_length", "min_new_tokens", "sequence_bias", "exponential_decay_length_penalty",
               "renormalize_logits", "force_words_ids", "constraints", "guidance_scale", "watermarking_config")


def plain_greedy(gen_config: Any) -> tuple[bool, str]:
    """Whether greedy decoding under this generation config is the plain argmax (no processors)."""
    if gen_config is None:
        return True, ""
    from transformers import GenerationConfig

    base = GenerationConfig()
    for k in _PROCESSORS:
        v = getattr(gen_config, k, None)
        if v is not None and v != getattr(base, k, None):
            return False, f"generation_config.{k}={v!r} changes what greedy decoding picks"
    return True, ""


def stop_tokens(gen_config: Any, tok) -> set[int]:
    eos = getattr(gen_config, "eos_token_id", None) if gen_config is not None else None
    if eos is None:
        eos = tok.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


@dataclass
class Row:
    """One generation: batch row r of the loss pass, its prompt length, its example's tokens."""
    key: Any
    r: int
    prompt_len: int
    ids: list[int]  # the whole example (prompt + reference), as the loss pass saw it
    budget: int  # max new tokens
    out: list[int] = field(default_factory=list)
    resume: int | None = None  # set when the row left the reference: tokens of the pass to keep (prompt + accepted)


def verify(lm, h: torch.Tensor, rows: list[Row], stop: set[int]) -> None:
    """Fill each row's greedy picks along its reference; mark rows that need more decoding."""
    where: list[tuple[int, int]] = []
    spans = []
    for row in rows:
        last = min(row.budget - 1, len(row.ids) - row.prompt_len)  # the last draft position to read
        spans.append((len(where), last + 1))
        where += [(row.r, row.prompt_len - 1 + j) for j in range(last + 1)]
    if not where:
        return
    r_idx = torch.tensor([w[0] for w in where], device=h.device)
    p_idx = torch.tensor([w[1] for w in where], device=h.device)
    picks = lm.logits(h[r_idx, p_idx]).argmax(-1).tolist()
    for row, (start, n) in zip(rows, spans):
        for j in range(n):
            t = picks[start + j]
            row.out.append(t)
            if t in stop or len(row.out) >= row.budget:
                break
            pos = row.prompt_len + j  # the reference token at this step
            if pos >= len(row.ids) or row.ids[pos] != t:  # off the reference (or past its end): decode on
                row.resume = pos
                break


@torch.no_grad()
def continue_from_cache(lm, cache: Any, length: int, rows: list[Row], stop: set[int]) -> None:
    """Greedy steps for rows that left the reference, from the loss pass's KV cache (batch rows
    `row.r`, `length` positions): the cache is masked to each row's first `row.resume` tokens."""
    if not rows:
        return
    dev = next(lm.decoder.parameters()).device
    cache.batch_select_indices(torch.tensor([row.r for row in rows], device=dev))
    keep = torch.tensor([row.resume for row in rows], device=dev)
    mask = (torch.arange(length, device=dev)[None, :] < keep[:, None]).long()
    tok = torch.tensor([[row.out[-1]] for row in rows], device=dev)
    pos = keep[:, None].clone()
    alive = [True] * len(rows)
    for _ in range(max(row.budget - len(row.out) for row in rows)):
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=dev)], 1)
        h = lm.decoder(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True,
                       **{lm.cache_kw: cache}).last_hidden_state[:, -1]
        nxt = lm.logits(h).argmax(-1)
        for i, (row, t) in enumerate(zip(rows, nxt.tolist())):
            if alive[i]:
                row.out.append(t)
                alive[i] = t not in stop and len(row.out) < row.budget
        if not any(alive):
            break
        tok, pos = nxt[:, None], pos + 1


def finished(tokens: list[int], stop: set[int]) -> list[int]:
    """The generated tokens up to and including the first end token."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i + 1]
    return tokens
