"""Adapter layers over quantized base layers (bitsandbytes `Linear4bit` NF4/FP4, `Linear8bitLt`): QLoRA.

The quantized layer is kept whole as `base_layer` (PEFT's wrapping, so files and state-dict keys
are the same as on a full-precision base); its matmul is bitsandbytes'; the adapter path is ours:

    x ──► Linear4bit (bitsandbytes) ─────────────┐
    └──► dropout ─► A (r×in) ─► B (out×r) ─► ×s ─► (+) ─► y        one node (kernels/lora_quant.py)

Found by type: `lora_layers.lora_layer_for`, DoRA and (IA)³ ask `lora_layers.variant_for(base, cls)`
for their class, and this module registers the quantized variants there (`QuantLinear` for LoRA's
`Linear`, `QuantDoraLinear`, `QuantIA3Linear`).

Merging is exact and never re-quantizes: a merge swaps in a dense copy of the base,
`DequantizedLinear` holding dequantize(W_q) in the layer's compute dtype, and runs the method's own
merge on it (W + s·B·A for LoRA, DoRA's magnitude, (IA)³'s scale); unmerge puts the untouched
quantized layer back (bit for bit). While merged, that layer costs a dense weight's memory;
`merge_and_unload()` returns a plain model (quant/merge.py), `quant.merge_and_requantize` the
re-quantized one with its measured cost.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.lora_quant import quant_lora_linear
from ..quant import backend as qb
from .dora import DoraLinear
from .ia3 import IA3Linear
from .lora_layers import BASE_VARIANTS, Linear, LoraLayer


class DequantizedLinear(nn.Linear):
    """A dense stand-in for a merged quantized layer: dequantize(W_q) (+ the merged deltas) in the
    layer's compute dtype; like bitsandbytes, it casts the input to that dtype and the output back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype:
            return F.linear(x, w, self.bias)
        return F.linear(x.to(w.dtype), w, None if self.bias is None else self.bias.to(w.dtype)).to(x.dtype)


def dense_copy(base: nn.Module, dtype: torch.dtype | None = None) -> DequantizedLinear:
    """The exact dense equivalent of a bitsandbytes linear (bias copied, so a merge into it leaves
    the quantized layer's own bias alone)."""
    dtype = dtype or qb.compute_dtype(base)
    w = qb.dequantize(base, dtype)
    lin = DequantizedLinear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    lin.quant_kind = qb.kind(base)  # "4bit" / "8bit": what the plain model's dtype follows (quant/merge.py)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if base.bias is not None:
        lin.bias = nn.Parameter(base.bias.detach().to(dtype).clone(), requires_grad=False)
    return lin


class QuantBase:
    """What every adapter layer over a bitsandbytes linear shares (a mixin before the method's
    class): the base weight read through `dequantize`, adapters in the dtype the weight was
    quantized from, and the exact, reversible merge through a dense copy."""

    def _quant_kind(self) -> str | None:
        return qb.kind(self.get_base_layer())

    def _base_weight(self) -> torch.Tensor:
        """The base weight as (out, in): dequantized from the quantized layer, or the dense copy's
        while merged (DoRA's norms and merge read this)."""
        base = self.get_base_layer()
        return qb.dequantize(base, qb.compute_dtype(base)) if qb.kind(base) else base.weight

    def _adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        base = self.get_base_layer()
        return (qb.storage_dtype(base) if qb.kind(base) else base.weight.dtype), base.weight.device

    def _pissa_init(self, adapter: str) -> None:
        raise qb.QuantizationError("init_lora_weights='pissa' rewrites the base weight (W - s·B·A), which a "
                                   "4-bit/8-bit weight cannot take exactly; use init_lora_weights=True on a "
                                   "quantized base (or PiSSA on the unquantized model)")

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_names if adapter_names is not None else list(self.active_adapters)
        todo = [n for n in names if n not in self.merged_adapters and n in self.adapter_names()]
        if not todo:
            return
        d = self.__dict__
        swapped = "_quant_base" not in d
        if swapped:  # hide the quantized layer (unregistered: the dense copy is the base while merged)
            quant = self.base_layer
            self.base_layer = dense_copy(quant)
            d["_quant_base"] = quant
        try:
            super().merge(todo, safe_merge=safe_merge)  # the method's own merge, on the dense copy
        except Exception:
            if swapped:
                self.base_layer = d.pop("_quant_base")
            raise

    def unmerge(self) -> None:
        quant = self.__dict__.pop("_quant_base", None)
        if quant is None:
            return
        self.base_layer = quant  # the quantized weight was never touched: bit for bit the original
        self.merged_adapters.clear()
        getattr(self, "_dora_norm", {}).clear()
        self.__dict__.pop("_norm_cache", None)

    def quantized_base(self) -> nn.Module:
        """The bitsandbytes layer this adapter sits on (also while merged)."""
        quant = self.__dict__.get("_quant_base")
        return quant if quant is not None else self.get_base_layer()


def _init_linear_features(layer: LoraLayer, base: nn.Module) -> None:
    """Linear's bookkeeping from the layer's declared sizes (the packed weight has another shape)."""
    LoraLayer.__init__(layer, base)
    layer.fan_in_fan_out = False
    layer.in_features, layer.out_features = base.in_features, base.out_features


class QuantLinear(QuantBase, Linear):
    """LoRA on a bitsandbytes Linear4bit / Linear8bitLt."""

    def __init__(self, base_layer: nn.Module, adapter: str, fan_in_fan_out: bool = False, **kw) -> None:
        _init_linear_features(self, base_layer)
        self.update_layer(adapter, **kw)

    def _dx_base(self, g: torch.Tensor) -> torch.Tensor:
        """g (N, out) -> g·deq(W) (N, in), as bitsandbytes' backward: in the compute dtype for 4-bit."""
        base = self.get_base_layer()
        dt = qb.compute_dtype(base) if qb.kind(base) == "4bit" else g.dtype
        dx = torch.mm(g.to(dt), qb.dequantize(base, dt))
        return dx if dx.dtype == g.dtype else dx.to(g.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        d = self.__dict__
        if d["_mixed"] is not None and not d["disable_adapters"] and not d["merged_adapters"]:
            return self._mixed_forward(x)
        active = d["active_adapters"]
        mods = d["_modules"]
        base = mods["base_layer"]
        if d["disable_adapters"] or d["merged_adapters"] or not active:
            return base(x, *args, **kwargs)
        bias = base._parameters.get("bias")
        if len(active) == 1 and not (bias is not None and bias.requires_grad) and not args and not kwargs:
            name = active[0]
            a = mods["lora_A"]._modules[name]._parameters["weight"]
            b = mods["lora_B"]._modules[name]._parameters["weight"]
            if a.dtype != x.dtype:
                a, b = a.to(x.dtype), b.to(x.dtype)
            return quant_lora_linear(x, base, self._dx_base, a, b, d["scaling"][name], mods["lora_dropout"]._modules[name])
        # several active adapters, or a trained base bias: the composed ops, autograd through bitsandbytes
        out = base(x, *args, **kwargs)
        for name in active:
            a = self.lora_A[name]
            out = out + self.lora_B[name](a(self.lora_dropout[name](x.to(a.weight.dtype)))).to(out.dtype) * self.scaling[name]
        return out


class QuantDoraLinear(QuantBase, DoraLinear):
    """DoRA on a bitsandbytes linear (QDoRA): the row norms read the dequantized weight."""

    def __init__(self, base_layer: nn.Module, adapter: str, fan_in_fan_out: bool = False, **kw) -> None:
        _init_linear_features(self, base_layer)
        self.update_layer(adapter, **kw)


class QuantIA3Linear(QuantBase, IA3Linear):
    """(IA)³ on a bitsandbytes linear: the scale multiplies the layer's input or output; merged, it
    multiplies the dense copy's weight."""

    @staticmethod
    def _features(base: nn.Module) -> tuple[bool, int, int]:
        return False, base.in_features, base.out_features


_VARIANTS = {Linear: QuantLinear, DoraLinear: QuantDoraLinear, IA3Linear: QuantIA3Linear}


def quantized_variant(base: nn.Module, cls: type) -> type | None:
    """The quantized-base class standing in for `cls` when `base` is a bitsandbytes linear."""
    if qb.kind(base) is None:
        return None
    v = _VARIANTS.get(cls)
    if v is None:
        raise qb.QuantizationError(f"{cls.__name__} has no variant for a quantized base ({type(base).__name__}); "
                                   "use LoRA, DoRA or (IA)³ on quantized layers, or exclude the module")
    return v


if quantized_variant not in BASE_VARIANTS:
    BASE_VARIANTS.append(quantized_variant)
