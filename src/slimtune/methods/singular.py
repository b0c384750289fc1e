"""Singular-value fine-tuning: W = U·diag(S)·Vᵀ from an SVD of each target weight; U and V stay
frozen and only the singular values train (all of them, or the top_k largest).

    y = W x + U_k · diag(ΔS) · V_kᵀ x          ΔS: (k,), starts at 0 (output = base)

The trained tensor is ΔS, one vector per layer, saved as `<path>.svd_delta_s`. U and V are not
saved: they are recomputed from the base weight on load (an SVD is unique up to the joint sign of
each u_i, v_i pair, and u_i·v_iᵀ does not depend on that sign, so the update is reproduced).
They are kept in memory as non-persistent buffers (≈ 2× each target weight with top_k=None).
Mergeable: W ← W + U_k·diag(ΔS)·V_kᵀ, exact up to float rounding.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..config import AdapterConfig, ConfigError, listify
from ..peft_types import PeftType
from ..families import default_lora_targets
from ..inject import AdapterLayer
from ..registry import register_method
from ..targeting import LINEAR_TYPES, Conv1D
from ..tuner import Tuner


@dataclass
class SingularConfig(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.SINGULAR  # slimtune's own type
    method: ClassVar[str] = "singular"

    target_modules: Any = None  # names / regex / "all-linear"; None = the family's attention defaults (as LoRA)
    exclude_modules: Any = None
    top_k: int | None = None  # train the k largest singular values of each target; None = all of them
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None

    def __post_init__(self) -> None:
        self.target_modules = listify(self.target_modules)
        self.exclude_modules = listify(self.exclude_modules)
        self.modules_to_save = listify(self.modules_to_save)
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            raise ConfigError(f"top_k={self.top_k!r}: must be a positive integer (or None for all singular values)")


class _Basis(nn.Module):
    """U_k (out, k) and V_kᵀ (k, in) of one adapter: frozen, recomputed on load, never saved."""

    def __init__(self, u: torch.Tensor, vh: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("vh", vh, persistent=False)


class SingularLinear(AdapterLayer):
    adapter_layer_names = ("svd_delta_s",)
    other_param_names = ("svd_basis",)

    def __init__(self, base_layer: nn.Module, adapter: str, top_k: int | None) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.svd_delta_s = nn.ParameterDict()
        self.svd_basis = nn.ModuleDict()
        self.update_layer(adapter, top_k)

    def _base_weight(self) -> torch.Tensor:
        w = self.get_base_layer().weight
        return w.t() if self.fan_in_fan_out else w  # (out, in)

    @torch.no_grad()
    def update_layer(self, adapter: str, top_k: int | None) -> None:
        dtype, device = self._adapter_dtype_device()
        w = self._base_weight().float()
        if self.merged:
            raise RuntimeError("cannot add a singular-value adapter to a layer with merged adapters; unmerge first")
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # w = u·diag(s)·vh; s descending
        k = s.numel() if top_k is None else min(top_k, s.numel())
        self.svd_basis[adapter] = _Basis(u[:, :k].to(dtype).contiguous(), vh[:k].to(dtype).contiguous())
        self.svd_delta_s[adapter] = nn.Parameter(torch.zeros(k, dtype=dtype, device=device))
        if not self.active_adapters:
            self.active_adapters = [adapter]

    def _fold_for_inference(self, x: torch.Tensor) -> bool:
        if torch.is_grad_enabled() or self.disable_adapters or self.merged or not self.active_adapters:
            return False
        if type(self.get_base_layer()) not in (nn.Linear, Conv1D):
            return False
        w = self._base_weight()
        return x.numel() // x.shape[-1] > w.shape[0] * w.shape[1] / (w.shape[0] + w.shape[1])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        b = self.svd_basis[adapter]
        delta = (b.u * self.svd_delta_s[adapter]) @ b.vh  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError("mixed-adapter batches are LoRA-only; run one singular-value adapter per batch")
        if self._fold_for_inference(x):
            # Inference on many tokens: one GEMM with W + U_k·diag(ΔS)·V_kᵀ (formed per call, out·in·k
            # multiply-adds) costs less than the two N×k projections (N·k·(in+out)) when N > out·in/(in+out).
            base = self.get_base_layer()
            w = self._base_weight()
            for name in self.active_adapters:
                if name in self.svd_delta_s:
                    b = self.svd_basis[name]
                    w = w + ((b.u * self.svd_delta_s[name]) @ b.vh).to(w.dtype)
            return torch.nn.functional.linear(x, w.to(x.dtype), None if base.bias is None else base.bias.to(x.dtype))
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return out
        for name in self.active_adapters:
            if name not in self.svd_delta_s:
                continue
            b, ds = self.svd_basis[name], self.svd_delta_s[name]
            h = (x.to(b.vh.dtype) @ b.vh.t()) * ds  # (..., k): project onto V_k, scale by ΔS
            out = out + (h @ b.u.t()).to(out.dtype)  # (..., out)
        return out


@register_method(SingularConfig, mergeable=True, description="train only singular values of frozen SVD bases")
class SingularModel(Tuner):
    supported_types = LINEAR_TYPES

    def default_targets(self, config: SingularConfig):
        return default_lora_targets(self.model)

    def create_layer(self, base: nn.Module, config: SingularConfig, adapter: str, path: str) -> AdapterLayer:
        return SingularLinear(base, adapter, config.top_k)

    def update_layer(self, layer: AdapterLayer, config: SingularConfig, adapter: str, path: str) -> None:
        if not isinstance(layer, SingularLinear):
            raise ValueError(f"'{path}' already holds a {type(layer).__name__}; a singular-value adapter "
                             "cannot be added to it")
        layer.update_layer(adapter, config.top_k)

    @contextmanager
    def mixed_batch(self, adapter_names: list[str]):
        raise ValueError("mixed-adapter batches are LoRA-only; run one singular-value adapter per batch")
        yield  # pragma: no cover
