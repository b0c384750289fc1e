"""Next tokens for a batch of rows, each with its own sampling options, in tensor ops.

    logits (B, V) -> tokens (B,)
    1. logit_bias (a dense (B, V) bias, only while some row has one)
    2. penalties on what the row has seen (vLLM's definitions):
         repetition_penalty r: a seen token's logit l becomes l / r if l > 0 else l * r
                               (seen = in the prompt or generated)
         frequency_penalty f, presence_penalty p: l -= f * count + p * (count > 0)
                               (count = times generated so far)
    3. temperature 0: argmax (greedy, what `slimtune generate` does); else, per sampled row:
       logits / T -> top_k -> softmax -> min_p (drop p < min_p * max p) -> top_p (the smallest set
       whose mass reaches top_p) -> draw with the exponential race argmax(p / E), E ~ Exp(1)
       (the same distribution as multinomial, one op for all rows)

Every option is a (B,) tensor and a neutral value (top_k 0, min_p 0, penalties 0 / 1) leaves a row
as it was, so rows with and without options share one batch. The (B, V) state (bias, seen tokens,
counts) exists only while some row of the batch needs it: `row_state` builds it for new rows, the
engine concatenates and index-selects it with the other per-row tensors, and `record` counts each
step's tokens with one scatter_add.

A row with a `seed` draws its noise from its own generator, so its output does not depend on
which other requests share its batch; rows without one share the engine's generator.
"""
from __future__ import annotations

import torch

DENSE = ("bias", "seen", "counts")  # (B, V) state; absent = every row neutral


def row_state(reqs, vocab: int, device) -> dict[str, torch.Tensor]:
    """Per-row tensors for new rows (GenRequest-like: temperature, top_p, top_k, min_p, penalties,
    logit_bias, prompt), with the (B, V) state only where a row needs it."""
    f = lambda name: torch.tensor([float(getattr(r, name)) for r in reqs], device=device)  # noqa: E731
    t = {"temp": f("temperature"), "top_p": f("top_p"), "min_p": f("min_p"), "rep": f("repetition_penalty"),
         "freq": f("frequency_penalty"), "pres": f("presence_penalty"),
         "top_k": torch.tensor([int(r.top_k) for r in reqs], dtype=torch.long, device=device)}
    n = len(reqs)
    if any(r.logit_bias for r in reqs):
        bias = torch.zeros(n, vocab, device=device)
        rows = [(i, tok, v) for i, r in enumerate(reqs) for tok, v in (r.logit_bias or {}).items()]
        idx = torch.tensor([(i, tok) for i, tok, _ in rows], dtype=torch.long, device=device)
        bias[idx[:, 0], idx[:, 1]] = torch.tensor([v for _, _, v in rows], device=device)
        t["bias"] = bias
    if any(r.repetition_penalty != 1 or r.frequency_penalty or r.presence_penalty for r in reqs):
        seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
        for i, r in enumerate(reqs):  # once per row at admission, not per step
            if r.repetition_penalty != 1:
                seen[i, torch.tensor(r.prompt, dtype=torch.long, device=device)] = True
        t["seen"], t["counts"] = seen, torch.zeros(n, vocab, device=device)
    return t


def cat_rows(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row tensors of two row sets, one after the other; (B, V) state one side lacks is neutral there."""
    out = {}
    for k in old.keys() | new.keys():
        a, b = old.get(k), new.get(k)
        if a is None:
            a = b.new_zeros((len(old["temp"]),) + tuple(b.shape[1:]))
        if b is None:
            b = a.new_zeros((len(new["temp"]),) + tuple(a.shape[1:]))
        out[k] = torch.cat([a, b])
    return out


def record(t: dict[str, torch.Tensor], tokens: torch.Tensor) -> None:
    """Count the tokens just chosen (B,) into the penalty state, when there is one."""
    if "counts" in t:
        t["counts"].scatter_add_(1, tokens[:, None], torch.ones_like(t["counts"][:, :1]))


def adjusted(logits: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits after logit_bias and the penalties (float32)."""
    lg = logits.float()
    if "bias" in t:
        lg = lg + t["bias"]
    if "counts" in t:
        c = t["counts"]
        rep = t["rep"][:, None]
        seen = t["seen"] | (c > 0)
        lg = torch.where(seen, torch.where(lg > 0, lg / rep, lg * rep), lg)
        lg = lg - t["freq"][:, None] * c - t["pres"][:, None] * (c > 0).float()
    return lg


def choose(logits: torch.Tensor, t: dict[str, torch.Tensor], reqs, generators) -> tuple[torch.Tensor, list | None,
                                                                                      list | None]:
    """One step's choice for a batch: (tokens (B,), where each row's grammar is complete (None
    without constrained rows), log-prob entries (None when no row asked)). Constrained rows
    (grammar.py) get their masks first; log-probs are of the model's own logits; the penalty
    state counts the chosen tokens."""
    from . import grammar, logprobs

    ms = [r.matcher for r in reqs]
    free = all(m is None for m in ms)
    tok = next_tokens(logits if free else grammar.constrain(logits, ms), t, generators)
    forced = None if free else grammar.advance(ms, tok.tolist())
    record(t, tok)
    ks = [r.logprobs for r in reqs]
    lps = logprobs.step_entries(logits, tok, ks) if any(k is not None for k in ks) else None
    return tok, forced, lps


def next_tokens(logits: torch.Tensor, t: dict[str, torch.Tensor],
                generators: list[torch.Generator | None] | None) -> torch.Tensor:
    """logits (B, V), the rows' tensors `t`, generators: one per sampled row (in row order) or None
    when no row samples. Returns (B,) long."""
    lg = adjusted(logits, t)
    out = lg.argmax(dim=-1)  # (B,)
    temperature = t["temp"]
    sampled = (temperature > 0).nonzero().flatten()  # (S,)
    if sampled.numel() == 0:
        return out
    lg = lg.index_select(0, sampled) / temperature.index_select(0, sampled)[:, None]  # (S, V)
    k = t["top_k"].index_select(0, sampled)
    if bool((k > 0).any()):
        vocab = lg.shape[-1]
        kk = torch.where(k > 0, k.clamp(max=vocab), vocab)
        kth = lg.sort(dim=-1, descending=True).values.gather(1, (kk - 1)[:, None])  # (S, 1)
        lg = lg.masked_fill(lg < kth, float("-inf"))
    probs = torch.softmax(lg, dim=-1)
    m = t["min_p"].index_select(0, sampled)
    if bool((m > 0).any()):
        probs = probs.masked_fill(probs < m[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    p = t["top_p"].index_select(0, sampled)  # (S,)
    if bool((p < 1).any()):
        sp, si = probs.sort(dim=-1, descending=True)
        drop = (sp.cumsum(dim=-1) - sp) >= p[:, None] * sp.sum(dim=-1, keepdim=True)  # keeps the top one
        probs = probs.scatter(1, si, sp.masked_fill(drop, 0.0))
    noise = torch.empty_like(probs)
    shared = [i for i, g in enumerate(generators or []) if g is None]
    if shared:
        noise[shared] = torch.empty_like(probs[: len(shared)]).exponential_()
    for i, g in enumerate(generators or []):
        if g is not None:  # seeded rows: their own stream (one small op each; greedy rows skip all this)
            noise[i].exponential_(generator=g)
    out[sampled] = (probs / noise).argmax(dim=-1)
    return out
