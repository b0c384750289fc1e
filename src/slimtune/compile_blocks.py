"""torch.compile per repeated block (torchtune's `compile_model` pattern): every transformer layer
is compiled on its own, and identical layers share one compiled graph.

Why per block, not the whole model: compile time grows with graph size, and a block-level graph
survives what whole-model graphs break on (loss functions, generation loops, hooks between
blocks). What it buys: inductor fuses the norms, RoPE and SwiGLU element-wise work with the LoRA
adds, and one compiled call replaces hundreds of eager op dispatches per block, which is where a
small model on a fast GPU spends its LoRA overhead (see benchmarks/results/README.md).

The blocks are found structurally: the outermost `nn.ModuleList`s whose (two or more) children are
all of one class and hold parameters — `model.layers` in Llama, `encoder.layer` in BERT, `h` in
GPT-2, both stacks of T5.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def repeated_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, block) for every child of the outermost same-class ModuleLists of `model`."""
    taken: list[str] = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        if any(path.startswith(t + ".") for t in taken):
            continue  # a list inside a block already compiled with it
        kinds = {type(c) for c in m}
        if len(kinds) != 1 or next(m[0].parameters(), None) is None:
            continue
        taken.append(path)
        for i, block in enumerate(m):
            yield f"{path}.{i}" if path else str(i), block


def compile_blocks(model: nn.Module, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = None, **options: Any) -> list[str]:
    """Compile every repeated block of `model` in place (nn.Module.compile); returns their paths.

    A KV cache is turned off (`config.use_cache = False`): its per-layer state would make every
    block compile again. Generation still works (eager, see `eager`); `uncompile_blocks` undoes it.
    Raises ValueError when the model has no repeated blocks, rather than silently running eager.
    """
    blocks = list(repeated_blocks(model))
    if not blocks:
        raise ValueError(f"compile: found no repeated blocks (a ModuleList of same-class layers) in "
                         f"{type(model).__name__}; compile the model yourself with torch.compile(model)")
    for _, block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=dynamic, options=options or None)
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if getattr(cfg, "use_cache", False):
            cfg.use_cache = False
            cfg._slimtune_compiled_cache_off = True  # uncompile_blocks turns it back on
    log.info("compile: %d blocks (%s%s), backend %s%s", len(blocks), blocks[0][0],
             f" … {blocks[-1][0]}" if len(blocks) > 1 else "", backend, f", mode {mode}" if mode else "")
    return [p for p, _ in blocks]


def uncompile_blocks(model: nn.Module) -> int:
    """Undo compile_blocks: every compiled block calls its eager forward again and a KV cache it
    turned off is on again; returns how many blocks."""
    n = 0
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
            n += 1
        cfg = getattr(m, "config", None)
        if getattr(cfg, "_slimtune_compiled_cache_off", False):
            cfg.use_cache = True
            del cfg._slimtune_compiled_cache_off
    return n


def eager():
    """A context in which compiled blocks run eagerly (generation: a growing KV cache and a new
    sequence length every step would only recompile)."""
    return torch.compiler.set_stance("force_eager")
