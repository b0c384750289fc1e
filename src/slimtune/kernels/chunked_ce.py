"""Chunked linear + cross-entropy for causal-LM training: the (tokens × vocab) logits are never
materialised.

The stock loss builds logits (N × V) and keeps their log-softmax for backward: 96 MiB for 512
tokens of SmolLM2's 49k vocabulary, more than all LoRA adapters of that model together. torch ≥
2.13's `F.linear_cross_entropy` with `LinearCrossEntropyOptions` runs the head and the loss chunk
by chunk and computes the input gradient during forward (liger-kernel's trick), so it keeps only
an N × d gradient. With 256-row chunks it also ran faster than the stock pair on 2 CPU cores
(648 vs 743 ms fwd+bwd, 512×576 @ 49152; the "auto" chunking was 7× slower, so we set the size).

    loss_fn = chunked_causal_lm_loss(model)     # None (with the reason) where it cannot apply
    loss = loss_fn(batch)                       # == model(**batch).loss

It applies to a causal LM whose logits are exactly lm_head(final hidden state) (the families in
PLAIN_LOGITS: no logit scaling or soft-capping), with a plain Linear head (not adapted or saved in
full), with no hooks on the model's own forward (prompt tuning puts one there). On GPU
liger-kernel's fused ops do the same job (`kernels/fused_ops.py`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100
CHUNK_ROWS = 256  # rows of logits per chunk: 256 × 49k × 4 B = 48 MiB at a time (measured above)
# model_type -> logits are lm_head(norm(h)) with nothing after (no scale, no soft-cap)
PLAIN_LOGITS = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3", "starcoder2", "gemma"}


def chunked_ce_status(model: nn.Module) -> tuple[bool, str]:
    """(applies, reason) for `chunked_causal_lm_loss` on `model` (a PeftModel or a plain model)."""
    if not hasattr(F, "linear_cross_entropy") or not hasattr(nn, "LinearCrossEntropyOptions"):
        return False, f"torch {torch.__version__} has no F.linear_cross_entropy (needs torch >= 2.13)"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if inner._forward_pre_hooks or inner._forward_hooks:  # e.g. prompt tuning rewrites the inputs there
        return False, "hooks on the model's forward (prompt/prefix tuning) would be skipped"
    mt = getattr(getattr(inner, "config", None), "model_type", None)
    if mt not in PLAIN_LOGITS:
        return False, f"model type {mt!r} is not known to compute logits as a plain lm_head(hidden)"
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return False, f"the output head is a {type(head).__name__}, not a plain Linear (adapted or trained in full)"
    if not hasattr(inner, "get_decoder"):
        return False, "the model has no get_decoder()"
    return True, f"chunked linear cross-entropy ({CHUNK_ROWS}-row chunks) for model type {mt!r}"


def chunked_causal_lm_loss(model: nn.Module) -> Callable[[dict[str, Any]], torch.Tensor] | None:
    """A function batch -> mean next-token loss equal to `model(**batch).loss`, or None."""
    ok, _ = chunked_ce_status(model)
    if not ok:
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    options = nn.LinearCrossEntropyOptions(batch_chunk_size=CHUNK_ROWS)

    def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
        labels = batch["labels"]
        kw = {k: v for k, v in batch.items() if k != "labels"}
        h = decoder(**kw, use_cache=False).last_hidden_state  # (B, T, d)
        # next-token targets: position t predicts labels[t+1]; the last position predicts nothing
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)
        return F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, target.reshape(-1),
                                      linear_bias=head.bias, ignore_index=IGNORE, options=options)

    return loss_fn

