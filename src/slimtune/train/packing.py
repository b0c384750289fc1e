"""Padding-free training batches for causal LMs: the rows of a batch as one sequence, no pad token
ever computed.

    batch = packed(examples)     # transformers' DataCollatorWithFlattening: input_ids / labels /
                                 # position_ids (1, N), restarting at 0 per row, + cu_seq_lens
    use_varlen_attention(model)  # attention per row, through transformers' AttentionInterface

Why: right-padding a batch to its longest row computes every pad token through every linear layer
(the chatterbot example's batches are 44% pads; the default job's 10%). Flattened, the linear
layers, norms and MLPs see only real tokens. Attention must still not cross rows: transformers
gives the flattened layout to flash-attention's varlen kernels (GPU only). On CPU, its SDPA path
would build a block-diagonal mask over all N tokens, which costs N² attention work and more than
the padding saved when rows are short. So `varlen_sdpa` (registered with transformers'
`AttentionInterface`, the documented way to add an attention function) gathers each row's
queries, keys and values into a (rows, heads, longest, dim) block, runs the model's own SDPA
attention with `is_causal=True` (no mask: a row's trailing positions are past its end, and a
causal row never looks ahead), and scatters the rows back. Attention work is then what padding
costs, the rest sees N real tokens. Calls without `cu_seq_lens_q` (evaluation, generation) go to
the stock SDPA function unchanged.

The labels keep -100 on each row's first token (the collator's separator), so no position
predicts the next row's first token; RoPE reads the restarting position ids.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

NAME = "slimtune_varlen"


def packed(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Flatten a batch of tokenised examples (input_ids + labels lists) into one row."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])


def is_packed(batch: dict[str, Any]) -> bool:
    return "cu_seq_lens_q" in batch


def packed_rows(batch: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """The rows of a flattened batch back as (input_ids, labels); each row's first label, which the
    collator replaced by the -100 separator, as the collator found it is not recoverable and is
    reported as -100 (it is never a target: nothing precedes it)."""
    cu = batch["cu_seq_lens_q"].tolist()
    ids, lab = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    return [(ids[a:b], lab[a:b]) for a, b in zip(cu[:-1], cu[1:])]


def _row_index(cu: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows starting at cu[:-1]: (rows, longest) gather indices into the flat sequence (positions
    past a row's end repeat its last token: computed, never read) and the flat positions of the
    real tokens in the (rows * longest) block, in the flat sequence's order."""
    starts, lens = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    t = torch.arange(longest, device=cu.device)
    gather = starts[:, None] + torch.minimum(t[None, :], (lens - 1)[:, None])  # (rows, longest)
    real = t[None, :] < lens[:, None]
    flat = (torch.arange(len(lens), device=cu.device)[:, None] * longest + t[None, :])[real]
    return gather, flat


def varlen_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA per row of a flattened batch (query (1, heads, N, dim)); the stock SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    if cu is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    longest = kwargs.pop("max_length_q", None)
    for k in ("cu_seq_lens_k", "max_length_k"):
        kwargs.pop(k, None)
    longest = longest if isinstance(longest, int) else int((cu[1:] - cu[:-1]).max())
    gather, flat = _row_index(cu, longest)
    # (1, h, N, d) -> (rows, h, longest, d)
    q, k, v = (x[0][:, gather].transpose(0, 1) for x in (query, key, value))
    out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs)
    # out: (rows, longest, h, d) -> the real tokens, in flat order: (1, N, h, d)
    return out.reshape(-1, *out.shape[2:])[flat].unsqueeze(0), None


def register() -> None:
    """Make `slimtune_varlen` a valid attn_implementation (attention + mask functions; idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def varlen_status(model: nn.Module) -> tuple[bool, str]:
    """(applies, why) for padding-free batches on this model (a PeftModel or a plain model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(inner, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", NAME):
        return False, f"attention is {impl!r}, not sdpa"
    can = getattr(inner, "_can_set_attn_implementation", None)
    if can is None or not can():
        return False, f"{type(inner).__name__} does not run its attention through transformers' AttentionInterface"
    return True, "padding-free batches (rows flattened, attention per row)"


class varlen_attention:
    """Context: the model's attention is `varlen_sdpa` inside, what it was outside."""

    def __init__(self, model: nn.Module) -> None:
        self.inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.before = None

    def __enter__(self):
        register()
        self.before = self.inner.config._attn_implementation
        if self.before != NAME:
            self.inner.set_attn_implementation(NAME)
        return self

    def __exit__(self, *exc):
        if self.before is not None and self.before != NAME:
            self.inner.set_attn_implementation(self.before)
        return False
