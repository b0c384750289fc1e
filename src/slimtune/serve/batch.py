"""A running batch's rows and their tensors, kept row-aligned: the order of the rows, rows leaving.

The engine (engine.py) decides when rows come and go; this module keeps each `Batch`'s rows, adapter
names, KV cache (kvcache.py), attention mask and per-row tensors in one order, and chooses that
order for a mixed batch: its rows in the order of their lane's adapters, base rows last, so each
LoRA layer reads its stack of adapters in place, as a slice with no reordering
(lora_mixed._row_plan). Apart from the engine because it is the batch's bookkeeping, not its
scheduling.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from . import kvcache
from .handles import Handle
from .registry import Placement


class Row:
    __slots__ = ("handle", "req", "placement", "gen")

    def __init__(self, handle: Handle, placement: Placement, device: torch.device) -> None:
        self.handle, self.req, self.placement = handle, handle.req, placement
        self.gen = None
        if self.req.temperature > 0 and self.req.seed is not None:
            self.gen = torch.Generator(device=device).manual_seed(int(self.req.seed))


class Batch:
    """Running rows that share forwards, and their tensors (row i of each is rows[i])."""

    def __init__(self, pl: Placement) -> None:
        self.pl = pl
        self.rows: list[Row] = []
        self.names: list[str] = []  # each row's adapter, for the mixed batch
        self.cache = None  # DynamicCache (B, H, offset + T, D) per layer
        self.mask: torch.Tensor | None = None  # (B, T) attention mask, left-padded
        # per-row tensors: the pending token (sampled, not yet in the cache), tokens generated,
        # max_tokens, whether EOS ends the row, and the sampling options and state (sampling.py)
        self.t: dict[str, torch.Tensor] = {}

    def generators(self) -> list | None:
        return [r.gen for r in self.rows if r.req.temperature > 0] or None

    def reorder(self, perm: list[int]) -> None:
        """The rows (and their cache, mask and tensors) in the order perm."""
        self._take(torch.tensor(perm, device=self.mask.device))
        self.rows = [self.rows[i] for i in perm]
        self.names = [self.names[i] for i in perm]

    def _take(self, idx: torch.Tensor) -> None:
        """The row-aligned tensors (cache, mask, per-row tensors) at rows idx, in that order."""
        kvcache.select(self.cache, idx)
        self.mask = self.mask[idx]
        self.t = {k: v[idx] for k, v in self.t.items()}

    def put_in_slot_order(self) -> None:
        """Reorder the rows into their adapters' slot order (after new rows joined at the end)."""
        if self.rows:
            perm = in_slot_order(self.pl, list(range(len(self.rows))), self.names)
            if perm != sorted(perm):
                self.reorder(perm)

    def keep(self, keep: torch.Tensor) -> None:
        """Rows where keep (B,) is True stay; all-padding columns in front are dropped."""
        idx = keep.nonzero().flatten()
        flags = keep.tolist()
        self.rows = [r for r, k in zip(self.rows, flags) if k]
        self.names = [n for n, k in zip(self.names, flags) if k]
        if not self.rows:
            self.cache = None
            return
        self._take(idx)
        lead = int(self.mask.any(dim=0).int().argmax())  # first column some row attends to
        if lead:
            kvcache.drop_columns(self.cache, self.pl.offset, lead)
            self.mask = self.mask[:, lead:]


def in_slot_order(pl: Placement, items: list, names: list[str]) -> list:
    """items (one per row) in the order of their rows' adapters among the lane's adapters, base
    rows last (stable): a mixed batch whose rows are the lane's adapters in order reads each
    layer's stack of adapters in place, with no reordering (lora_mixed._row_plan)."""
    if pl.lane is None or pl.solo is not None or len(items) < 2:
        return items
    order = pl.lane.order()
    keys = [order.get(n, len(order)) for n in names]
    return [items[i] for i in sorted(range(len(items)), key=keys.__getitem__)]


def left_pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    """Ragged 1-D tensors -> (B, T_max), padded on the left."""
    return pad_sequence([s.flip(0) for s in seqs], batch_first=True, padding_value=value).flip(1)
