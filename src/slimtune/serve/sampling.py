"""Next tokens for a batch of rows, each with its own temperature, top_p and seed, in tensor ops.

    logits (B, V) -> tokens (B,)
    temperature 0: argmax (greedy, what `slimtune generate` does)
    else: softmax(logits / T), keep the smallest set of tokens whose mass reaches top_p, and draw
          with the exponential race argmax(p / E), E ~ Exp(1) (the same distribution as
          multinomial, and one op for all rows)

A row with a `seed` draws its noise from its own generator, so its output does not depend on
which other requests share its batch; rows without one share the engine's generator.
"""
from __future__ import annotations

import torch


def next_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generators: list[torch.Generator | None] | None) -> torch.Tensor:
    """logits (B, V) float, temperature (B,), top_p (B,), generators: one per sampled row (in
    row order) or None when no row samples. Returns (B,) long."""
    out = logits.argmax(dim=-1)  # (B,)
    sampled = (temperature > 0).nonzero().flatten()  # (S,)
    if sampled.numel() == 0:
        return out
    lg = logits.index_select(0, sampled).float() / temperature.index_select(0, sampled)[:, None]  # (S, V)
    probs = torch.softmax(lg, dim=-1)
    p = top_p.index_select(0, sampled)  # (S,)
    if bool((p < 1).any()):
        sp, si = probs.sort(dim=-1, descending=True)
        drop = (sp.cumsum(dim=-1) - sp) >= p[:, None]  # tokens after the mass reached top_p; keeps the top one
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
