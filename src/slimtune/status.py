"""`get_layer_status` / `get_model_status`: what each adapter module holds and does, PEFT's dataclasses.

One entry per adapter module (LoRA/IA3/... layers and modules_to_save wrappers); the model status
folds them, and says "irregular" where the modules disagree (a sign of a half-switched model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from .inject import AdapterLayer, ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _fold(values) -> bool | Irregular:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _adapter_params(module: nn.Module, name: str) -> list:
    return [p for _, p in module.adapter_parameters(name)]


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One TunerLayerStatus per adapter module of a PeftModel (or of a model with adapters injected)."""
    root = getattr(model, "base_model", model)
    out: list[TunerLayerStatus] = []
    for name, m in root.named_modules():
        if isinstance(m, AdapterLayer):
            active, merged, names = list(m.active_adapters), list(m.merged_adapters), m.adapter_names()
            kind = f"{type(m).__module__.rsplit('.', 1)[-1].split('_')[0]}.{type(m).__name__}"
        elif isinstance(m, ModulesToSaveWrapper):
            names = m.adapter_names()
            active, merged = ([m.active_adapter] if m.active_adapter else []), []
            kind = "ModulesToSaveWrapper"
        else:
            continue
        params = {a: _adapter_params(m, a) for a in names}
        out.append(TunerLayerStatus(
            name=name, module_type=kind, enabled=not m.disable_adapters, active_adapters=active,
            merged_adapters=merged,
            requires_grad={a: _fold(p.requires_grad for p in ps) for a, ps in params.items() if ps},
            available_adapters=sorted(names),
            devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items() if ps},
            quantization_backend=getattr(m, "quantization_backend", None)))
    if not out:
        raise ValueError("no adapter layers found in the model: pass a PeftModel, or a model that "
                         "inject_adapter_in_model has given adapters")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The layers' status folded into one (PEFT's TunerModelStatus)."""
    layers = get_layer_status(model)
    tuner = getattr(model, "base_model", None)
    has_tuner = hasattr(tuner, "peft_config") and hasattr(tuner, "model")
    base = tuner.model if has_tuner else model
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged_all = sorted({a for s in layers for a in s.merged_adapters})
    irregular_merge = any(set(s.available_adapters) - set(s.merged_adapters) & set(merged_all) for s in layers)
    grads: dict[str, list] = {}
    devices: dict[str, set] = {}
    for s in layers:
        for a, v in s.requires_grad.items():
            grads.setdefault(a, []).append(v)
        for a, d in s.devices.items():
            devices.setdefault(a, set()).update(d)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=type(base).__name__ if hasattr(base, "config") else "other",
        adapter_model_type=type(tuner).__name__ if has_tuner else "None",
        peft_types={k: getattr(c.peft_type, "value", c.peft_type) for k, c in tuner.peft_config.items()} if has_tuner else {},
        trainable_params=trainable, total_params=sum(p.numel() for p in params),
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters="irregular" if irregular_merge else merged_all,
        requires_grad={a: _fold(v) for a, v in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(d) for a, d in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular")
