"""LoRA on `nn.MultiheadAttention`: one low-rank update on the packed q/k/v input projection and
one on the output projection, in PEFT's layout so files move between the two libraries.

    mha.in_proj_weight (3E, E)  + s·B·A           A (r, E), B (3E, r)   on this layer
    mha.out_proj       (E, E)   -> a LoRA Linear (its own A, B)         at base_layer.out_proj

torch's MultiheadAttention never calls its projections as modules: it reads `in_proj_weight` and
`out_proj.weight` and runs one fused function. So the forward calls the base module through
`torch.func.functional_call` with W + ΔW in place of those two weights: one extra (3E×E) add per
call, gradients reach A and B through it, and the base module and its weights are never modified.
Inside FSDP(use_orig_params=True) the unsharded weights live as plain attributes during forward,
and are swapped there too (`_instance_attributes`). Only `_qkv_same_embed_dim=True` (one packed
in_proj_weight) is supported, as in PEFT.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.func import functional_call

from .lora_layers import Linear, LoraLayer


class MultiheadAttention(LoraLayer):
    def __init__(self, base_layer: nn.MultiheadAttention, adapter: str, **kw) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("LoRA on nn.MultiheadAttention needs kdim == vdim == embed_dim (one packed "
                             "in_proj_weight); this module has separate q/k/v projection weights")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(f"LoRA on nn.MultiheadAttention needs an nn.Linear out_proj, not "
                            f"{type(base_layer.out_proj).__name__}")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim
        base_layer.out_proj = Linear(base_layer.out_proj, adapter, **kw)  # the output projection's own LoRA
        self.update_layer(adapter, **kw)

    def update_layer(self, adapter: str, **kw) -> None:
        super().update_layer(adapter, **kw)
        out = self.base_layer.out_proj
        if isinstance(out, Linear) and adapter not in out.lora_A:
            out.update_layer(adapter, **kw)

    def _create_weights(self, adapter: str, r: int) -> None:
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=False)

    def _adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        w = self.base_layer.in_proj_weight
        return w.dtype, w.device

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.in_proj_bias

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]  # (3E, E)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Into in_proj_weight here; the output projection is its own adapter layer and merges itself."""
        names = adapter_names if adapter_names is not None else list(self.active_adapters)
        w = self.base_layer.in_proj_weight
        for name in names:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            merged = w.data + self.get_delta_weight(name).to(w.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter '{name}' into a MultiheadAttention gives NaN/Inf; the adapter "
                                 "weights are broken; nothing was merged")
            w.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        w = self.base_layer.in_proj_weight
        while self.merged_adapters:
            w.data.sub_(self.get_delta_weight(self.merged_adapters.pop()).to(w.dtype))

    def forward(self, query: torch.Tensor, *args, **kwargs):
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError("mixed-adapter batches are not supported for LoRA on nn.MultiheadAttention "
                             "(its projections run inside one fused function); run one adapter per batch")
        base, out = self.base_layer, self.base_layer.out_proj
        active = [] if (self.disable_adapters or self.merged) else [a for a in self.active_adapters if a in self.lora_A]
        out_active = [] if (out.disable_adapters or out.merged) else [a for a in out.active_adapters if a in out.lora_A]
        if not active and not out_active:
            return base(query, *args, **kwargs)
        w_in = base.in_proj_weight
        for a in active:
            w_in = w_in + self.get_delta_weight(a).to(w_in.dtype)
        w_out = out.get_base_layer().weight
        for a in out_active:
            w_out = w_out + out.get_delta_weight(a).to(w_out.dtype)
        # MultiheadAttention.forward reads out_proj.weight, which the LoRA Linear forwards to its base layer
        weights = {"in_proj_weight": w_in, "out_proj.base_layer.weight": w_out}
        with _instance_attributes(base, weights):
            return functional_call(base, weights, (query,) + args, kwargs, strict=False)


@contextmanager
def _instance_attributes(module: nn.Module, values: dict[str, torch.Tensor]):
    """Also swap weights held as plain instance attributes: FSDP(use_orig_params=True) sets each
    parameter's unsharded view in the module's `__dict__` during forward, where attribute lookup
    finds it before `_parameters` (which functional_call swaps), so without this the forward would
    run the base weights and LoRA would silently do nothing."""
    saved = []
    for path, value in values.items():
        owner_path, _, name = path.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if name in owner.__dict__:
            saved.append((owner, name, owner.__dict__[name]))
            owner.__dict__[name] = value
    try:
        yield
    finally:
        for owner, name, old in reversed(saved):
            owner.__dict__[name] = old
