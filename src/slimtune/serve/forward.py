"""One forward of a batch, on the model its rows are placed on (registry.Placement), with the
batch's adapters in place: the engine's only way to call a model.

A lane's mixed batch is entered (`tuner.mixed_batch`) and stays entered across steps while its rows
stay the same, so the LoRA layers keep their plans; a solo adapter is made active; the plain base
needs nothing. Moved out of engine.py, which schedules: this decides how a forward is called.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..compat import output_cache
from ..methods.lora_layers import BASE_ADAPTER
from .config import ServeConfig
from .registry import Placement, Registry


class ModelCall:
    def __init__(self, registry: Registry, cfg: ServeConfig, device: torch.device) -> None:
        self.registry, self.cfg = registry, cfg
        self._ctx: tuple[tuple, contextlib.ExitStack] | None = None  # the mixed batch now in place
        # a prefill's LM head on the last position, given as an index rather than transformers' int 1:
        # the int slices hidden[:, -1:], a strided view when several rows have T > 1 columns, and with
        # frozen weights (every served model) torch's matmul does not fold that view into one mm but
        # runs a bmm over the head's weight expanded to every row (52-59 ms against ~6 for a 16-row
        # prefill of SmolLM2-135M, whose head is 49152 x 576); the index gathers a contiguous (B, 1, H).
        # Decode steps (T = 1: already contiguous) and Gemma 4's KV-shared layers (which skip positions
        # for an int only: Placement.keep_by_index) keep the int
        self._keep_last = torch.tensor([-1], device=device)

    def __call__(self, pl: Placement, names: list[str], ids, mask, pos, cache,
                 full: bool = False) -> tuple[torch.Tensor, Any]:
        """(B, T) ids -> last-position logits (B, V) (with `full`: every position's, (B, T', V),
        virtual tokens in front), and the cache.

        A lane's mixed batch whose rows are all base rows (no adapter row came, or they have left) runs
        on the plain base model: the same weights and the same cache, where the lane's LoRA layers
        would add nothing to those rows but their wrappers' cost."""
        if pl.lane is not None and pl.solo is None and pl.offset == 0 and names.count(BASE_ADAPTER) == len(names):
            pl = self.registry.plain
        self.enter(pl, names)
        kw = {pl.cache_name: cache, "use_cache": True}
        if pl.logits_to_keep and not full:
            strided = ids.shape[0] > 1 and ids.shape[1] > 1
            kw["logits_to_keep"] = self._keep_last if strided and pl.keep_by_index else 1
        out = pl.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
        return out.logits if full else out.logits[:, -1], output_cache(out) or cache

    def enter(self, pl: Placement, names: list[str]) -> None:
        """Put the batch's adapters in place: a mixed batch stays entered across steps while its rows
        stay the same (LoRA caches the gathered weights for as long), a solo adapter is made active."""
        if pl.lane is not None and pl.solo is None:
            key = (pl.key, tuple(names))
            if self._ctx is not None and self._ctx[0] == key:
                return
            self.exit()
            stack = contextlib.ExitStack()
            wd = self.cfg.mixed_adapter_dtype  # "model", or a dtype for the stacked LoRA weights (server.py)
            kw = {} if wd == "model" else {"weights_dtype": getattr(torch, wd)}
            # the registry's generation: adapters change only by its loads and drops, so the layers
            # keep their stacks without re-checking every adapter tensor at each wave (~20 ms a batch)
            stack.enter_context(pl.lane.tuner.mixed_batch(names, weights_epoch=self.registry.generation, **kw))
            self._ctx = (key, stack)
            return
        self.exit()
        if pl.lane is not None:
            pl.lane.activate(pl.solo)

    def exit(self) -> None:
        """Leave the mixed batch in place, if any (before a model change, at the end of a batch)."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx[1].close()
