"""Prompt-prefix KV cache per adapter, in blocks (vLLM's automatic prefix caching, simplified).

Chat requests share long prefixes (the template, a system prompt, a task preamble), and their KV
depends only on the tokens and the adapter. Prompts are cut into blocks of `block` tokens; block k
is keyed by a hash chained over blocks 0..k and the adapter's load id (a reloaded adapter gets a
new id, so stale KV is never reused). A new row reuses the longest run of cached blocks that
leaves at least one prompt token to compute, and only its suffix is prefilled:

    cache columns  [ pad | cached prefix (p_i) ][ pad | suffix (s_i) ]   mask 0 on the pads
    positions      cumsum(mask) - 1: the holes do not shift them

Blocks are kept LRU up to `max_tokens` tokens in all (KV bytes per token: 2 x layers x kv_heads
x head_dim x dtype size, e.g. 46 KB for SmolLM2-135M in fp32).
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, max_tokens: int, block: int = 16) -> None:
        self.max_tokens, self.block = max_tokens, block
        self._blocks: OrderedDict[int, tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self.hit_tokens = self.computed_tokens = 0  # for /metrics

    def _chain(self, owner: int, tokens: list[int], n_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        out, h, b = [], hash(("slimtune-prefix", owner)), self.block
        for k in range(n_blocks):
            blk = tuple(tokens[k * b:(k + 1) * b])
            h = hash((h, blk))
            out.append((h, blk))
        return out

    def lookup(self, owner: int, tokens: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The cached blocks (each: per layer (k, v) of shape (H, block, D)) of the longest prefix of
        `tokens` that leaves at least one token to prefill."""
        if self.max_tokens <= 0:
            return []
        found = []
        for h, blk in self._chain(owner, tokens, (len(tokens) - 1) // self.block):
            hit = self._blocks.get(h)
            if hit is None or hit[0] != blk:
                break
            self._blocks.move_to_end(h)
            found.append(hit[1])
        return found

    def insert(self, owner: int, tokens: list[int], cached: int, cache, row: int, start: int) -> None:
        """Store the full blocks of `tokens` after the first `cached` tokens, read from `cache`'s
        `row`, where prompt token `cached` sits at column `start`."""
        if self.max_tokens <= 0:
            return
        b = self.block
        for k, (h, blk) in enumerate(self._chain(owner, tokens, len(tokens) // b)):
            if k * b < cached or h in self._blocks:
                continue
            c = start + k * b - cached
            kv = [(layer.keys[row, :, c:c + b].clone(), layer.values[row, :, c:c + b].clone()) for layer in cache.layers]
            self._blocks[h] = (blk, kv)
        while len(self._blocks) * b > self.max_tokens:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


def prefix_tensors(found: list[list[list[tuple[torch.Tensor, torch.Tensor]]]]
                   ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Rows' cached blocks (row -> block -> layer -> (k, v) of (H, block, D)) as one right-aligned,
    left-padded KV per layer (B, H, P, D) and the mask (B, P) of its real columns."""
    ref = next(f for f in found if f)[0]
    n_layers, (h, blk, d) = len(ref), ref[0][0].shape
    p = max(len(f) for f in found) * blk
    pads = [p - len(f) * blk for f in found]
    kv = []
    for li in range(n_layers):
        k = ref[li][0].new_zeros(len(found), h, p, d)
        v = torch.zeros_like(k)
        for i, f in enumerate(found):
            if f:
                k[i, :, pads[i]:] = torch.cat([blocks[li][0] for blocks in f], dim=1)
                v[i, :, pads[i]:] = torch.cat([blocks[li][1] for blocks in f], dim=1)
        kv.append((k, v))
    dev = ref[0][0].device
    mask = (torch.arange(p, device=dev)[None] >= torch.tensor(pads, device=dev)[:, None]).long()
    return kv, mask
