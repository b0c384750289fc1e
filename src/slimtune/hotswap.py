"""Hot-swapping: replace the weights of a loaded LoRA adapter by another adapter's, in place (PEFT's
`hotswap_adapter`). The parameters keep their identity, so optimizers, hooks and compiled graphs
that hold them keep working; no layer is added or removed.

The new adapter must target the same modules. A smaller rank fits into a larger one (zero-padded:
the extra rank slots contribute nothing); `prepare_model_for_compiled_hotswap(model, target_rank)`
pads every layer up front so adapters of any rank up to it can be swapped in later. The scale
α/r of each layer is updated to the new adapter's (a Python float: a compiled model recompiles
once when it changes).
"""
from __future__ import annotations

import os

import torch

from . import checkpoint as ckpt
from .config import AdapterConfig
from .inject import adapter_layers


def _lora_layers(model, adapter: str):
    for path, layer in adapter_layers(model.base_model.model):
        if adapter in getattr(layer, "r", {}):
            yield path, layer


def prepare_model_for_compiled_hotswap(model, target_rank: int | None = None, config=None,
                                       check_compiled: str = "error") -> None:
    """Zero-pad every LoRA layer's A and B to `target_rank`, so later hotswaps of any rank up to it
    change values only (no new shapes, no recompilation)."""
    if target_rank is None:
        return
    for _, layer in adapter_layers(model.base_model.model):
        for name, r in list(getattr(layer, "r", {}).items()):
            if target_rank < r:
                raise ValueError(f"target_rank={target_rank} is below the rank {r} of adapter '{name}'")
            if target_rank == r or name not in getattr(layer, "lora_A", {}):
                continue
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            pad_a = a.new_zeros((target_rank,) + tuple(a.shape[1:]))
            pad_a[:r] = a.detach()
            pad_b = b.new_zeros((b.shape[0], target_rank) + tuple(b.shape[2:]))
            pad_b[:, :r] = b.detach()
            s = layer.scaling[name]
            layer.lora_A[name].weight = torch.nn.Parameter(pad_a, requires_grad=a.requires_grad)
            layer.lora_B[name].weight = torch.nn.Parameter(pad_b, requires_grad=b.requires_grad)
            layer.r[name], layer.scaling[name] = target_rank, s  # the effective update is unchanged


def hotswap_adapter_from_state_dict(model, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: AdapterConfig, parameter_prefix: str = "lora_") -> None:
    """Copy file-layout tensors into adapter `adapter_name`'s existing parameters (see module doc)."""
    old = model.peft_config[adapter_name]
    if config.peft_type != old.peft_type or getattr(config, "use_dora", False) != getattr(old, "use_dora", False):
        raise ValueError(f"hotswap needs an adapter of the same kind: loaded '{adapter_name}' is "
                         f"{old.peft_type.value}{' (DoRA)' if getattr(old, 'use_dora', False) else ''}, the new one "
                         f"{config.peft_type.value}{' (DoRA)' if getattr(config, 'use_dora', False) else ''}")
    live = model._key_map(adapter_name)
    missing, extra = sorted(set(live) - set(state_dict)), sorted(set(state_dict) - set(live))
    if missing or extra:
        raise ValueError(f"hotswap needs the same target modules: the new adapter lacks {missing[:3]} and has "
                         f"{extra[:3]} that '{adapter_name}' does not; load it with load_adapter instead")
    with torch.no_grad():
        for k, v in state_dict.items():
            t = live[k]
            if tuple(t.shape) == tuple(v.shape):
                t.copy_(v.to(t))
                continue
            if t.dim() != v.dim() or not (k.endswith(".lora_A.weight") and v.shape[0] <= t.shape[0] or
                                          k.endswith(".lora_B.weight") and v.shape[1] <= t.shape[1]):
                raise ValueError(f"hotswap: tensor '{k}' has shape {tuple(v.shape)}, the loaded one "
                                 f"{tuple(t.shape)}; a larger rank needs prepare_model_for_compiled_hotswap("
                                 "model, target_rank=...) before the first adapter is loaded")
            t.zero_()
            (t[: v.shape[0]] if ".lora_A." in k else t[:, : v.shape[1]]).copy_(v.to(t))
    for path, layer in _lora_layers(model, adapter_name):
        r, alpha = config.for_module(path)
        layer.scaling[adapter_name] = alpha / (r ** 0.5) if config.use_rslora else alpha / r
        layer.lora_alpha[adapter_name] = alpha
    model.peft_config[adapter_name] = config.replace(inference_mode=old.inference_mode)


def hotswap_adapter(model, model_name_or_path: str | os.PathLike, adapter_name: str,
                    torch_device: str | None = None, **kwargs) -> None:
    """Replace the weights of loaded adapter `adapter_name` with those saved in `model_name_or_path`."""
    path = str(model_name_or_path)
    config = AdapterConfig.from_pretrained(path)
    state = ckpt.read_adapter_weights(path)
    hotswap_adapter_from_state_dict(model, state, adapter_name, config)
