"""Row surgery on a transformers `DynamicCache` for continuous batching.

The running batch keeps one cache of shape (B, H_kv, T, D) per layer, left-padded so every row
ends at the same column. Rows leave by index selection; new rows (prefilled in their own forward)
join by left-padding the shorter of the two caches and concatenating on the batch dimension;
columns that are padding in every row are dropped. `offset` is where the padding goes: prompt-
learning methods keep their virtual tokens in the first `offset` columns of every row
(the method's hook extends the attention mask by that many ones in front), so padding goes after them.

    cache column:   [ virtual (offset) | pad ... pad | prompt ... generated ]
    attention mask:                    [  0  ...  0 |  1   ...   1       ]
"""
from __future__ import annotations

import torch


class CacheLayoutError(RuntimeError):
    """The model's cache is not a plain full-attention DynamicCache."""


def check_layout(cache) -> None:
    """Refuse caches whose rows cannot be padded and joined (sliding windows, quantized, offloaded)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise CacheLayoutError(f"continuous batching needs full-attention DynamicLayer caches; this model's cache "
                               f"has {', '.join(kinds)} (sliding-window or hybrid attention is not served yet)")


def check_model(model) -> None:
    """One 1-token forward: refuse at start-up a model whose cache rows cannot be joined."""
    from transformers import DynamicCache

    from ..compat import cache_arg

    cache = DynamicCache(config=model.config)
    dev = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.ones(1, 1, dtype=torch.long, device=dev), use_cache=True,
              **{cache_arg(model) or "past_key_values": cache})
    check_layout(cache)


def _pad(t: torch.Tensor, n: int, offset: int) -> torch.Tensor:
    """Insert n zero columns at `offset` of t (B, H, T, D)."""
    if n == 0:
        return t
    b, h, _, d = t.shape
    return torch.cat([t[:, :, :offset], t.new_zeros(b, h, n, d), t[:, :, offset:]], dim=2)


def select(cache, idx: torch.Tensor) -> None:
    """Keep rows `idx` (in that order)."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, idx)
        layer.values = layer.values.index_select(0, idx)


def join(a, b, offset: int) -> int:
    """Append b's rows to a (in place); returns how many pad columns a's rows got in front.

    The shorter side is left-padded at `offset`, so both sides end on the same column."""
    ta, tb = a.layers[0].keys.shape[2], b.layers[0].keys.shape[2]
    pa, pb = max(tb - ta, 0), max(ta - tb, 0)
    for la, lb in zip(a.layers, b.layers):
        la.keys = torch.cat([_pad(la.keys, pa, offset), _pad(lb.keys, pb, offset)], dim=0)
        la.values = torch.cat([_pad(la.values, pa, offset), _pad(lb.values, pb, offset)], dim=0)
    return pa


def drop_columns(cache, offset: int, n: int) -> None:
    """Remove n columns starting at `offset` (padding every row has)."""
    if n == 0:
        return
    for layer in cache.layers:
        layer.keys = torch.cat([layer.keys[:, :, :offset], layer.keys[:, :, offset + n:]], dim=2)
        layer.values = torch.cat([layer.values[:, :, :offset], layer.values[:, :, offset + n:]], dim=2)
