"""Hot-swapping: replace the weights of a loaded LoRA adapter by another adapter's, in place (PEFT's
`hotswap_adapter`). The parameters keep their identity, so optimizers, hooks and compiled graphs
that hold them keep working; no layer is added or removed.

The new adapter must target the same modules or fewer (the loaded adapter's other modules are
zeroed). A smaller rank fits into a larger one (zero-padded: the extra rank slots contribute
nothing; on a grouped conv each group's block of rank slots keeps its place); a larger rank
reshapes the parameters in place (same objects, as PEFT's swap_tensors), which a compiled model
recompiles for, so `prepare_model_for_compiled_hotswap(model, target_rank)` pads every layer up
front so adapters of any rank up to it can be swapped in later. The scale
α/r of each layer is updated to the new adapter's (a Python float: a compiled model recompiles
once when it changes).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import checkpoint as ckpt
from .config import AdapterConfig
from .inject import adapter_layers


class HotswapError(RuntimeError, ValueError):
    """The new adapter cannot replace the loaded one in place (PEFT raises RuntimeError or ValueError)."""


def _lora_layers(model, adapter: str):
    for path, layer in adapter_layers(model.base_model.model):
        if adapter in getattr(layer, "r", {}):
            yield path, layer


def _groups(layer) -> int:
    return getattr(layer.get_base_layer(), "groups", 1)


def _place_a(dst: torch.Tensor, src: torch.Tensor, groups: int) -> None:
    """Copy lora_A (rank first) into a zeroed larger one. A grouped conv's B reads rank slot block g
    for output group g, so each group's block keeps its offset (PEFT's layout)."""
    dst.zero_()
    rd, rs = dst.shape[0] // groups, src.shape[0] // groups
    for g in range(groups):  # groups is 1 except on grouped convs: a handful of copies, not a hot path
        dst[g * rd: g * rd + rs].copy_(src[g * rs: (g + 1) * rs].to(dst))


def _place_b(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.zero_()
    dst[:, : src.shape[1]].copy_(src.to(dst))


def prepare_model_for_compiled_hotswap(model, target_rank: int | None = None, config=None,
                                       check_compiled: str = "error") -> None:
    """Zero-pad every LoRA layer's A and B to `target_rank`, so later hotswaps of any rank up to it
    change values only (no new shapes, no recompilation). As PEFT: call it before torch.compile
    (`check_compiled`: "error", "warn" or "ignore" for a model that is already compiled), and a
    `config` given (one config or PeftModel.peft_config) gets `r` and its rank_pattern set to
    `target_rank`."""
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. This "
                          "will likely result in re-compilation, hurting performance. Call the function before "
                          "compiling the model.", stacklevel=2)
        elif check_compiled != "ignore":
            raise ValueError(f"check_compiled should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead.")
    layers = [layer for _, layer in adapter_layers(model.base_model.model) if getattr(layer, "r", None)]
    if not layers:
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    if target_rank is None:
        return
    for layer in layers:
        for name, r in list(layer.r.items()):
            if target_rank < r:
                raise ValueError(f"target_rank={target_rank} is below the rank {r} of adapter '{name}'")
            if target_rank == r or name not in getattr(layer, "lora_A", {}):
                continue
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            g = _groups(layer)
            pad_a = a.new_empty((target_rank,) + tuple(a.shape[1:]))
            pad_b = b.new_empty((b.shape[0], target_rank // g) + tuple(b.shape[2:]))  # grouped B: rank/groups inputs
            with torch.no_grad():
                _place_a(pad_a, a.detach(), g)
                _place_b(pad_b, b.detach())
            layer.lora_A[name].weight = torch.nn.Parameter(pad_a, requires_grad=a.requires_grad)
            layer.lora_B[name].weight = torch.nn.Parameter(pad_b, requires_grad=b.requires_grad)
            if isinstance(layer.lora_B[name], torch.nn.modules.conv._ConvNd):
                layer.lora_A[name].out_channels = layer.lora_B[name].in_channels = target_rank
            layer.r[name] = target_rank  # the scale stays: the effective update is unchanged
    if config:
        for cfg in (config.values() if isinstance(config, dict) else [config]):
            cfg.r = target_rank
            cfg.rank_pattern = {k: target_rank for k in (cfg.rank_pattern or {})}


def hotswap_adapter_from_state_dict(model, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: AdapterConfig, parameter_prefix: str = "lora_") -> None:
    """Copy file-layout tensors into adapter `adapter_name`'s existing parameters (see module doc)."""
    old = model.peft_config[adapter_name]
    if config.peft_type != old.peft_type or getattr(config, "use_dora", False) != getattr(old, "use_dora", False):
        raise ValueError(f"hotswap needs an adapter of the same kind: loaded '{adapter_name}' is "
                         f"{old.peft_type.value}{' (DoRA)' if getattr(old, 'use_dora', False) else ''}, the new one "
                         f"{config.peft_type.value}{' (DoRA)' if getattr(config, 'use_dora', False) else ''}")
    live = model._key_map(adapter_name)
    extra = sorted(set(state_dict) - set(live))
    if extra:
        raise HotswapError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(extra[:3])}: "
                           f"the new adapter targets modules '{adapter_name}' does not; load it with load_adapter instead")
    owner = {id(p): layer for _, layer in _lora_layers(model, adapter_name) for _, p in layer.adapter_parameters(adapter_name)}
    with torch.no_grad():
        for k in set(live) - set(state_dict):  # the new adapter leaves these modules alone: zero them (PEFT)
            live[k].zero_()
        for k, v in state_dict.items():
            t, layer = live[k], owner.get(id(live[k]))
            if tuple(t.shape) == tuple(v.shape):
                t.copy_(v.to(t))
                continue
            is_a = layer is not None and any(t is m.weight for m in layer.lora_A.values())
            is_b = layer is not None and any(t is m.weight for m in layer.lora_B.values())
            if t.dim() != v.dim() or not (is_a or is_b):
                raise HotswapError(f"hotswap: tensor '{k}' has shape {tuple(v.shape)}, the loaded one {tuple(t.shape)}")
            if all(a >= b for a, b in zip(t.shape, v.shape)):  # smaller rank: zero-padded in place
                _place_a(t, v, _groups(layer)) if is_a else _place_b(t, v)
            else:  # larger rank: the parameter (same object) takes the new shape, as PEFT's swap_tensors
                t.data = v.to(dtype=t.dtype, device=t.device).clone()
                if is_a:
                    layer.r[adapter_name] = v.shape[0]
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
