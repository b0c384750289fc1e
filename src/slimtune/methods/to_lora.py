"""Any additive adapter as a plain LoRA (PEFT's `convert_to_lora` / `save_as_lora`, peft 0.19+).

Downstream tools (vLLM, diffusers, llama.cpp's converter) load LoRA and little else, so an adapter
trained with LoHa, LoKr or VeRA is converted layer by layer: its ΔW (out × in) is split by a
truncated SVD, ΔW ≈ (U_k·S_k)·V_k = B·A, with lora_alpha = r so the scale is 1 (the scale is in B).

    rank: int    k for every layer
          float  0 < t ≤ 1: per layer the smallest k whose singular values carry a fraction t of
                 ‖ΔW‖²_F (ranks then go into rank_pattern / alpha_pattern)

Returns (LoraConfig, state dict with PEFT's file keys), the same call and result as PEFT's, so
`save_as_lora` writes a folder either library loads. Which layers convert is PEFT's rule: the
additive ones on a Linear (LoHa, LoKr, VeRA; LoRA itself with a warning). OFT multiplies the weight
and AdaLoRA / DoRA carry more than B·A, so a model holding any of them is refused, as in PEFT.
One difference: without a `peft_config` (a model from `inject_adapter_in_model`) PEFT leaves
lora_alpha at its default 8, which scales the converted adapter by 8/r; here lora_alpha = r.
"""
from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.nn as nn

from ..inject import AdapterLayer, ModulesToSaveWrapper
from ..targeting import Conv1D

PREFIX = "base_model.model."


def _convertible(layer: AdapterLayer) -> bool:
    """PEFT's `supports_lora_conversion`: W' = W + ΔW on a (plain) Linear or Conv1D."""
    from ._lycoris import DeltaLayer
    from .dora import DoraLinear
    from .lora_layers import Linear
    from .vera import VeraLinear

    if isinstance(layer, DeltaLayer):
        return type(layer.base_layer) is nn.Linear
    if isinstance(layer, Linear):  # plain LoRA on a plain Linear / Conv1D (not DoRA, not a quantized base)
        return not isinstance(layer, DoraLinear) and type(layer.base_layer) in (nn.Linear, Conv1D)
    return isinstance(layer, VeraLinear)


def _cutoff(s: torch.Tensor, threshold: float) -> int:
    """Smallest k with Σ_{i<k} s_i² ≥ threshold · Σ s_i² (s sorted descending)."""
    energy = torch.cumsum(s.double() ** 2, 0)
    return int(torch.searchsorted(energy, threshold * energy[-1]).item()) + 1


@torch.no_grad()
def _layer_to_lora(layer: AdapterLayer, rank: int | float, adapter: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(lora_A, lora_B, k) for one layer: the top-k SVD of its ΔW in the layer's weight layout."""
    delta = layer.get_delta_weight(adapter)
    dtype = delta.dtype
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = rank if isinstance(rank, int) else _cutoff(s, rank)
    if k > u.shape[1]:
        raise ValueError(f"rank={k} is larger than this layer's ΔW allows ({u.shape[1]}, its smaller side); "
                         "choose a lower rank")
    b, a = (u[:, :k] * s[:k]).to(dtype), vh[:k].to(dtype)
    if isinstance(layer.get_base_layer(), Conv1D):  # ΔW is stored (in, out) there: the factors swap and transpose
        return b.t().contiguous(), a.t().contiguous(), k
    return a.contiguous(), b.contiguous(), k


def convert_to_lora(model: nn.Module, rank: int | float, adapter_name: str = "default", progressbar: bool = False,
                    compile_kwargs: dict | None = None):
    """(LoraConfig, state dict) of `adapter_name` as a plain LoRA of `rank` (int, or a float energy
    threshold in (0, 1]). `progressbar` and `compile_kwargs` are accepted for PEFT's signature: the
    per-layer SVD needs neither (compile_kwargs compiles that function, as PEFT does)."""
    from .lora import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank={rank!r}: give an int (the LoRA rank) or a float in (0, 1] (an energy threshold)")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"rank={rank}: a float rank is a threshold of the singular values' energy, in (0, 1]")
    if isinstance(rank, int) and rank <= 0:
        raise ValueError(f"rank={rank}: the LoRA rank must be a positive integer")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    refused = sorted({type(m).__name__ for _, m in layers if not _convertible(m)})
    if refused:
        raise TypeError(f"these layer types cannot be converted to LoRA (their update is not W + ΔW on a Linear): "
                        f"{', '.join(refused)}; convert_to_lora takes LoHa, LoKr, VeRA and LoRA adapters")
    layers = [(n, m) for n, m in layers if adapter_name in m.adapter_names()]
    if not layers:
        raise TypeError(f"no layer of this model holds adapter '{adapter_name}' in a form convert_to_lora takes")
    cfg = getattr(model, "peft_config", {}).get(adapter_name)
    if cfg is not None and cfg.peft_type == "LORA":
        warnings.warn("this adapter is a LoRA already; converting it only re-factors (or truncates) it", stacklevel=2)
    bias = getattr(cfg, "bias", getattr(cfg, "lora_bias", "none"))
    if bias not in ("none", False):
        raise ValueError(f"the adapter's config sets bias={bias!r}; convert_to_lora converts weights only (bias='none')")

    fixed = isinstance(rank, int)
    kw: dict = dict(r=rank if fixed else 1, lora_alpha=rank if fixed else 1, rank_pattern={}, alpha_pattern={})
    if cfg is not None:
        kw.update(target_modules=copy.copy(cfg.target_modules), base_model_name_or_path=cfg.base_model_name_or_path)
        if hasattr(cfg, "layers_pattern"):
            kw.update(layers_pattern=cfg.layers_pattern, layers_to_transform=cfg.layers_to_transform)
    targets = kw.get("target_modules")
    targets = list(targets) if isinstance(targets, (list, tuple, set)) else targets
    names_as_list = targets is None or isinstance(targets, list)
    targets = [] if targets is None else targets
    excluded: list[str] = []
    convert = torch.compile(_layer_to_lora, **compile_kwargs) if compile_kwargs is not None else _layer_to_lora

    state: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        a, b, k = convert(layer, rank, adapter_name)
        path = name.removeprefix(PREFIX)
        if k == 0:  # a threshold can keep nothing of an all-zero ΔW: that layer is left out
            excluded.append(path)
            continue
        if k != rank or not names_as_list:
            kw["rank_pattern"][path] = kw["alpha_pattern"][path] = k
        elif path not in targets:
            targets.append(path)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    kw["target_modules"] = targets
    if excluded:
        kw["exclude_modules"] = excluded

    if cfg is not None and getattr(cfg, "modules_to_save", None):
        kw["modules_to_save"] = copy.copy(cfg.modules_to_save)
        for name, mod in model.named_modules():
            if isinstance(mod, ModulesToSaveWrapper) and adapter_name in mod.modules_to_save:
                for pname, p in mod.modules_to_save[adapter_name].named_parameters():
                    state[f"{name}.{pname}"] = p.detach()
    return LoraConfig(**kw), state


def save_as_lora(path: str | os.PathLike, model: nn.Module, rank: int | float, adapter_name: str = "default",
                 progressbar: bool = False, compile_kwargs: dict | None = None) -> None:
    """convert_to_lora, written as a PEFT adapter folder (adapter_model.safetensors + adapter_config.json)."""
    from safetensors.torch import save_file

    config, state = convert_to_lora(model, rank, adapter_name, progressbar, compile_kwargs)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "adapter_model.safetensors"))
    config.save_pretrained(path)
