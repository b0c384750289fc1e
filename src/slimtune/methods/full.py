"""Full fine-tuning through the adapter pipeline: the baseline every PEFT method is compared to.

Every parameter trains in place; save_pretrained writes the whole parameter state (tied weights
once) to `adapter_model.safetensors` under `base_model.model.<param path>`, and from_pretrained
loads it back onto a model of the same architecture. `merge_and_unload()` returns the trained
model itself. One adapter per model; no copy of the starting weights is kept (it would double
the memory), so `disable_adapter()` / `unload()` are errors that say so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from ..config import AdapterConfig
from ..peft_types import PeftType
from ..registry import register_method
from ._select import InPlaceTuner, module_params


@dataclass
class FullConfig(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.FULL  # slimtune's own type
    method: ClassVar[str] = "full"


@register_method(FullConfig, mergeable=True, description="full fine-tuning: every parameter trains (baseline)")
class FullModel(InPlaceTuner):
    keep_original = False

    def select_parameters(self, config: FullConfig) -> dict[str, nn.Parameter]:
        return {k: p for k, p in module_params(self.model, [""]).items() if p.is_floating_point()}
