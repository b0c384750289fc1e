"""The frozen prefix, computed once: the hidden states entering the first adapted block, per example.

When adapters start at block k (the default job on CPU adapts blocks 20..29 of 30) and nothing
below block k trains or draws random numbers, the input of block k is a pure function of the
example: the same in every epoch and at every evaluation. The first pass over an example keeps it
(a forward pre-hook on block k copies it out); later passes start at block k:

    cache = PrefixCache.build(decoder, model, {"train": lengths, "eval": lengths}, ...)   # or None + why
    with cache.capture(keys, layout):  h = decoder(**batch)      # full forward, block k's input kept
    h = cache.run_from(keys, layout, batch)                      # blocks k.. only, from the kept input

`run_from` calls the decoder's own forward with the cached states as `inputs_embeds` and its block
list cut to blocks k.., so masks, rotary positions and the final norm are the model's own; the
first use is checked against the full forward (`check`), and a model that computes differently
(e.g. one that scales its input embeddings) turns the cache off with a message, never silently.

Bounded: the states live in one (tokens × hidden) tensor per split, in RAM up to
`train.prefix_cache_mb`, else in a file-backed tensor in the run folder (removed at the end).
Examples are stored unpadded, so an example's states do not depend on the batch it came in
(rows are independent under causal attention: right padding comes after, padding-free rows are
attended separately).
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..compile_blocks import repeated_blocks


def block_list(decoder: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(attribute name, ModuleList) of the decoder's repeated blocks (found structurally), or None."""
    paths = [p for p, _ in repeated_blocks(decoder)]
    if not paths:
        return None
    name = paths[0].rsplit(".", 1)[0]
    if "." in name:  # the blocks sit deeper than a direct child: the swap below would not reach them
        return None
    lst = getattr(decoder, name, None)
    return (name, lst) if isinstance(lst, nn.ModuleList) else None


def _random(m: nn.Module) -> bool:
    return (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or \
        float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0


def first_trained_block(model: nn.Module, decoder: nn.Module) -> tuple[int, str]:
    """(k, why): the first block holding a trainable parameter, provided nothing before it trains
    (embeddings, virtual tokens) or draws random numbers (dropout p > 0). k = 0: nothing to cache."""
    found = block_list(decoder)
    if found is None:
        return 0, "no repeated block list found in the decoder"
    name, blocks = found
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    for n, p in decoder.named_parameters():  # outside the blocks and trained: embeddings, virtual tokens
        if p.requires_grad and id(p) not in block_ids and not n.startswith(("norm", "final")):
            return 0, f"{n} trains before the blocks"
    k = next((i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())), len(blocks))
    if k == len(blocks):
        return 0, "no block trains"
    if k == 0:
        return 0, "adapters start at block 0: there is no frozen prefix"
    embed = [m for n, m in decoder.named_children() if n != name]
    for i, m in enumerate([*embed, *blocks[:k]]):
        if any(_random(x) for x in m.modules()):
            return 0, f"dropout before block {k}"
    return k, f"blocks 0..{k - 1} are frozen and deterministic"


class PrefixCache:
    def __init__(self, decoder: nn.Module, name: str, k: int, hidden: int, dtype: torch.dtype,
                 lengths: dict[str, list[int]], budget_mb: float, folder: Path | None, log: Callable[[str], None]):
        self.decoder, self.name, self.k, self.log = decoder, name, k, log
        self.blocks: nn.ModuleList = getattr(decoder, name)
        self.tail = nn.ModuleList(list(self.blocks)[k:])
        self.offsets: dict[str, list[int]] = {}
        self.lengths = lengths
        self.filled: dict[str, torch.Tensor] = {}
        self.store: dict[str, torch.Tensor] = {}
        total = sum(sum(v) for v in lengths.values())
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = total * hidden * itemsize
        self.folder = None
        on_disk = self.nbytes > budget_mb * 2**20
        if on_disk:
            if folder is None:
                raise ValueError("no folder for an on-disk prefix cache")
            self.folder = Path(folder)
            self.folder.mkdir(parents=True, exist_ok=True)
        for split, ls in lengths.items():
            off = [0]
            for n in ls:
                off.append(off[-1] + n)
            self.offsets[split] = off
            shape = (max(off[-1], 1), hidden)
            if on_disk:
                path = self.folder / f"{split}.bin"
                with open(path, "wb") as f:
                    f.truncate(shape[0] * shape[1] * itemsize)
                flat = torch.from_file(str(path), shared=True, size=shape[0] * shape[1], dtype=dtype)
                self.store[split] = flat.view(shape)
            else:
                self.store[split] = torch.empty(shape, dtype=dtype)
            self.filled[split] = torch.zeros(len(ls), dtype=torch.bool)
        self.where = f"on disk in {self.folder}" if on_disk else "in memory"
        self.checked = False
        self.off = False

    @classmethod
    def build(cls, decoder: nn.Module, model: nn.Module, lengths: dict[str, list[int]], budget_mb: float,
              folder: Path | None, log: Callable[[str], None]) -> tuple["PrefixCache | None", str]:
        k, why = first_trained_block(model, decoder)
        if k == 0:
            return None, why
        name, _ = block_list(decoder)
        p = next(decoder.parameters())
        hidden = getattr(getattr(decoder, "config", None), "hidden_size", None)
        if hidden is None:
            return None, "the decoder's config has no hidden_size"
        need = sum(sum(v) for v in lengths.values()) * hidden * p.element_size()
        if need > budget_mb * 2**20 and folder is not None:
            free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
            if need > 0.5 * free:
                return None, f"{need / 2**20:.0f} MB of states would not fit in train.prefix_cache_mb={budget_mb:g} " \
                             f"nor in half of the {free / 2**30:.1f} GB free on disk"
        dtype = p.dtype if p.is_floating_point() else torch.float32
        c = cls(decoder, name, k, hidden, dtype, lengths, budget_mb, folder, log)
        return c, f"{why}: block {k}'s input kept {c.where} ({c.nbytes / 2**20:.0f} MB), blocks 0..{k - 1} skipped " \
                  "when an example comes again"

    # ---- rows of a batch ------------------------------------------------------------------------
    @staticmethod
    def _spans(batch: dict[str, Any]) -> list[tuple[int, int, int]]:
        """(batch row, start, length) of each example in the batch layout."""
        if "cu_seq_lens_q" in batch:
            cu = batch["cu_seq_lens_q"].tolist()
            return [(0, a, b - a) for a, b in zip(cu[:-1], cu[1:])]
        lens = batch["attention_mask"].sum(1).tolist()
        return [(i, 0, int(n)) for i, n in enumerate(lens)]

    def has(self, split: str, ids: list[int]) -> bool:
        return not self.off and bool(self.filled[split][ids].all())

    @contextlib.contextmanager
    def capture(self, split: str, ids: list[int], batch: dict[str, Any]) -> Iterator[None]:
        """Within: the decoder's full forward also stores block k's input for these examples."""
        if self.off:
            yield
            return
        spans = self._spans(batch)
        store, off = self.store[split], self.offsets[split]

        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                for (r, a, n), i in zip(spans, ids):
                    store[off[i]:off[i] + n] = h[r, a:a + n].detach()
            self.filled[split][ids] = True

        handle = self.blocks[self.k].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def states(self, split: str, ids: list[int], batch: dict[str, Any]) -> torch.Tensor:
        """Block k's input for these examples, in the batch's layout (pads zero: never read)."""
        spans = self._spans(batch)
        store, off = self.store[split], self.offsets[split]
        shape = batch["input_ids"].shape
        h = torch.zeros(*shape, store.shape[1], dtype=store.dtype)
        for (r, a, n), i in zip(spans, ids):
            h[r, a:a + n] = store[off[i]:off[i] + n]
        return h.to(batch["input_ids"].device)

    def run_from(self, split: str, ids: list[int], batch: dict[str, Any], model_kw: dict[str, Any]):
        """The decoder's output, running blocks k.. only from the kept input of block k (`model_kw`:
        the decoder's other arguments for this batch, its input ids aside)."""
        h = self.states(split, ids, batch)
        args = {k: v for k, v in model_kw.items() if k != "input_ids"}
        setattr(self.decoder, self.name, self.tail)
        try:
            return self.decoder(inputs_embeds=h, **args, use_cache=False)
        finally:
            setattr(self.decoder, self.name, self.blocks)

    def check(self, full: torch.Tensor, split: str, ids: list[int], batch: dict[str, Any],
              model_kw: dict[str, Any]) -> bool:
        """Once: the cut forward against the full one on a real batch; a mismatch turns the cache off."""
        if self.checked:
            return not self.off
        self.checked = True
        with torch.no_grad():
            cut = self.run_from(split, ids, batch, model_kw).last_hidden_state
        spans = self._spans(batch)
        diff = max(float((full[r, a:a + n] - cut[r, a:a + n]).abs().max()) for r, a, n in spans)
        scale = max(float(full.abs().max()), 1e-6)
        if diff > 1e-4 * scale + 1e-5:
            self.off = True
            self.log(f"prefix cache: starting at block {self.k} gave hidden states {diff:.2e} away from the full "
                     "forward (this model computes its blocks' input differently); computing every block instead")
            return False
        return True

    def close(self) -> None:
        self.off = True
        self.store.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
