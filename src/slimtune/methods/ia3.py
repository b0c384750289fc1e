"""(IA)³ (Liu et al. 2022): learned vectors that rescale keys, values and the feed-forward activation.

    attention k/v:  y = (W x + b) ⊙ l        l: (out, 1), scales the layer's output
    feed-forward :  y = W (x ⊙ l) + b        l: (1, in), scales the input of the down projection

Config, defaults per family, tensor names (`ia3_l`) and shapes are HF PEFT's `IA3Config`, so
adapters move between the two libraries in both directions. Mergeable: the vector is multiplied
into the weight (and, for output scaling, the bias); unmerge divides it back out.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..config import AdapterConfig, ConfigError, listify
from ..peft_types import PeftType
from ..families import model_type
from ..inject import AdapterLayer, adapter_layers
from ..registry import register_method
from ..targeting import LINEAR_TYPES, Conv1D
from ..tuner import Tuner

CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# PEFT's per-family defaults (peft.utils.constants), so a config without targets picks the same modules.
IA3_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"], "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"], "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"], "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "mistral": ["down_proj"], "mixtral": ["w2"],
    "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"], "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}


@dataclass
class IA3Config(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.IA3
    method: ClassVar[str] = "ia3"

    target_modules: Any = None  # names / regex / "all-linear"; None = PEFT's family default
    exclude_modules: Any = None
    feedforward_modules: Any = None  # targets whose *input* is scaled (the FFN down projection); ⊆ targets
    fan_in_fan_out: bool = False  # set automatically for GPT-2's Conv1D
    modules_to_save: Any = None
    init_ia3_weights: bool = True  # True: vectors of ones (output = base); False: random (tests only)

    def __post_init__(self) -> None:
        for k in ("target_modules", "exclude_modules", "feedforward_modules"):
            v = getattr(self, k)
            setattr(self, k, sorted(v) if isinstance(v, set) else listify(v))
        self.modules_to_save = listify(self.modules_to_save)
        t, f = self.target_modules, self.feedforward_modules
        if isinstance(t, list) and isinstance(f, list) and not set(f) <= set(t):
            raise ConfigError(f"feedforward_modules {sorted(set(f) - set(t))} are not in target_modules: "
                              "every feed-forward module must also be a target")

    def is_feedforward(self, path: str) -> bool:
        """PEFT's rule: a regex must match the whole path, a list entry matches as a suffix."""
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, path) is not None
        return any(path.endswith(k) for k in ff)


class IA3Linear(AdapterLayer):
    """(IA)³ on nn.Linear or Conv1D. `ia3_l[name]` is (out, 1), or (1, in) for a feed-forward layer.
    Subclasses change the parameter's shape and how it broadcasts (IA3Conv)."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, adapter: str, is_feedforward: bool, init_ia3_weights: bool = True) -> None:
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out, self.in_features, self.out_features = self._features(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.update_layer(adapter, init_ia3_weights)

    @staticmethod
    def _features(base: nn.Module) -> tuple[bool, int, int]:
        """(fan_in_fan_out, in_features, out_features) of the base layer."""
        w = base.weight
        if isinstance(base, Conv1D):  # GPT-2 stores (in, out)
            return True, w.shape[0], w.shape[1]
        return False, w.shape[1], w.shape[0]

    def _param_shape(self) -> tuple[int, ...]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def _along_features(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The flat scale vector shaped to broadcast over x's feature dimension (the last one)."""
        return s.to(x.dtype)

    def update_layer(self, adapter: str, init_ia3_weights: bool = True) -> None:
        dtype, device = self._adapter_dtype_device()
        shape = self._param_shape()
        v = torch.ones(shape) if init_ia3_weights else torch.randn(shape)
        self.ia3_l[adapter] = nn.Parameter(v.to(device=device, dtype=dtype))
        if not self.active_adapters:
            self.active_adapters = [adapter]

    def _scale(self, names: list[str]) -> torch.Tensor | None:
        s = None
        for n in names:
            if n in self.ia3_l:
                v = self.ia3_l[n].flatten()
                s = v if s is None else s * v
        return s

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError("mixed-adapter batches are not supported for (IA)³; run one adapter per batch")
        if self.disable_adapters or self.merged or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        s = self._scale(self.active_adapters)
        if s is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            return self.base_layer(x * self._along_features(s, x), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return out * self._along_features(s, out)

    # Merging is multiplicative, not additive: override the base class's delta merge.
    def _weight_scale(self, adapter: str) -> torch.Tensor:
        """The vector shaped to multiply the stored weight ((out, in), or (in, out) for Conv1D)."""
        v = self.ia3_l[adapter].detach()
        return v.t() if self.fan_in_fan_out else v

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        base = self.get_base_layer()
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name in self.merged_adapters or name not in self.ia3_l:
                continue
            s = self._weight_scale(name).to(base.weight.dtype)
            new_w = base.weight.data * s
            b = getattr(base, "bias", None)
            new_b = b.data * self.ia3_l[name].detach().flatten().to(b.dtype) if (b is not None and not self.is_feedforward) else None
            if safe_merge and (not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all())):
                raise ValueError(f"merging (IA)³ adapter '{name}' gives NaN/Inf; the adapter is broken; nothing was merged")
            if safe_merge and bool((self.ia3_l[name] == 0).any()):
                raise ValueError(f"(IA)³ adapter '{name}' has a zero scale; merging would be irreversible")
            base.weight.data.copy_(new_w)
            if new_b is not None:
                b.data.copy_(new_b)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            s = self._weight_scale(name).to(base.weight.dtype)
            base.weight.data.div_(s)
            b = getattr(base, "bias", None)
            if b is not None and not self.is_feedforward:
                b.data.div_(self.ia3_l[name].detach().flatten().to(b.dtype))


class IA3Conv(IA3Linear):
    """(IA)³ on nn.Conv1d/2d/3d (PEFT's layout): `ia3_l[name]` is (1, C, 1, ...), C the output
    channels, or the input channels of a feed-forward conv; it scales the channel dimension."""

    @staticmethod
    def _features(base: nn.Module) -> tuple[bool, int, int]:
        return False, base.in_channels, base.out_channels

    def _param_shape(self) -> tuple[int, ...]:
        n = self.in_features if self.is_feedforward else self.out_features
        return (1, n) + (1,) * (self.get_base_layer().weight.dim() - 2)

    def _along_features(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return s.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))  # x (B, C, *spatial)

    def _weight_scale(self, adapter: str) -> torch.Tensor:
        """Shaped to multiply the conv weight (out, in/groups, *kernel)."""
        v = self.ia3_l[adapter].detach()
        if not self.is_feedforward:
            return v.transpose(0, 1)  # (out, 1, 1, ...)
        base = self.get_base_layer()
        if base.groups == 1:
            return v  # (1, in, 1, ...)
        g, per_in, per_out = base.groups, base.in_channels // base.groups, base.out_channels // base.groups
        v = v.reshape(g, 1, per_in, *v.shape[2:]).expand(g, per_out, per_in, *v.shape[2:])
        return v.reshape(base.out_channels, per_in, *v.shape[3:])


@register_method(IA3Config, mergeable=True, description="(IA)³: learned rescaling of keys, values and FFN input")
class IA3Model(Tuner):
    supported_types = LINEAR_TYPES + CONV_TYPES

    def default_targets(self, config: IA3Config):
        mt = model_type(self.model)
        return list(IA3_TARGETS[mt]) if mt in IA3_TARGETS else None

    def inject_adapter(self, config: IA3Config, adapter: str) -> None:
        # PEFT's _prepare_adapter_config: targets and feed-forward modules default independently.
        mt = model_type(self.model)
        if config.target_modules is None and mt in IA3_TARGETS:
            config.target_modules = list(IA3_TARGETS[mt])  # record PEFT's names, not leaf names
        if config.feedforward_modules is None:
            config.feedforward_modules = list(IA3_FEEDFORWARD.get(mt, []))
        super().inject_adapter(config, adapter)

    def create_layer(self, base: nn.Module, config: IA3Config, adapter: str, path: str) -> AdapterLayer:
        if isinstance(base, CONV_TYPES):
            return IA3Conv(base, adapter, config.is_feedforward(path), config.init_ia3_weights)
        config.fan_in_fan_out = config.fan_in_fan_out or isinstance(base, Conv1D)
        from .lora_layers import variant_for  # a quantized base gets its (IA)³ class (methods/lora_quant.py)

        return variant_for(base, IA3Linear)(base, adapter, config.is_feedforward(path), config.init_ia3_weights)

    def update_layer(self, layer: IA3Linear, config: IA3Config, adapter: str, path: str) -> None:
        if not isinstance(layer, IA3Linear):
            raise ValueError(f"'{path}' already holds a {type(layer).__name__}; (IA)³ cannot be added to it")
        if config.is_feedforward(path) != layer.is_feedforward:
            raise ValueError(f"'{path}' is {'a' if layer.is_feedforward else 'not a'} feed-forward module for the "
                             "existing (IA)³ adapter; every adapter on a model must agree on feedforward_modules")
        layer.update_layer(adapter, config.init_ia3_weights)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """A new adapter whose vectors are Σ w_i·l_i over the given adapters (PEFT's IA³ combination);
        a trained modules_to_save copy of one source is copied for it."""
        import copy

        from .lora_weighted import _heads_to_copy, check_weighted_args

        cfgs = check_weighted_args(self, adapters, weights, adapter_name)
        heads = _heads_to_copy(self, adapters)
        for _, layer in adapter_layers(self.model):
            present = [(a, w) for a, w in zip(adapters, weights) if a in getattr(layer, "ia3_l", {})]
            if not present:
                continue
            layer.update_layer(adapter_name, True)
            with torch.no_grad():
                v = layer.ia3_l[adapter_name]
                v.zero_()
                for a, w in present:
                    v.add_(layer.ia3_l[a], alpha=w)
        union = lambda key: sorted({t for c in cfgs for t in (getattr(c, key) or [])})  # noqa: E731
        lists = all(isinstance(c.target_modules, list) for c in cfgs)
        self.peft_config[adapter_name] = cfgs[0].replace(
            target_modules=union("target_modules") if lists else "|".join(f"({c.target_modules})" for c in cfgs),
            feedforward_modules=union("feedforward_modules") if lists else cfgs[0].feedforward_modules)
        for path, src in heads.items():
            w = self.model.get_submodule(path)
            w.modules_to_save[adapter_name] = copy.deepcopy(w.modules_to_save[src])
        self._apply_active()

    @contextmanager
    def mixed_batch(self, adapter_names: list[str]):
        raise ValueError("mixed-adapter batches are LoRA-only; run one (IA)³ adapter per batch")
        yield  # pragma: no cover
