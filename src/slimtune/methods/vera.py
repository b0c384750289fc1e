"""VeRA (Kopiczko et al. 2024): one pair of frozen random matrices shared by every adapted layer;
each layer trains only two scaling vectors, so the adapter is ~(out + r) numbers per layer.

    y = base(x) + λ_b ⊙ (B[:out] · (λ_d ⊙ (A[:, :in] · dropout(x))))
    A: (r, in_max), B: (out_max, r)   frozen, Kaiming-uniform from `projection_prng_key`, shared
    λ_d: (r,) starts at d_initial;  λ_b: (out,) starts at 0, so the model starts as the base

A and B are sized for the largest targeted layer and sliced per layer. Config (`VeraConfig`),
tensor names (`vera_lambda_b`, `vera_lambda_d`, and `base_model.vera_A` / `base_model.vera_B` when
`save_projection`), the PRNG draw and init are HF PEFT's, so adapters move between the two
libraries; without saved projections they are redrawn from the key (CPU generator, as PEFT).
Mergeable: ΔW = (λ_b ⊙ B)(λ_d ⊙ A). The forward stays low-rank (r·(in + out) per token).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, ConfigError, listify
from ..families import default_lora_targets
from ..inject import AdapterLayer, adapter_layers
from ..peft_types import PeftType
from ..registry import register_method
from ..targeting import LINEAR_TYPES, Conv1D
from ..tuner import Tuner
from ._lycoris import whole_numbers


@dataclass
class VeraConfig(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.VERA
    method: ClassVar[str] = "vera"

    r: int = 256  # rank of the shared projections; cheap (they are frozen and shared), so large
    target_modules: Any = None  # names / regex / "all-linear"; None = PEFT's family default (LoRA's)
    projection_prng_key: int = 0  # seed of A and B: every adapter on a model must use the same
    save_projection: bool = True  # write A and B into the file (a redraw depends on torch's CPU PRNG)
    vera_dropout: float = 0.0
    d_initial: float = 0.1  # start value of λ_d (λ_b starts at 0)
    fan_in_fan_out: bool = False  # set automatically for GPT-2's Conv1D
    bias: str = "none"
    modules_to_save: Any = None
    init_weights: bool = True  # False: λ_b = 1, λ_d random (tests only)
    layers_to_transform: Any = None
    layers_pattern: Any = None

    def __post_init__(self) -> None:
        self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) \
            else listify(self.target_modules)
        self.modules_to_save = listify(self.modules_to_save)
        whole_numbers(self, "r", "projection_prng_key")
        if self.r <= 0:
            raise ConfigError(f"r={self.r!r}: the rank must be a positive integer")
        if not 0 <= self.vera_dropout < 1:
            raise ConfigError(f"vera_dropout={self.vera_dropout}: must be in [0, 1)")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: VeRA with trained biases is not supported in slimtune; use "
                              "bias='none' (or add the biases with modules_to_save)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only applies together with layers_to_transform")


def kaiming_draw(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: uniform(±√3·√2/√fan_in) from `generator`; the draw order (A then B)
    and this formula fix the projections a file without them relies on."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections(nn.Module):
    """The shared frozen matrices, one buffer per adapter (the Tuner's `vera_A` / `vera_B`: state-dict
    keys `base_model.vera_A.<adapter>`, PEFT's). Buffers: moved by .to(), never trained or counted."""

    def add(self, adapter: str, value: torch.Tensor, persistent: bool) -> None:
        self.register_buffer(adapter, value, persistent=persistent)

    def __getitem__(self, adapter: str) -> torch.Tensor:
        return self._buffers[adapter]

    def __contains__(self, adapter: str) -> bool:
        return adapter in self._buffers

    def remove(self, adapter: str) -> None:
        self._buffers.pop(adapter, None)
        self._non_persistent_buffers_set.discard(adapter)


class VeraLinear(AdapterLayer):
    """VeRA on nn.Linear or Conv1D. The shared A, B are read from the tuner's `Projections` (held
    by reference, not as a submodule, so they are stored once)."""

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("r", "vera_dropout")

    def __init__(self, base_layer: nn.Module, adapter: str, r: int, config: VeraConfig, shared: tuple) -> None:
        super().__init__(base_layer)
        w = base_layer.weight
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.__dict__["_shared"] = shared  # (Projections A, Projections B)
        self.update_layer(adapter, r, config)

    def update_layer(self, adapter: str, r: int, config: VeraConfig) -> None:
        self.r[adapter] = r
        self.vera_dropout[adapter] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        dtype, device = self._adapter_dtype_device()
        if config.init_weights:
            b, d = torch.zeros(self.out_features), torch.full((r,), float(config.d_initial))
        else:
            b, d = torch.ones(self.out_features), torch.randn(r)
        self.vera_lambda_b[adapter] = nn.Parameter(b.to(device=device, dtype=dtype))
        self.vera_lambda_d[adapter] = nn.Parameter(d.to(device=device, dtype=dtype))
        if not self.active_adapters:
            self.active_adapters = [adapter]

    def _ab(self, adapter: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices: A (r, in), B (out, r), on the vectors' device (as PEFT: after
        inject_adapter_in_model no tuner holds the projections, so `model.to()` does not move them)."""
        a, b = self._shared
        dev = self.vera_lambda_b[adapter].device
        return (a[adapter][:, : self.in_features].to(device=dev, dtype=dtype),
                b[adapter][: self.out_features].to(device=dev, dtype=dtype))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        lb, ld = self.vera_lambda_b[adapter], self.vera_lambda_d[adapter]
        dtype = torch.float32 if lb.device.type == "cpu" else lb.dtype  # bf16 matmul on CPU: PEFT's fp32 cast
        a, b = self._ab(adapter, dtype)
        delta = (lb.to(dtype)[:, None] * b) @ (ld.to(dtype)[:, None] * a)  # (out, in)
        return (delta.t() if self.fan_in_fan_out else delta).to(lb.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError("mixed-adapter batches are not supported for VeRA (nor in PEFT); run one adapter per batch")
        active = [] if (self.disable_adapters or self.merged) else [n for n in self.active_adapters if n in self.r]
        tokens = x.numel() // self.in_features
        if active and not torch.is_grad_enabled() and type(self.base_layer) in (nn.Linear, Conv1D) and \
                self.base_layer.weight.dtype == torch.float32 and \
                tokens * (self.in_features + self.out_features) > self.in_features * self.out_features:
            return self._folded(x, active)
        out = self.base_layer(x, *args, **kwargs)
        if not active:
            return out
        for name in self.active_adapters:
            if name not in self.r:
                continue
            lb, ld = self.vera_lambda_b[name], self.vera_lambda_d[name]
            a, b = self._ab(name, lb.dtype)
            xa = F.linear(self.vera_dropout[name](x.to(lb.dtype)), a)  # (..., r)
            out = out + (lb * F.linear(ld * xa, b)).to(out.dtype)
        return out


    def _folded(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """No-grad calls with many tokens: one GEMM with W + ΔW, ΔW = (λ_b ⊙ B)(λ_d ⊙ A) built per call.
        Building costs out·in·r flops against tokens·r·(in + out) for the two rank-r projections, so
        this runs when tokens > out·in/(in + out) (288 tokens on a 576×576 layer), on an fp32 weight
        (a bf16 W + ΔW would round the small ΔW away); the same value up to rounding. Training keeps
        the projections (the vectors' gradients need them)."""
        base = self.get_base_layer()
        w = base.weight
        for name in active:
            w = w + self.get_delta_weight(name).to(w.dtype)
        if not self.fan_in_fan_out:
            return F.linear(x, w.to(x.dtype), base.bias)
        out = x @ w.to(x.dtype)  # Conv1D stores W as (in, out)
        return out if base.bias is None else out + base.bias.to(x.dtype)


@register_method(VeraConfig, mergeable=True, description="VeRA: shared frozen random projections, two trained vectors per layer")
class VeraModel(Tuner):
    supported_types = LINEAR_TYPES

    def default_targets(self, config: VeraConfig):
        return default_lora_targets(self.model)

    def _shared(self) -> tuple[Projections, Projections]:
        if "vera_A" not in self._modules:
            self.vera_A, self.vera_B = Projections(), Projections()
        return self.vera_A, self.vera_B

    def check_new_adapter(self, config: VeraConfig, adapter: str) -> None:
        super().check_new_adapter(config, adapter)
        for name, other in self.peft_config.items():
            if other.projection_prng_key != config.projection_prng_key:
                raise ValueError(f"projection_prng_key={config.projection_prng_key}: adapter '{name}' uses "
                                 f"{other.projection_prng_key}, and all VeRA adapters on a model share one key "
                                 "(PEFT's rule); use the same projection_prng_key")
            if other.save_projection != config.save_projection:
                raise ValueError(f"save_projection={config.save_projection}: adapter '{name}' has "
                                 f"{other.save_projection}; all VeRA adapters on a model must agree")

    def inject_adapter(self, config: VeraConfig, adapter: str) -> None:
        """Layers first (their sizes fix A and B: the largest in and out among this adapter's
        targets, PEFT's `_find_dim`), then the projections, drawn A then B from the key."""
        a, b = self._shared()
        super().inject_adapter(config, adapter)
        layers = [layer for _, layer in adapter_layers(self.model) if isinstance(layer, VeraLinear) and adapter in layer.r]
        out_max = max(layer.out_features for layer in layers)
        in_max = max(layer.in_features for layer in layers)
        g = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        device = layers[0].get_base_layer().weight.device
        a.add(adapter, kaiming_draw((config.r, in_max), g).to(device), config.save_projection)
        b.add(adapter, kaiming_draw((out_max, config.r), g).to(device), config.save_projection)

    def create_layer(self, base: nn.Module, config: VeraConfig, adapter: str, path: str) -> AdapterLayer:
        config.fan_in_fan_out = isinstance(base, Conv1D)  # PEFT sets it from the layer type
        return VeraLinear(base, adapter, config.r, config, self._shared())

    def update_layer(self, layer: AdapterLayer, config: VeraConfig, adapter: str, path: str) -> None:
        if not isinstance(layer, VeraLinear):
            raise ValueError(f"'{path}' already holds a {type(layer).__name__}; a VeRA adapter cannot be added to it")
        layer.update_layer(adapter, config.r, config)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for p in self._shared():
            p.remove(name)

    def adapter_key_map(self, adapter: str, root: nn.Module) -> dict[str, torch.Tensor]:
        """PEFT's keys: the per-layer vectors, plus `base_model.vera_A` / `vera_B` when saved."""
        from ..checkpoint import adapter_key_map

        a, b = self._shared()
        extra = {"base_model.vera_A": a[adapter], "base_model.vera_B": b[adapter]} \
            if self.peft_config[adapter].save_projection and adapter in a else {}
        return adapter_key_map(root, adapter, extra)

    @contextmanager
    def mixed_batch(self, adapter_names: list[str]):
        raise ValueError("mixed-adapter batches are not supported for vera (PEFT has them for LoRA only); "
                         "run one adapter per batch")
        yield  # pragma: no cover
