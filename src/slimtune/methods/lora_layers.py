"""LoRA layers: ΔW = B·A·s beside a frozen base layer, s = α/r (or α/√r with rsLoRA).

    x ──► base_layer ──────────────┐
    └──► dropout ─► A (r×in) ─► B (out×r) ─► ×s ─► (+) ─► y

One class per base-layer family, picked by type (`lora_layer_for`): Linear (nn.Linear and
GPT-2's Conv1D), Embedding, Conv (nn.Conv1d/2d/3d). Per-adapter weights live in ModuleDicts
keyed by adapter name, with PEFT's attribute names so state-dict keys match PEFT's.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..inject import AdapterLayer
from ..kernels.lora import lora_linear
from ..targeting import Conv1D
from .lora_mixed import BASE_ADAPTER, MixedLinear
from .lora_share import _learn_sharing

# Run linears that read one input (q/k/v, gate/up) as one node (lora_share.py). Off by default:
# the groups are learnt at the first step, so step 1 and later steps round differently and a
# resumed run is no longer bitwise equal to an uninterrupted one; measured gain on an H100 was
# 3% of the step at 0.85B and none at 6.7B (benchmarks/results). On for ablations and tests.
SHARE_INPUTS = False


class LoraLayer(AdapterLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def update_layer(self, adapter: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool | str, use_rslora: bool) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.r[adapter] = r
        self.lora_alpha[adapter] = lora_alpha
        self.scaling[adapter] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        # Identity when p == 0: no mask, no copy of x on the hot path.
        self.lora_dropout[adapter] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._create_weights(adapter, r)
        dtype, device = self._adapter_dtype_device()
        for _, p in self.adapter_parameters(adapter):
            p.data = p.data.to(device=device, dtype=dtype)
        self.reset_lora_parameters(adapter, init_lora_weights)
        if not self.active_adapters:  # a first adapter becomes active; later ones wait for set_adapter
            self.active_adapters = [adapter]

    def _create_weights(self, adapter: str, r: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def reset_lora_parameters(self, adapter: str, init: bool | str) -> None:
        """True: Kaiming-uniform A, zero B (output = base). "gaussian": N(0, 1/r) A, zero B.
        False: random B too (tests only). "pissa": A, B from the top-r SVD of W, W ← W − s·BA."""
        if adapter not in self.lora_A:
            return
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if init is True or init is False:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init is False:
                nn.init.normal_(b, std=0.02)
            else:
                nn.init.zeros_(b)
        elif init == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter])
            nn.init.zeros_(b)
        elif isinstance(init, str) and init.lower().startswith("pissa"):
            self._pissa_init(adapter)
        elif init == "olora":
            self._olora_init(adapter)
        else:
            raise ValueError(f"init_lora_weights={init!r}: use True, False, 'gaussian', 'pissa' or 'olora'")

    def _pissa_init(self, adapter: str) -> None:
        raise ValueError(f"PiSSA init needs a Linear base layer, not {type(self.get_base_layer()).__name__}")

    def _olora_init(self, adapter: str) -> None:
        raise ValueError(f"OLoRA init needs a Linear base layer, not {type(self.get_base_layer()).__name__}")

    def _lora_out(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """B(A(dropout(x))) unscaled, computed in the adapter's dtype and returned in x's (fp32 adapters on
        a bf16 base with autocast_adapter_dtype=True); the fused path casts A, B instead."""
        w = self.lora_A[name].weight
        xa = x.to(w.dtype) if x.is_floating_point() and x.dtype != w.dtype else x
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](xa))).to(x.dtype)

    def _single_active(self) -> str | None:
        """The one adapter to apply, or None for the base (disabled, merged or none active)."""
        if self.disable_adapters or self.merged or not self.active_adapters:
            return None
        return self.active_adapters[0]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.__dict__.pop("_mixed_all", None)  # the stack of every adapter (Linear._all_stacks) held it

    def _mixed_rows(self) -> list[tuple[str, torch.Tensor]]:
        """Mixed batch: (adapter, row mask) for each adapter this layer holds."""
        names, idx = self._mixed
        out = []
        for i, name in enumerate(names):
            if name != BASE_ADAPTER and name in self.scaling:
                out.append((name, idx == i))
        return out


class Linear(MixedLinear, LoraLayer):
    """LoRA on nn.Linear, or on transformers' Conv1D (weight stored (in, out): fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module, adapter: str, fan_in_fan_out: bool = False, **kw) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out or isinstance(base_layer, Conv1D)
        w = base_layer.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape
        self.update_layer(adapter, **kw)

    def _create_weights(self, adapter: str, r: int) -> None:
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=False)

    def _base_weight(self) -> torch.Tensor:
        """Base weight as (out, in), a view for Conv1D."""
        w = self.get_base_layer().weight
        return w.t() if self.fan_in_fan_out else w

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def _pissa_init(self, adapter: str) -> None:
        base = self.get_base_layer()
        w = self._base_weight().float()
        r, s = self.r[adapter], self.scaling[adapter]
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # w (out,in) = u·diag(sv)·vh
        root = (sv[:r] / s).sqrt()
        a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]  # (r,in), (out,r)
        self.lora_A[adapter].weight.copy_(a)
        self.lora_B[adapter].weight.copy_(b)
        residual = w - s * (b @ a)
        base.weight.data.copy_((residual.t() if self.fan_in_fan_out else residual).to(base.weight.dtype))

    @torch.no_grad()
    def _olora_init(self, adapter: str) -> None:
        """OLoRA (Büyükakyüz 2024): A, B from the QR decomposition of W (B = Q_r, A = R_r), W ← W − s·BA."""
        base = self.get_base_layer()
        w = self._base_weight().float()
        r, s = self.r[adapter], self.scaling[adapter]
        q, rr = torch.linalg.qr(w)  # w (out,in) = q·rr
        self.lora_A[adapter].weight.copy_(rr[:r])
        self.lora_B[adapter].weight.copy_(q[:, :r])
        residual = w - s * (q[:, :r] @ rr[:r])
        base.weight.data.copy_((residual.t() if self.fan_in_fan_out else residual).to(base.weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        d = self.__dict__
        if d["_mixed"] is not None and not d["disable_adapters"] and not d["merged_adapters"]:
            return self._mixed_forward(x)
        if "_mixed_last" in d:  # mixed batches have ended: free their plans and gathered weights
            del d["_mixed_last"]
            d.pop("_mixed_cache", None)
            d.pop("_mixed_hot", None)
        group = d.get("_share") if SHARE_INPUTS else None
        if group is not None:  # q/k/v-style siblings on one input: one fused node for all of them
            out = group.output(self, x)
            if out is not None:
                return out
        fast = self._fast_args(x)
        if fast is None:
            if self._single_active() is None:
                return self.base_layer(x, *args, **kwargs)
            # General path: several active adapters, or a base we cannot fuse (e.g. quantized).
            out = self.base_layer(x, *args, **kwargs)
            for name in self.active_adapters:
                out = out + self._lora_out(name, x) * self.scaling[name]
            return out
        if SHARE_INPUTS and group is None and (isinstance(fast[5], nn.Identity) or not fast[5].training):
            _learn_sharing(self, x)  # no dropout mask: this layer may share x with the next one
        return lora_linear(x, *fast)

    def _fast_args(self, x: torch.Tensor):
        """(W as (out,in), bias, A, B, scale, dropout) when the fused path applies: one active
        adapter, not merged or disabled, and a plain nn.Linear / Conv1D base; else None.

        This runs for every adapted linear on every call, so it reads the module's dicts directly
        (nn.Module.__getattr__ costs ~1 µs a lookup, and host time is what bounds a small model
        on a fast GPU)."""
        d = self.__dict__
        active = d["active_adapters"]
        if d["disable_adapters"] or d["merged_adapters"] or len(active) != 1:
            return None
        mods = d["_modules"]
        base = mods["base_layer"]
        if type(base) not in _FAST_BASES:
            return None
        name = active[0]
        a = mods["lora_A"]._modules[name]._parameters["weight"]
        b = mods["lora_B"]._modules[name]._parameters["weight"]
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        bp = base._parameters
        w = bp["weight"].t() if d["fan_in_fan_out"] else bp["weight"]
        return w, bp["bias"], a, b, d["scaling"][name], mods["lora_dropout"]._modules[name]


class Embedding(LoraLayer):
    """LoRA on nn.Embedding: A (r, vocab) is looked up, B (dim, r) projects; PEFT inits A = 0."""

    def __init__(self, base_layer: nn.Embedding, adapter: str, **kw) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.update_layer(adapter, **kw)

    def _create_weights(self, adapter: str, r: int) -> None:
        base = self.get_base_layer()
        self.lora_embedding_A[adapter] = nn.Parameter(torch.zeros(r, base.num_embeddings))
        self.lora_embedding_B[adapter] = nn.Parameter(torch.zeros(base.embedding_dim, r))

    @torch.no_grad()
    def reset_lora_parameters(self, adapter: str, init: bool | str) -> None:
        if isinstance(init, str) and init.lower().startswith("pissa"):
            raise ValueError("PiSSA init is for Linear layers; use init_lora_weights=True for embeddings")
        a, b = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
        nn.init.normal_(b)
        if init is False:
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_embedding_B[adapter] @ self.lora_embedding_A[adapter]).t() * self.scaling[adapter]

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def embed_scale(self) -> torch.Tensor | float | None:
        """The factor a scaled embedding (Gemma's `embed_scale`) applies to its lookups: the
        adapter's rows get it too, so the output is the lookup of W + ΔW, merged or not."""
        scale = getattr(self.get_base_layer(), "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            raise ValueError(f"{type(self.get_base_layer()).__name__}.embed_scale has shape {tuple(scale.shape)}; "
                             "LoRA supports a scalar embedding scale only")
        return scale

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        out = (self._lookup(x, a.t()) @ b.t()) * self.scaling[name]  # (..., r) @ (r, dim)
        scale = self.embed_scale()
        return out if scale is None else out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            for name, mask in self._mixed_rows():
                out = out + self._delta(name, x).to(out.dtype) * mask.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)
            return out
        if self._single_active() is None:
            return out
        for name in self.active_adapters:
            out = out + self._delta(name, x).to(out.dtype)
        return out


_TORCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def torch_conv_class(cls: type) -> type:
    """The torch convolution class a Conv*d subclass derives from (its own constructor may differ)."""
    return next(c for c in cls.__mro__ if c in _TORCH_CONVS)


class Conv(LoraLayer):
    """LoRA on nn.Conv1d/2d/3d and their subclasses: A is a conv with the base's kernel, B a 1×1 conv.

    Both are built from the torch class the base derives from: a subclass such as EfficientNet's
    `Conv2dStaticSamePadding` has another constructor (PEFT builds A with the base's own class and
    fails there). A subclass that overrides `forward` (padding of its own) computes A through that
    forward with A's weight in place of the base's, so A sees exactly the input the base convolves.
    """

    def __init__(self, base_layer: nn.Module, adapter: str, **kw) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        conv = torch_conv_class(type(base_layer))
        self.own_forward = type(base_layer).forward is not conv.forward  # the subclass transforms the input
        if self.own_forward and base_layer.groups != 1:
            raise ValueError(f"LoRA on a grouped {type(base_layer).__name__} (groups={base_layer.groups}) with its own "
                             "forward is not supported; target its ungrouped (e.g. 1x1) convolutions instead")
        self.update_layer(adapter, **kw)

    def _create_weights(self, adapter: str, r: int) -> None:
        base = self.get_base_layer()
        if r % base.groups:
            raise ValueError(f"LoRA on a {type(base).__name__} with groups={base.groups} needs a rank divisible by "
                             f"the groups (B is a grouped 1x1 conv, as PEFT's); got r={r}")
        conv = torch_conv_class(type(base))
        self.lora_A[adapter] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                    base.dilation, bias=False)
        # grouped base: B is grouped like it (PEFT's layout); the product is then a full conv, not mergeable
        self.lora_B[adapter] = conv(r, base.out_channels, 1, 1, groups=base.groups, bias=False)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        w = self.get_base_layer().weight
        if self.get_base_layer().groups != 1:
            raise NotImplementedError("LoRA on a grouped convolution cannot be merged: B·A connects every input "
                                      "channel to every output, which the grouped weight cannot hold; keep it unmerged")
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight  # (r, in, *k), (out, r, 1..)
        return (b.flatten(1) @ a.flatten(1)).view(w.shape) * self.scaling[adapter]

    def _lora_out(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if not self.own_forward:
            return super()._lora_out(name, x)
        from torch.func import functional_call

        base, w = self.get_base_layer(), self.lora_A[name].weight
        xa = x.to(w.dtype) if x.is_floating_point() and x.dtype != w.dtype else x
        swap = {"weight": w, **({"bias": torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)}
                                if base.bias is not None else {})}
        h = functional_call(base, swap, (self.lora_dropout[name](xa),))  # the subclass's padding, A's weight
        return self.lora_B[name](h).to(x.dtype)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._lora_out(name, x) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            for name, mask in self._mixed_rows():
                out = out + self._delta(name, x) * mask.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)
            return out
        if self._single_active() is None:
            return out
        for name in self.active_adapters:
            out = out + self._delta(name, x)
        return out


# Other base-layer families register here: fn(base, cls) -> the class to use instead of `cls` for
# that base, or None. methods/lora_quant.py registers the bitsandbytes linears (Linear4bit,
# Linear8bitLt), which subclass nn.Linear but hold a packed weight; DoRA and (IA)³ ask too.
BASE_VARIANTS: list = []


def variant_for(base: nn.Module, cls: type) -> type:
    """The class for `base`: a registered variant of `cls` (e.g. LoRA on a 4-bit layer), else `cls`."""
    for pick in BASE_VARIANTS:
        v = pick(base, cls)
        if v is not None:
            return v
    return cls


def lora_layer_for(base: nn.Module) -> type[LoraLayer] | None:
    """Dispatch by module type (minLoRA style): the LoRA class for a base layer, or None."""
    if isinstance(base, (nn.Linear, Conv1D)):
        return variant_for(base, Linear)
    if isinstance(base, nn.Embedding):
        return Embedding
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Conv
    if isinstance(base, nn.MultiheadAttention):
        from .lora_mha import MultiheadAttention

        return MultiheadAttention
    return None


_FAST_BASES = (nn.Linear, Conv1D)  # bases the fused path reads (weight, bias) from directly
SUPPORTED_TYPES: tuple[type, ...] = (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                     nn.MultiheadAttention)
