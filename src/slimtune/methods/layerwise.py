"""Layer-wise fine-tuning: chosen transformer blocks train in full, the rest stays frozen.

Blocks are picked from the model's repeated-block list (`model.layers`, `encoder.layer`,
`transformer.h`, ...) by `first_n`, `last_n` or an index list `layers` (negative indices count
from the end), and/or by module path with `blocks` (e.g. ["model.norm", "lm_head"]). A task
head (SEQ_CLS: classifier) trains too. The chosen parameters train in place and are the only
ones saved, under their own paths:

    base_model.model.model.layers.1.self_attn.q_proj.weight

One layer-wise adapter per model; no copy of the starting weights is kept, so
`disable_adapter()` / `unload()` are errors that say so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn as nn

from ..config import AdapterConfig, ConfigError, listify
from ..peft_types import PeftType
from ..registry import register_method
from ..targeting import TargetError
from ._select import InPlaceTuner, head_paths, module_params


@dataclass
class LayerwiseConfig(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.LAYERWISE  # slimtune's own type
    method: ClassVar[str] = "layerwise"

    first_n: int | None = None  # train the first N blocks
    last_n: int | None = None  # train the last N blocks (the usual choice: top layers adapt most)
    layers: Any = None  # explicit block indices; negative counts from the end
    blocks: Any = None  # module paths or dotted suffixes trained in full (e.g. "model.norm", "lm_head")
    layers_pattern: str | None = None  # name of the block list ("layers", "h", "layer") if ambiguous
    modules_to_save: Any = None  # extra modules trained in full (the task head is added by task_type)

    def __post_init__(self) -> None:
        self.layers = [self.layers] if isinstance(self.layers, int) else listify(self.layers)
        self.blocks = listify(self.blocks)
        if isinstance(self.blocks, str):
            self.blocks = [self.blocks]
        self.modules_to_save = listify(self.modules_to_save)
        for k in ("first_n", "last_n"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ConfigError(f"{k}={v!r}: must be a positive integer")
        if self.first_n is None and self.last_n is None and not self.layers and not self.blocks:
            raise ConfigError("layerwise: choose what trains: last_n=N, first_n=N, layers=[i, ...] "
                              "or blocks=['module.path', ...]")


def block_list(model: nn.Module, pattern: str | None = None) -> tuple[str, nn.ModuleList]:
    """The repeated-block list: the ModuleList named `pattern`, else the one holding most parameters."""
    cands = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if pattern:
        hits = [(n, m) for n, m in cands if n.split(".")[-1] == pattern]
        if not hits:
            raise TargetError(f"layerwise: no block list named '{pattern}'; lists in this model: "
                              + ", ".join(n for n, _ in cands))
        cands = hits
    if not cands:
        raise TargetError("layerwise: the model has no list of repeated blocks (nn.ModuleList); "
                          "name the modules to train with blocks=[...]")
    return max(cands, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


@register_method(LayerwiseConfig, mergeable=True, description="train chosen blocks in full, freeze the rest")
class LayerwiseModel(InPlaceTuner):
    keep_original = False

    def chosen_paths(self, config: LayerwiseConfig) -> list[str]:
        paths: list[str] = []
        if config.first_n or config.last_n or config.layers:
            name, blocks = block_list(self.model, config.layers_pattern)
            n = len(blocks)
            idx: list[int] = []
            if config.first_n:
                idx += list(range(min(config.first_n, n)))
            if config.last_n:
                idx += list(range(max(0, n - config.last_n), n))
            for i in config.layers or []:
                if not -n <= i < n:
                    raise TargetError(f"layerwise: layer {i} does not exist; '{name}' has {n} blocks (0..{n - 1})")
                idx.append(i % n)
            paths += [f"{name}.{i}" for i in sorted(set(idx))]
        names = [m for m, _ in self.model.named_modules() if m]
        for entry in config.blocks or []:
            hits = [m for m in names if m == entry or m.endswith("." + entry)]
            if not hits:
                raise TargetError(f"layerwise: blocks entry '{entry}' matches no module")
            paths += hits
        return paths

    def select_parameters(self, config: LayerwiseConfig) -> dict[str, nn.Parameter]:
        heads = head_paths(self.model, config)
        if heads:
            config.modules_to_save = list(dict.fromkeys(list(config.modules_to_save or [])
                                                        + [h.split(".")[-1] for h in heads]))
        return module_params(self.model, self.chosen_paths(config) + heads)
