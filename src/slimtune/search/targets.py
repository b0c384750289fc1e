"""Target sets by role, found in the model's structure: the linear layers of each transformer block's
attention, of the rest of the block (the MLP), or all of them; in all blocks or a subset of layers.

    blocks = find_blocks(model)                 # the outermost same-class ModuleLists (compile_blocks)
    target_modules(blocks, "attention", "top_half")
        -> r"model\\.layers\\.(?:15|16|...|29)\\.(?:self_attn\\.q_proj|self_attn\\.k_proj|...)"

How a block's linears are split: the outermost modules inside a block whose class is an attention
class (`LlamaAttention`, `BertAttention`, `GPT2Attention`, T5's `T5Attention`: the class name holds
"Attention") own the attention linears; every other linear of the block is the MLP. The result is one
full-match regex of exact paths (PEFT's rule for a string `target_modules`), so a choice such as BERT's
`attention.output.dense` vs `output.dense` is never ambiguous, and the layer subset is part of the
same pattern (every method that takes `target_modules` honours it, with or without
`layers_to_transform`). "all-linear" over all layers is PEFT's `all-linear` itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch.nn as nn

from ..compile_blocks import repeated_blocks
from ..targeting import ALL_LINEAR, LINEAR_TYPES

TARGET_SETS = ("attention", "mlp", ALL_LINEAR)
LAYER_CHOICES = ("all", "top_half", "top_third", "bottom_half")
Layers = Union[str, Sequence[int]]


@dataclass
class BlockList:
    """One stack of repeated blocks: its path, its length, and the block-relative linear paths by role."""
    path: str
    n: int
    attention: list[str] = field(default_factory=list)
    mlp: list[str] = field(default_factory=list)


@dataclass
class Blocks:
    lists: list[BlockList]

    @property
    def n_layers(self) -> int:
        return max((b.n for b in self.lists), default=0)


def _is_attention(m: nn.Module) -> bool:
    return "Attention" in type(m).__name__


def find_blocks(model: nn.Module) -> Blocks:
    """The model's block stacks with each block's attention and MLP linears (from the first block of
    each stack: the blocks of a stack are one class)."""
    firsts: dict[str, tuple[int, nn.Module]] = {}
    counts: dict[str, int] = {}
    for path, block in repeated_blocks(model):
        head, _, _ = path.rpartition(".")
        counts[head] = counts.get(head, 0) + 1
        firsts.setdefault(head, (0, block))
    lists = []
    for head, (_, block) in firsts.items():
        att_roots = []
        for name, m in block.named_modules():
            if name and _is_attention(m) and not any(name.startswith(r + ".") for r in att_roots):
                att_roots.append(name)
        b = BlockList(head, counts[head])
        for name, m in block.named_modules():
            if isinstance(m, LINEAR_TYPES):
                (b.attention if any(name == r or name.startswith(r + ".") for r in att_roots) else b.mlp).append(name)
        if b.attention or b.mlp:
            lists.append(b)
    return Blocks(lists)


def layer_indices(layers: Layers, n: int) -> list[int]:
    """Block indices of a layer choice in a stack of n blocks."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n))
        if layers == "top_half":
            return list(range(n - max(1, n // 2), n))
        if layers == "top_third":
            return list(range(n - max(1, n // 3), n))
        if layers == "bottom_half":
            return list(range(0, max(1, n // 2)))
        raise ValueError(f"layers {layers!r}: choose one of {', '.join(LAYER_CHOICES)} or a list of block indices")
    idx = sorted(set(int(i) for i in layers))
    bad = [i for i in idx if not 0 <= i < n]
    if bad or not idx:
        raise ValueError(f"layers {list(layers)}: the model's blocks are numbered 0..{n - 1}")
    return idx


def check(blocks: Blocks, target_set: str, layers: Layers) -> None:
    """Raise ValueError when this model has nothing of `target_set` or no such layers."""
    if target_set not in TARGET_SETS:
        raise ValueError(f"target set {target_set!r}: choose from {', '.join(TARGET_SETS)}")
    if not blocks.lists:
        raise ValueError("the model has no repeated transformer blocks (a ModuleList of same-class layers), so "
                         "attention / MLP target sets cannot be found; give method.target_modules by name instead")
    role = {"attention": "attention", "mlp": "mlp"}.get(target_set)
    if role and not any(getattr(b, role) for b in blocks.lists):
        found = ", ".join(f"{b.path}: {len(b.attention)} attention / {len(b.mlp)} other linears" for b in blocks.lists)
        raise ValueError(f"target set {target_set!r}: the model's blocks have no {role} linear layers ({found})")
    for b in blocks.lists:
        layer_indices(layers, b.n)


def target_modules(blocks: Blocks, target_set: str, layers: Layers = "all") -> str:
    """The `target_modules` value for a target set over a layer choice (see the module doc)."""
    check(blocks, target_set, layers)
    if target_set == ALL_LINEAR and layers == "all":
        return ALL_LINEAR
    parts = []
    for b in blocks.lists:
        rel = b.attention if target_set == "attention" else b.mlp if target_set == "mlp" else b.attention + b.mlp
        if not rel:
            continue
        idx = "|".join(str(i) for i in layer_indices(layers, b.n))
        names = "|".join(re.escape(r) for r in rel)
        parts.append(f"{re.escape(b.path)}\\.(?:{idx})\\.(?:{names})")
    return "|".join(f"(?:{p})" for p in parts) if len(parts) > 1 else parts[0]
