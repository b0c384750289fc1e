"""BitFit (Ben Zaken et al. 2022): train only the bias terms, every weight stays frozen.

All biases of the model train (attention, feed-forward and LayerNorm biases, as in the paper),
or only those of `target_modules`; a task head (SEQ_CLS: classifier) trains in full. The
biases are the model's own, trained in place and saved under their paths:

    base_model.model.bert.encoder.layer.0.attention.self.query.bias

A copy of the starting biases is kept (they are small), so `disable_adapter()` and `unload()`
give the base model back. One BitFit adapter per model. A model without biases (Llama, Mistral,
Qwen, ...) is an error before training: use LoRA there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn as nn

from ..config import AdapterConfig, listify
from ..peft_types import PeftType
from ..families import model_type
from ..registry import register_method
from ..targeting import TargetError, name_matches
from ._select import InPlaceTuner, head_paths, module_params


@dataclass
class BitFitConfig(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.BITFIT  # slimtune's own type: PEFT has no BitFit
    method: ClassVar[str] = "bitfit"

    target_modules: Any = None  # None: every bias in the model; else names/regex of modules whose bias trains
    exclude_modules: Any = None
    modules_to_save: Any = None  # modules trained in full besides the biases (the task head is added by task_type)

    def __post_init__(self) -> None:
        self.target_modules = listify(self.target_modules)
        self.exclude_modules = listify(self.exclude_modules)
        self.modules_to_save = listify(self.modules_to_save)


def bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every `bias` Parameter, by path, found on the modules (not by a name substring)."""
    return {f"{n}.bias" if n else "bias": m._parameters["bias"] for n, m in model.named_modules()
            if isinstance(m._parameters.get("bias"), nn.Parameter)}


@register_method(BitFitConfig, mergeable=True, description="train only the bias terms (in place)")
class BitFitModel(InPlaceTuner):
    keep_original = True

    def select_parameters(self, config: BitFitConfig) -> dict[str, nn.Parameter]:
        heads = head_paths(self.model, config)
        biases = {k: p for k, p in bias_parameters(self.model).items()
                  if not any(k.startswith(h + ".") for h in heads)}
        if not biases:
            mt = model_type(self.model) or type(self.model).__name__
            raise TargetError(
                f"bitfit: the model ({mt}) has no bias parameters, so BitFit would train nothing "
                "(Llama, Mistral, Qwen and most recent LLMs have none). Use LoRA instead: "
                "make_config('lora', r=8) / LoraConfig(r=8)")
        owners = {k[: -len(".bias")] if k != "bias" else "" for k in biases}
        if config.target_modules is not None:
            pat = config.target_modules
            chosen = {o for o in owners if name_matches(o, pat)}
            if not chosen:
                shown = ", ".join(sorted({o.split(".")[-1] for o in owners})[:30])
                raise TargetError(f"bitfit: target_modules={pat!r} selects no module with a bias; "
                                  f"modules with a bias: {shown}")
            owners = chosen
        if config.exclude_modules:
            owners = {o for o in owners if not name_matches(o, config.exclude_modules)}
        params = {k: p for k, p in biases.items() if (k[: -len(".bias")] if k != "bias" else "") in owners}
        if not params:
            raise TargetError(f"bitfit: every bias was excluded by exclude_modules={config.exclude_modules!r}")
        params.update(module_params(self.model, heads))
        if heads:  # record the head in the config, as PEFT does for task heads
            config.modules_to_save = list(dict.fromkeys(list(config.modules_to_save or [])
                                                        + [h.split(".")[-1] for h in heads]))
        return params
