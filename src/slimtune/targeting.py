"""Which modules a config selects: by name (exact, suffix, full-match regex, "all-linear"),
by module type, by layer index, minus exclusions. A selection that matches nothing is an error
that shows what would have matched; nothing is silently ignored.

Name rules are PEFT's, so an adapter_config.json selects the same modules in both libraries:
- `target_modules` a str: a regex that must match the whole module path;
- a list: each entry matches a path exactly or as a dotted suffix ("q_proj" matches
  "model.layers.0.self_attn.q_proj");
- "all-linear": every linear layer (nn.Linear, transformers Conv1D) except the output head.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch.nn as nn

try:  # GPT-2 style linear with a transposed weight (in, out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency, keep import errors loud elsewhere
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
ALL_LINEAR = "all-linear"


class TargetError(ValueError):
    """The targets of a config do not fit the model; the message lists what would fit."""


def name_matches(name: str, pattern: str | Sequence[str]) -> bool:
    """PEFT's rule: str = full-match regex; list = exact or dotted-suffix match of any entry."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """Index of the repeated block a module sits in: 'model.layers.3.mlp' -> 3.

    With `layers_pattern` ("layers", "h", ...) the number after that component; without, the
    first numeric component (right for nested stacks such as T5's 'block.2.layer.0').
    """
    if layers_pattern:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        for p in pats:
            m = re.search(rf"(?:^|\.){re.escape(p)}\.(\d+)(?:\.|$)", name)
            if m:
                return int(m.group(1))
        return None
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def output_head_names(model: nn.Module) -> set[str]:
    """Module paths of the output head ("lm_head", tied or not): never an "all-linear" target."""
    names: set[str] = set()
    get = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get):
        try:
            head = get()
        except Exception:
            head = None
    for n, m in model.named_modules():
        if head is not None and m is head:
            names.add(n)
        elif n.split(".")[-1] in ("lm_head", "embed_out") and isinstance(m, LINEAR_TYPES):
            names.add(n)
    return names


def _effective(m: nn.Module) -> nn.Module:
    get = getattr(m, "get_base_layer", None)
    return get() if callable(get) else m


@dataclass
class Selection:
    """The modules a config selects, by full path, in model order."""

    names: list[str]


def _suggest(wanted: str, candidates: Iterable[str]) -> str:
    cands = sorted(set(candidates))
    close = difflib.get_close_matches(wanted, cands, n=3, cutoff=0.5)
    lead = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    shown = ", ".join(cands[:40]) + (" ..." if len(cands) > 40 else "")
    return f"{lead}Module names that would match: {shown}"


def select(
    model: nn.Module,
    target_modules: str | Sequence[str | type] | None,
    *,
    supported_types: tuple[type, ...],
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    skip: Iterable[str] = (),
    method: str = "adapter",
) -> Selection:
    """Return the paths of modules to adapt; raise TargetError naming any entry that matches nothing.

    Entries of a list may be module *types* (e.g. `nn.Conv2d`) as well as names. `skip` holds
    paths that must never be targets (adapter internals, modules_to_save copies).
    """
    if target_modules is None:
        raise TargetError(f"{method}: no target_modules given and no default is known for this model; "
                          "pass target_modules=[...] (module names) or 'all-linear'")
    skip = tuple(skip)
    # An adapter layer already in place stands for its base layer (a second adapter reuses it).
    all_named = [(n, _effective(m)) for n, m in model.named_modules()
                 if n and not any(n == s or n.startswith(s + ".") for s in skip)]
    leaf_names = [n for n, m in all_named if isinstance(m, supported_types)]

    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        chosen = [n for n, m in all_named if isinstance(m, LINEAR_TYPES) and n not in heads]
        if not chosen:
            raise TargetError(f"{method}: target_modules='all-linear' but the model has no linear layers")
    elif isinstance(target_modules, str):
        chosen = [n for n, _ in all_named if name_matches(n, target_modules)]
        if not chosen:
            raise TargetError(f"{method}: target_modules regex {target_modules!r} matches no module "
                              f"(it must match the whole path). " + _suggest(target_modules, leaf_names))
    else:
        entries = list(target_modules)
        if not entries:
            raise TargetError(f"{method}: target_modules is empty; name at least one module or use 'all-linear'")
        chosen_set: set[str] = set()
        short_names = {n.split(".")[-1] for n in leaf_names}
        for entry in entries:
            if isinstance(entry, type):
                hits = [n for n, m in all_named if isinstance(m, entry)]
                if not hits:
                    kinds = sorted({type(m).__name__ for _, m in all_named})
                    raise TargetError(f"{method}: target type {entry.__name__} matches no module; "
                                      f"module types in this model: {', '.join(kinds)}")
            else:
                hits = [n for n, _ in all_named if name_matches(n, [entry])]
                if not hits:
                    raise TargetError(f"{method}: target_modules entry {entry!r} matches no module. "
                                      + _suggest(entry, short_names | set(leaf_names)))
            chosen_set.update(hits)
        chosen = [n for n, _ in all_named if n in chosen_set]

    if exclude_modules:
        chosen = [n for n in chosen if not name_matches(n, exclude_modules)]
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        found = {n: layer_index(n, layers_pattern) for n in chosen}
        present = sorted({i for i in found.values() if i is not None})
        chosen = [n for n in chosen if found[n] in wanted]
        if not chosen:
            raise TargetError(f"{method}: layers_to_transform={sorted(wanted)} selects no target; "
                              f"the targets sit in layers {present or 'none (no numbered blocks found)'}")
    if not chosen:
        raise TargetError(f"{method}: every target was excluded by exclude_modules={exclude_modules!r}")

    modules = dict(all_named)
    bad = [n for n in chosen if not isinstance(modules[n], supported_types)]
    if bad:
        n = bad[0]
        kids = [c for c in leaf_names if c.startswith(n + ".")][:8]
        hint = f" Target its children instead: {', '.join(kids)}" if kids else ""
        kinds = ", ".join(t.__name__ for t in supported_types)
        raise TargetError(f"{method}: module '{n}' is a {type(modules[n]).__name__}; {method} adapts {kinds}.{hint}")
    return Selection(chosen)
