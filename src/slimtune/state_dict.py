"""PEFT's state-dict functions: the adapter's tensors in the file layout, and the base model's
tensors under their original names (what the model had before adapters were swapped in).

    get_peft_model_state_dict(pm)        {"base_model.model.<path>.lora_A.weight": ...}   (the file)
    get_base_model_state_dict(pm)        {"<path>.weight": ...}    (no base_layer / original_module)
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch.nn.modules.module import _IncompatibleKeys

from . import checkpoint as ckpt
from .inject import AdapterLayer, ModulesToSaveWrapper


def get_peft_model_state_dict(model, state_dict: dict | None = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers="auto") -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes for `adapter_name`. With `state_dict` (the PeftModel's full
    state dict, e.g. gathered by accelerate), the values come from it instead of the live model."""
    model = getattr(model, "_orig_mod", model) if unwrap_compiled else model
    out = model.get_adapter_state_dict(adapter_name)
    if state_dict is None:
        return out
    names = {id(t): n for n, t in list(model.named_parameters(remove_duplicate=False))
             + list(model.named_buffers(remove_duplicate=False))}
    live = model._key_map(adapter_name)
    return {k: state_dict.get(names.get(id(live[k]), k), v) for k, v in out.items()}


def set_peft_model_state_dict(model, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False) -> _IncompatibleKeys:
    """Load file-layout tensors into the existing adapter `adapter_name`; returns (missing_keys,
    unexpected_keys), as PEFT's (which loads what fits and reports the rest). `model` is a PeftModel, or
    a model with adapters injected in place (inject_adapter_in_model; keys then without
    "base_model.model."). Weights made with low_cpu_mem_usage=True (on meta) get memory first."""
    from .save_options import materialise

    state = peft_model_state_dict
    if isinstance(getattr(model, "base_model", None), nn.Module) and hasattr(model.base_model, "_check"):
        model.base_model._check(adapter_name)
        materialise(model.base_model.model, adapter_name)
        live = model._key_map(adapter_name)
    else:
        materialise(model, adapter_name)
        live = ckpt.adapter_key_map(model, adapter_name)
        state = {k.removeprefix(ckpt.PREFIX): v for k, v in state.items()}
    if ignore_mismatched_sizes:
        state = {k: v for k, v in state.items() if k not in live or tuple(live[k].shape) == tuple(v.shape)}
    return ckpt.load_into(live, state, "state dict", strict=False, model=model)


def load_peft_weights(model_id: str | os.PathLike, device: str | None = None, **_) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter folder (safetensors, or a .bin read with weights_only=True)."""
    state = ckpt.read_adapter_weights(str(model_id))
    return {k: v.to(device) for k, v in state.items()} if device else state


def _original_tensors(module: nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Walk the model as it was before injection: an adapter layer stands for its base layer, a
    modules_to_save wrapper for its original module."""
    while isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
        module = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
    for n, p in module._parameters.items():
        if p is not None:
            out[prefix + n] = p
    for n, b in module._buffers.items():
        if b is not None and n not in module._non_persistent_buffers_set:
            out[prefix + n] = b
    for n, child in module._modules.items():
        if child is not None:
            _original_tensors(child, f"{prefix}{n}.", out)


def _base_root(model) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def get_base_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's tensors under its original keys (adapter tensors and modules_to_save copies left out)."""
    out: dict[str, torch.Tensor] = {}
    _original_tensors(_base_root(model), "", out)
    return {k: v.detach() for k, v in out.items()}


def set_base_model_state_dict(model, state_dict: dict[str, torch.Tensor], strict: bool = True) -> _IncompatibleKeys:
    """Load a state dict with the base model's original keys into a model that holds adapters."""
    live: dict[str, torch.Tensor] = {}
    _original_tensors(_base_root(model), "", live)
    missing = [k for k in live if k not in state_dict]
    unexpected = [k for k in state_dict if k not in live]
    if strict and (missing or unexpected):
        raise RuntimeError(f"base state dict does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, v in state_dict.items():
            if k in live:
                live[k].copy_(v.to(dtype=live[k].dtype, device=live[k].device))
    return _IncompatibleKeys(missing, unexpected)
