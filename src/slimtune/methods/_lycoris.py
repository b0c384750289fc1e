"""What LoHa and LoKr share (PEFT's "LyCORIS" family): a config with rank, alpha and two dropouts,
and a layer whose adapter is a full-size weight delta ΔW built from small factors.

    y = base(x) + op(x, ΔW)          ΔW = scale · f(factors),  scale = alpha / r
    op = F.linear for nn.Linear, the base's own convolution (stride, padding, groups) for Conv1d/2d

Each method (loha.py, lokr.py) only says which factor tensors it has and how they make ΔW
(`_create`, `_reset`, `_delta`); the forward, dropouts, merge/unmerge and the tuner are here.
Names and semantics are HF PEFT's (`LycorisConfig`, `LycorisLayer`), so files move both ways.

Speed and memory: on an fp32 base the forward runs one GEMM with W + ΔW instead of base GEMM +
delta GEMM (the same value up to fp32 rounding; backward then needs one GEMM for dx and one for the
gradient of ΔW). On bf16/fp16 it keeps PEFT's two-GEMM form, so a small ΔW is never rounded away
against W's larger entries. When training a Linear, a method whose ΔW·x has a cheap factored form
(`_delta_output`: LoKr, (W1 ⊗ W2)·x = W1·X·W2ᵀ per token) runs base(x) plus that form and never
builds ΔW; otherwise `_DeltaLinear` rebuilds ΔW in backward rather than keeping it, so activation
memory stays the frozen layer's (rank dropout uses the plain graph: its random mask must be the
same in forward and backward).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, ConfigError, config_field, listify
from ..families import default_lora_targets
from ..inject import AdapterLayer
from ..tuner import Tuner

SUPPORTED_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)  # PEFT's LyCORIS layers


@dataclass
class LycorisConfig(AdapterConfig):
    """PEFT's `LycorisConfig` fields plus those LoHa and LoKr share, with PEFT's defaults."""

    r: int = 8  # rank of each factor pair
    alpha: float = 8  # scale = alpha / r
    rank_dropout: float = 0.0  # training only: drops whole output rows of ΔW (p), rescaled
    module_dropout: float = 0.0  # training only: skips the adapter for a whole call with probability p
    use_effective_conv2d: bool = False  # conv kernels as a CP (Tucker) core instead of a flattened matrix
    target_modules: Any = None  # names / regex / "all-linear"; None = PEFT's family default (LoRA's)
    exclude_modules: Any = None
    init_weights: Any = True  # True: ΔW = 0 at start; False: random (tests only)
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None
    rank_pattern: dict = config_field({})  # {"regex of module path": r}
    alpha_pattern: dict = config_field({})  # {"regex of module path": alpha}

    def __post_init__(self) -> None:
        for k in ("target_modules", "exclude_modules"):
            v = getattr(self, k)
            setattr(self, k, sorted(v) if isinstance(v, set) else listify(v))
        self.modules_to_save = listify(self.modules_to_save)
        whole_numbers(self, "r")
        if self.r <= 0:
            raise ConfigError(f"r={self.r!r}: the rank must be a positive integer")
        for k in ("rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, k) < 1:
                raise ConfigError(f"{k}={getattr(self, k)}: must be in [0, 1)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only applies together with layers_to_transform")

    def for_module(self, path: str) -> tuple[int, float]:
        """(r, alpha) for one module path after rank_pattern / alpha_pattern (PEFT's get_pattern_key)."""
        return _pattern(self.rank_pattern, path, self.r), _pattern(self.alpha_pattern, path, self.alpha)


def whole_numbers(config: AdapterConfig, *names: str) -> None:
    """Integer fields given as integral floats (YAML `16.0`) become ints; anything else is one ConfigError."""
    for k in names:
        v = getattr(config, k)
        if isinstance(v, float) and v.is_integer():
            setattr(config, k, int(v))
        elif isinstance(v, bool) or not isinstance(getattr(config, k), int):
            raise ConfigError(f"{k}={v!r}: must be a whole number")


def _pattern(patterns: dict, path: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


class DeltaLayer(AdapterLayer):
    """A weight-delta adapter on nn.Linear / nn.Conv1d / nn.Conv2d. Subclasses list their factor
    ParameterDicts in `adapter_layer_names` and implement `_create`, `_reset` and `_delta`."""

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_TYPES):
            raise TypeError(f"{type(self).__name__} supports nn.Linear, nn.Conv1d and nn.Conv2d, not "
                            f"{type(base).__name__}; choose target_modules of those types")
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}

    # ---- creation ----------------------------------------------------------------------
    def update_layer(self, adapter: str, r: int, alpha: float, config: LycorisConfig) -> None:
        if r <= 0:
            raise ValueError(f"r={r}: the rank must be a positive integer")
        self.r[adapter], self.alpha[adapter], self.scaling[adapter] = r, alpha, alpha / r
        self.rank_dropout[adapter], self.module_dropout[adapter] = config.rank_dropout, config.module_dropout
        self._create(adapter, r, config)
        with torch.no_grad():
            self._reset(adapter, config.init_weights)
        dtype, device = self._adapter_dtype_device()
        for _, p in self.adapter_parameters(adapter):
            p.data = p.data.to(device=device, dtype=dtype)
        if not self.active_adapters:
            self.active_adapters = [adapter]

    def _effective_conv(self, config: LycorisConfig) -> bool:
        """PEFT's rule: the CP form only for a conv whose kernel is larger than 1."""
        base = self.get_base_layer()
        return bool(config.use_effective_conv2d) and isinstance(base, (nn.Conv1d, nn.Conv2d)) and \
            any(k != 1 for k in base.kernel_size)

    def _create(self, adapter: str, r: int, config: LycorisConfig) -> None:
        raise NotImplementedError

    def _reset(self, adapter: str, init: Any) -> None:
        raise NotImplementedError

    def _delta(self, adapter: str) -> torch.Tensor:
        """ΔW / scale in any shape with the base weight's number of elements (PEFT's reshape order)."""
        raise NotImplementedError

    # ---- the delta ---------------------------------------------------------------------
    def get_delta_weight(self, adapter: str, rank_dropout: bool = False) -> torch.Tensor:
        w = self.get_base_layer().weight
        delta = (self._delta(adapter) * self.scaling[adapter]).reshape(w.shape)
        p = self.rank_dropout[adapter]
        if rank_dropout and p > 0:
            keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
            delta = delta * self._rank_keep_scale(adapter, keep).view(-1, *([1] * (delta.dim() - 1)))
        return delta

    def _delta_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """ΔW·x from the factors without building ΔW, where the method's structure makes that cheaper
        (LoKr's Kronecker product on a Linear); None: build ΔW."""
        return None

    def _rank_keep_scale(self, adapter: str, keep: torch.Tensor) -> torch.Tensor:
        """LoHa rescales the kept rows by 1/mean (LoKr only with rank_dropout_scale)."""
        return keep / keep.mean().clamp_min(1e-12)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, bias)
        return base._conv_forward(x, weight, bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError(f"mixed-adapter batches are not supported for {type(self).__name__} (nor in PEFT); "
                             "run one adapter per batch")
        if self.disable_adapters or self.merged or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        active = [n for n in self.active_adapters if n in self.r]
        if self.training:  # module dropout: the whole adapter is skipped for this call
            active = [n for n in active if not (self.module_dropout[n] > 0 and
                                                float(torch.rand(1)) <= self.module_dropout[n])]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        merged = x.dtype == base.weight.dtype == torch.float32  # one GEMM with W + ΔW (module docstring)
        plain = type(self.base_layer) is type(base)  # not a wrapped (e.g. quantized) base
        factors = [p for n in active for _, p in self.adapter_parameters(n) if p.requires_grad]
        dropping = self.training and any(self.rank_dropout[n] > 0 for n in active)
        if plain and isinstance(base, nn.Linear) and factors and torch.is_grad_enabled() and not dropping:
            outs = [self._delta_output(n, x) for n in active]
            if all(o is not None for o in outs):  # factored: a few small GEMMs, ΔW never built
                out = self.base_layer(x, *args, **kwargs)
                for o in outs:
                    out = out + o.to(out.dtype)
                return out
            build = lambda: sum(self.get_delta_weight(n) for n in active)  # noqa: E731
            return _DeltaLinear.apply(x, base.weight, base.bias, build, merged, *factors)
        deltas = [self.get_delta_weight(n, rank_dropout=self.training).to(x.dtype) for n in active]
        if merged and plain:
            w = base.weight
            for d in deltas:
                w = w + d
            return self._op(x, w, base.bias)
        out = self.base_layer(x, *args, **kwargs)
        for d in deltas:
            out = out + self._op(x, d, None)
        return out


class _DeltaLinear(torch.autograd.Function):
    """y = x·(W + ΔW)ᵀ + b, where backward rebuilds ΔW from its factors instead of keeping it:
    autograd saves x only (plus the small factors), as for the frozen layer, where the plain graph
    would keep ΔW, W + ΔW and LoHa's two products (three out×in matrices per layer). The factor
    gradients come from autograd through `build` with dΔW = dyᵀ·x, so any method's ΔW works.
    `merged`: one GEMM with W + ΔW (fp32); otherwise W and ΔW apart (bf16/fp16 keep ΔW's precision)."""

    @staticmethod
    def forward(ctx, x, weight, bias, build, merged, *factors):
        with torch.no_grad():
            delta = build().to(weight.dtype)
        ctx.build, ctx.merged, ctx.factors, ctx.has_bias = build, merged, factors, bias is not None
        ctx.save_for_backward(x, weight)
        if merged:
            return F.linear(x, weight + delta, bias)
        return F.linear(x, weight, bias) + F.linear(x, delta)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            delta = ctx.build()
        d = delta.detach().to(weight.dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ (weight + d) if ctx.merged else dy @ weight + dy @ d
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        full = dy2.t() @ x2  # (out, in): the gradient of W + ΔW
        grads = torch.autograd.grad(delta, ctx.factors, full.to(delta.dtype), allow_unused=True)
        if ctx.needs_input_grad[1]:
            dw = full
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return (dx, dw, db, None, None, *grads)


class LycorisTuner(Tuner):
    """Model-level half for LoHa/LoKr: PEFT's LoRA target defaults, per-module (r, alpha)."""

    supported_types = SUPPORTED_TYPES
    layer_cls: type[DeltaLayer] = DeltaLayer

    def default_targets(self, config: LycorisConfig):
        return default_lora_targets(self.model)

    def create_layer(self, base: nn.Module, config: LycorisConfig, adapter: str, path: str) -> AdapterLayer:
        layer = self.layer_cls(base)
        r, alpha = config.for_module(path)
        layer.update_layer(adapter, r, alpha, config)
        return layer

    def update_layer(self, layer: AdapterLayer, config: LycorisConfig, adapter: str, path: str) -> None:
        if not isinstance(layer, self.layer_cls):
            raise ValueError(f"'{path}' already holds a {type(layer).__name__}; a {config.method} adapter cannot be "
                             f"added to it (one method per model): use a model without that adapter")
        r, alpha = config.for_module(path)
        layer.update_layer(adapter, r, alpha, config)

    @contextmanager
    def mixed_batch(self, adapter_names: list[str]):
        method = next(iter(self.peft_config.values())).method if self.peft_config else "this method"
        raise ValueError(f"mixed-adapter batches are not supported for {method} (PEFT has them for LoRA only); "
                         "run one adapter per batch")
        yield  # pragma: no cover
