"""DoRA (Liu et al. 2024): weight-decomposed LoRA. The adapted weight is split into a direction,
updated by LoRA, and a learned per-output magnitude:

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row          m: (out,), initialised to ‖W‖_row

Computed as PEFT does, without forming W' for the output (the norm is detached, Sec. 4.3):

    y = base(x) + (m/‖·‖ − 1)·(W x) + (m/‖·‖)·s·B(A(x))

`LoraConfig(use_dora=True)` (or `make_config("dora", ...)`) selects these layers; files are PEFT's
LoRA format plus `lora_magnitude_vector` per layer, written with `peft_type: "LORA"` and
`use_dora: true`, so they load in HF PEFT and PEFT's load here. Linear and GPT-2 Conv1D layers,
and (as PEFT's variants) Embedding and Conv1d/2d/3d; mergeable (the merge is W ← W' and unmerge
divides the magnitude factor back out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..peft_types import PeftType
from ..registry import register_method
from .lora import LoraConfig, LoraModel
from .lora_layers import BASE_ADAPTER, Conv, Embedding, Linear, variant_for


class _DoraMerge:
    """merge / unmerge for every DoRA layer: W <- f ⊙ (W + ΔW), f = m / ‖W + ΔW‖ on the weight before
    this merge (as the forward sees it); unmerge divides f back out and subtracts ΔW. Each layer type
    says how its norm is taken (`_merge_norm`) and how f lies on its stored weight (`_merge_factor`).
    A plain-LoRA adapter on the same layer merges through the LoRA layer's own merge."""

    def _merge_norm(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _merge_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
            norm = self._merge_norm(name)
            delta = self.get_delta_weight(name).to(base.weight.dtype)  # stored layout
            new = self._merge_factor(name, norm).to(base.weight.dtype) * (base.weight.data + delta)
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
                f = self._merge_factor(name, self._dora_norm.pop(name)).to(base.weight.dtype)
                base.weight.data.copy_(base.weight.data / f - delta)
            else:
                base.weight.data.sub_(delta)


class DoraLinear(_DoraMerge, Linear):
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
                out = out + self._lora_out(name, x) * s
                continue
            w = self._base_weight().to(x.dtype)
            norm = self._norm_for_forward(name, w)  # (out,): a constant, as in the paper's Sec. 4.3
            scale = (self.lora_magnitude_vector[name].to(x.dtype) / norm)  # (out,)
            if isinstance(drop, nn.Identity) or not self.training:
                xd, plain = x, (base_out - bias if bias is not None else base_out)  # W x from the base output
            else:
                xd = drop(x)
                plain = F.linear(xd, w)
            lora = b(a(xd.to(a.weight.dtype))).to(x.dtype)
            out = out + (scale - 1) * plain + scale * lora * s
        return out

    # ---- merging (_DoraMerge): the row norm, f laid on the stored weight ------------------------
    def _merge_norm(self, name: str) -> torch.Tensor:
        return self._weight_norm(name).detach()

    def _merge_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        f = self.lora_magnitude_vector[name].detach() / norm  # (out,)
        return f.view(1, -1) if self.fan_in_fan_out else f.view(-1, 1)  # broadcast on the stored weight


class _DoraExtra(_DoraMerge):
    """DoRA for the other LoRA layer types (PEFT's variants): a magnitude per output feature of the
    adapted weight, found by `_norm` on W + ΔW (detached), applied as f = m/‖W + ΔW‖.

    Embedding: ‖·‖ over the vocabulary for each embedding dim, f (dim,) scales the lookup.
    Conv:      ‖·‖ over (in, kernel) for each output channel, f (1, out, 1, ...) scales the channels.
    """

    def _init_dora(self) -> None:
        if "lora_magnitude_vector" not in self._modules:
            self.lora_magnitude_vector = nn.ParameterDict()
            self._dora_norm: dict[str, torch.Tensor] = {}

    def _is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def _dora_norm_of(self, name: str) -> torch.Tensor:
        base = self.get_base_layer().weight
        return self._norm(base + self.get_delta_weight(name).detach().to(base.dtype)).detach()

    def _add_magnitude(self, adapter: str, use_dora: bool) -> None:
        if use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector[adapter] = nn.Parameter(self._dora_norm_of(adapter))

    def _merge_norm(self, name: str) -> torch.Tensor:
        return self._dora_norm_of(name)

    def _merge_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        return self._weight_factor(self.lora_magnitude_vector[name].detach() / norm)


class DoraEmbedding(_DoraExtra, Embedding):
    adapter_layer_names = Embedding.adapter_layer_names + ("lora_magnitude_vector",)

    def update_layer(self, adapter: str, *args, use_dora: bool = True, **kw) -> None:
        self._init_dora()
        super().update_layer(adapter, *args, **kw)
        self._add_magnitude(adapter, use_dora)

    @staticmethod
    def _norm(w: torch.Tensor) -> torch.Tensor:  # w (vocab, dim) -> (dim,)
        return torch.linalg.norm(w, dim=0).to(w.dtype)

    @staticmethod
    def _weight_factor(f: torch.Tensor) -> torch.Tensor:
        return f.view(1, -1)  # scales each embedding dim (column) of W

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [] if (self.disable_adapters or self.merged) else list(self.active_adapters)
        if not any(self._is_dora(n) for n in active):
            if self._mixed is not None and any(self._is_dora(n) for n in self._mixed[0] if n != BASE_ADAPTER):
                raise ValueError("mixed-adapter batches are not supported with DoRA adapters; run one DoRA adapter per batch")
            return super().forward(x, *args, **kwargs)
        if self._mixed is not None:
            raise ValueError("mixed-adapter batches are not supported with DoRA adapters; run one DoRA adapter per batch")
        out = self.base_layer(x, *args, **kwargs)
        for name in active:
            if not self._is_dora(name):
                out = out + self._delta(name, x).to(out.dtype)
                continue
            f = (self.lora_magnitude_vector[name] / self._dora_norm_of(name)).to(out.dtype)  # (dim,)
            out = f * out + f * self._delta(name, x).to(out.dtype)  # = lookup of f·(W + ΔW), embed_scale included
        return out


class DoraConv(_DoraExtra, Conv):
    adapter_layer_names = Conv.adapter_layer_names + ("lora_magnitude_vector",)

    def update_layer(self, adapter: str, *args, use_dora: bool = True, **kw) -> None:
        self._init_dora()
        super().update_layer(adapter, *args, **kw)
        self._add_magnitude(adapter, use_dora)

    def _dora_norm_of(self, name: str) -> torch.Tensor:
        """‖W + s·B·A‖ per output channel. On a grouped conv B·A (a full conv) has no place in the grouped
        weight; PEFT takes B (out, r/g) and A (r, in·k) as matrices, reshapes their product to W's
        shape and normalises that, and so does slimtune, so files and outputs agree (merging stays
        refused, as in PEFT). For groups=1 this is exactly ΔW."""
        base = self.get_base_layer()
        if base.groups == 1:
            return super()._dora_norm_of(name)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        r = a.shape[0]
        lw = (b.detach().reshape(-1, r) @ a.detach().reshape(r, -1)).reshape(base.weight.shape) * self.scaling[name]
        return self._norm(base.weight + lw.to(base.weight.dtype)).detach()

    @staticmethod
    def _norm(w: torch.Tensor) -> torch.Tensor:  # w (out, in, *k) -> (1, out, 1, ...)
        return w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(0, 1)

    @staticmethod
    def _weight_factor(f: torch.Tensor) -> torch.Tensor:
        return f.transpose(0, 1)  # (out, 1, 1, ...): scales each output channel of W

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [] if (self.disable_adapters or self.merged) else list(self.active_adapters)
        if self._mixed is not None and active:
            if any(self._is_dora(n) for n in self._mixed[0] if n != BASE_ADAPTER):
                raise ValueError("mixed-adapter batches are not supported with DoRA adapters; run one DoRA adapter per batch")
            return super().forward(x, *args, **kwargs)
        if not any(self._is_dora(n) for n in active):
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        out = self.base_layer(x, *args, **kwargs)
        for name in active:
            drop, s = self.lora_dropout[name], self.scaling[name]
            if not self._is_dora(name):
                out = out + self._delta(name, x)
                continue
            f = (self.lora_magnitude_vector[name] / self._dora_norm_of(name)).to(out.dtype)  # (1, out, 1, ...)
            if isinstance(drop, nn.Identity) or not self.training:
                xd = x
                plain = out if base.bias is None else out - base.bias.view(1, -1, *([1] * (out.dim() - 2)))
            else:  # W x on the dropped-out input, as the LoRA path sees it
                xd = drop(x)
                plain = base._conv_forward(xd, base.weight, None)
            lora = self.lora_B[name](self.lora_A[name](xd.to(self.lora_A[name].weight.dtype))).to(out.dtype)
            out = out + (f - 1) * plain + f * lora * s
        return out


def create_dora_layer(base: nn.Module, adapter: str, config: LoraConfig, kw: dict) -> nn.Module:
    """The DoRA layer for a base layer (called by LoraModel.create_layer when use_dora=True)."""
    from ..targeting import LINEAR_TYPES

    if isinstance(base, LINEAR_TYPES):  # a quantized base gets its DoRA class (methods/lora_quant.py)
        return variant_for(base, DoraLinear)(base, adapter, fan_in_fan_out=config.fan_in_fan_out, use_dora=True, **kw)
    if isinstance(base, nn.Embedding):
        return DoraEmbedding(base, adapter, use_dora=True, **kw)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return DoraConv(base, adapter, use_dora=True, **kw)
    raise ConfigError(f"use_dora=True: DoRA adapts Linear, Conv1D, Embedding and Conv1d/2d/3d layers, not "
                      f"{type(base).__name__}; leave that module out of target_modules (or use exclude_modules)")


def update_dora_layer(layer: nn.Module, adapter: str, config: LoraConfig, path: str, kw: dict) -> None:
    """Add an adapter to an existing layer (called by LoraModel.update_layer)."""
    if isinstance(layer, (DoraLinear, DoraEmbedding, DoraConv)):
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

    peft_type: ClassVar[PeftType] = PeftType.DORA  # registry key only; files say "LORA"
    method: ClassVar[str] = "dora"

    use_dora: bool = True

    def __post_init__(self) -> None:
        if not self.use_dora:
            raise ConfigError("DoraConfig(use_dora=False) is plain LoRA: use LoraConfig / make_config('lora')")
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["peft_type"] = LoraConfig.peft_type.value
        return d


@register_method(DoraConfig, mergeable=True,
                 description="DoRA: LoRA direction + learned magnitude (saved as PEFT LoRA with use_dora)")
class DoraModel(LoraModel):
    """LoRA's tuner; the layers come from `use_dora=True` (see LoraModel.create_layer)."""
