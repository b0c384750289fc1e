"""DoRA (Liu et al. 2024): weight-decomposed LoRA. The adapted weight is split into a direction,
updated by LoRA, and a learned per-output magnitude:

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row          m: (out,), initialised to ‖W‖_row

Computed as PEFT does, without forming W' for the output (the norm is detached, Sec. 4.3):

    y = base(x) + (m/‖·‖ − 1)·(W x) + (m/‖·‖)·s·B(A(x))

`LoraConfig(use_dora=True)` (or `make_config("dora", ...)`) selects these layers; files are PEFT's
LoRA format plus `lora_magnitude_vector` per layer, written with `peft_type: "LORA"` and
`use_dora: true`, so they load in HF PEFT and PEFT's load here. Linear and GPT-2 Conv1D layers;
mergeable (the merge is W ← W' and unmerge divides the magnitude factor back out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..registry import register_method
from .lora import LoraConfig, LoraModel
from .lora_layers import BASE_ADAPTER, Linear, variant_for


class DoraLinear(Linear):
    """LoRA Linear/Conv1D whose adapters listed in `lora_magnitude_vector` are DoRA adapters."""

    adapter_layer_names = Linear.adapter_layer_names + ("lora_magnitude_vector",)

    def update_layer(self, adapter: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool | str, use_rslora: bool, use_dora: bool = True) -> None:
        if "lora_magnitude_vector" not in self._modules:
            # A ParameterDict: on disk the key is "<path>.lora_magnitude_vector", as PEFT writes it.
            self.lora_magnitude_vector = nn.ParameterDict()
            self._dora_norm: dict[str, torch.Tensor] = {}  # row norms saved at merge, for unmerge
        super().update_layer(adapter, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)
        if use_dora:
            with torch.no_grad():
                m = self._weight_norm(adapter).detach()
            self.lora_magnitude_vector[adapter] = nn.Parameter(m)

    def _weight_norm(self, adapter: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + s·B·A‖ over each output row (W as (out, in)); the LoRA product is detached."""
        w = self._base_weight() if weight is None else weight
        lora_w = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight).detach()
        return torch.linalg.norm(w + self.scaling[adapter] * lora_w.to(w.dtype), dim=1).to(w.dtype)

    def _norm_for_forward(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """‖W + s·B·A‖ per row, detached. It forms an out×in matrix, so under no_grad (serving,
        generate) it is kept while W, A and B are unchanged (pointer and version) and reused."""
        if torch.is_grad_enabled():
            return self._weight_norm(name, w).detach()
        ts = (self.get_base_layer().weight, self.lora_A[name].weight, self.lora_B[name].weight)
        key = (w.dtype, self.scaling[name]) + tuple((t.data_ptr(), t._version) for t in ts)
        cache = self.__dict__.setdefault("_norm_cache", {})
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            hit = cache[name] = (key, self._weight_norm(name, w).detach())
        return hit[1]

    def _is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [] if (self.disable_adapters or self.merged) else list(self.active_adapters)
        if self._mixed is not None and active:
            names, _ = self._mixed
            if any(self._is_dora(n) for n in names if n != BASE_ADAPTER):
                raise ValueError("mixed-adapter batches are not supported with DoRA adapters; "
                                 "run one DoRA adapter per batch")
            return super().forward(x, *args, **kwargs)
        if not any(self._is_dora(n) for n in active):
            return super().forward(x, *args, **kwargs)
        base_out = self.base_layer(x, *args, **kwargs)
        out = base_out
        bias = self.bias
        for name in active:
            a, b = self.lora_A[name], self.lora_B[name]
            s, drop = self.scaling[name], self.lora_dropout[name]
            if not self._is_dora(name):
                out = out + b(a(drop(x))) * s
                continue
            w = self._base_weight().to(x.dtype)
            norm = self._norm_for_forward(name, w)  # (out,): a constant, as in the paper's Sec. 4.3
            scale = (self.lora_magnitude_vector[name].to(x.dtype) / norm)  # (out,)
            if isinstance(drop, nn.Identity) or not self.training:
                xd, plain = x, (base_out - bias if bias is not None else base_out)  # W x from the base output
            else:
                xd = drop(x)
                plain = F.linear(xd, w)
            out = out + (scale - 1) * plain + scale * b(a(xd)) * s
        return out

    # ---- merging: W <- m/‖W+ΔW‖ · (W+ΔW); unmerge divides the factor back out -----------------
    def _factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        f = self.lora_magnitude_vector[name].detach() / norm  # (out,)
        return f.view(1, -1) if self.fan_in_fan_out else f.view(-1, 1)  # broadcast on the stored weight

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.__dict__.pop("_norm_cache", None)  # W changes through .data here: no version bump to see
        base = self.get_base_layer()
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name in self.merged_adapters or name not in self.adapter_names():
                continue
            if not self._is_dora(name):
                super().merge([name], safe_merge=safe_merge)
                continue
            delta = self.get_delta_weight(name).to(base.weight.dtype)  # stored layout
            norm = self._weight_norm(name).detach()
            new = self._factor(name, norm).to(base.weight.dtype) * (base.weight.data + delta)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"merging DoRA adapter '{name}' gives NaN/Inf; the adapter is broken; nothing was merged")
            base.weight.data.copy_(new)
            self._dora_norm[name] = norm
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        self.__dict__.pop("_norm_cache", None)
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.get_delta_weight(name).to(base.weight.dtype)
            if self._is_dora(name):
                f = self._factor(name, self._dora_norm.pop(name)).to(base.weight.dtype)
                base.weight.data.copy_(base.weight.data / f - delta)
            else:
                base.weight.data.sub_(delta)


def create_dora_layer(base: nn.Module, adapter: str, config: LoraConfig, kw: dict) -> DoraLinear:
    """The DoRA layer for a base layer (called by LoraModel.create_layer when use_dora=True)."""
    from ..targeting import LINEAR_TYPES

    if not isinstance(base, LINEAR_TYPES):
        raise ConfigError(f"use_dora=True: DoRA in slimtune adapts Linear and Conv1D layers, not "
                          f"{type(base).__name__}; leave that module out of target_modules (or use exclude_modules)")
    cls = variant_for(base, DoraLinear)  # a quantized base gets its DoRA class (methods/lora_quant.py)
    return cls(base, adapter, fan_in_fan_out=config.fan_in_fan_out, use_dora=True, **kw)


def update_dora_layer(layer: nn.Module, adapter: str, config: LoraConfig, path: str, kw: dict) -> None:
    """Add an adapter to an existing layer (called by LoraModel.update_layer)."""
    if isinstance(layer, DoraLinear):
        layer.update_layer(adapter, use_dora=config.use_dora, **kw)
        return
    raise ValueError(f"'{path}' already holds plain LoRA adapters; a DoRA adapter cannot be added to it. "
                     "Load DoRA adapters first (or on a fresh model)")


@dataclass
class DoraConfig(LoraConfig):
    """`LoraConfig(use_dora=True)` under its own name for `make_config("dora", ...)`.

    Written to disk as PEFT's LORA config with `use_dora: true`, so PEFT reads it and reading it
    back gives a `LoraConfig(use_dora=True)`.
    """

    peft_type: ClassVar[str] = "DORA"  # registry key only; files say "LORA"
    method: ClassVar[str] = "dora"

    use_dora: bool = True

    def __post_init__(self) -> None:
        if not self.use_dora:
            raise ConfigError("DoraConfig(use_dora=False) is plain LoRA: use LoraConfig / make_config('lora')")
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["peft_type"] = LoraConfig.peft_type
        return d


@register_method(DoraConfig, mergeable=True,
                 description="DoRA: LoRA direction + learned magnitude (saved as PEFT LoRA with use_dora)")
class DoraModel(LoraModel):
    """LoRA's tuner; the layers come from `use_dora=True` (see LoraModel.create_layer)."""
