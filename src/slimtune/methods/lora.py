"""LoRA (Hu et al. 2021): train a rank-r update B·A beside each frozen target weight.

Config fields and their meaning are HF PEFT's `LoraConfig`, so `adapter_config.json` files move
between the two libraries. The layers are in `lora_layers.py`, weighted merging of several
adapters in `lora_weighted.py`.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn as nn

from ..config import ANY, AdapterConfig, ConfigError, config_field, listify
from ..peft_types import PeftType
from ..families import default_lora_targets
from ..inject import adapter_layers, save_wrappers
from ..registry import register_method
from ..tuner import Tuner
from .lora_blocks import fuse_swiglu_blocks
from .lora_layers import SUPPORTED_TYPES, LoraLayer, lora_layer_for


@dataclass
class LoraConfig(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.LORA
    method: ClassVar[str] = "lora"
    peft_only: ClassVar[dict[str, Any]] = {
        "megatron_core": ANY, "qalora_group_size": ANY,
        "ensure_weight_tying": False, "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None,
        "eva_config": None, "kasa_config": None, "layer_replication": None, "loftq_config": {},
        "lora_ga_config": None, "megatron_config": None, "monteclora_config": None,
        "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False, "velora_config": None,
    }

    r: int = 8  # rank: 8 is PEFT's default and enough for most single-task fine-tunes
    target_modules: Any = None  # names / regex / "all-linear" / module types; None = family default
    exclude_modules: Any = None
    lora_alpha: float = 8  # scale s = alpha/r: alpha = r keeps s = 1 whatever the rank
    lora_dropout: float = 0.0  # 0 keeps the fused fast path free of a mask
    fan_in_fan_out: bool = False  # weight stored (in, out); set automatically for GPT-2's Conv1D
    bias: str = "none"  # "none" | "all" (every bias trains) | "lora_only" (biases of adapted layers)
    use_rslora: bool = False  # s = alpha/sqrt(r): stable updates at high rank (Kalajdzievski 2023)
    modules_to_save: Any = None  # modules trained in full and saved with the adapter (e.g. a new head)
    init_lora_weights: Any = True  # True (Kaiming A, zero B) | "gaussian" | "pissa" | "olora" | False (random, tests)
    layers_to_transform: Any = None  # int or list of block indices to adapt
    layers_pattern: Any = None  # name of the block list ("layers", "h") when indices are ambiguous
    rank_pattern: dict = config_field({})  # {"regex of module path": r} overrides r per module
    alpha_pattern: dict = config_field({})  # same for lora_alpha
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: Any = None

    def __post_init__(self) -> None:
        self.target_modules = listify(self.target_modules) if not isinstance(self.target_modules, set) else sorted(self.target_modules)
        self.exclude_modules = listify(self.exclude_modules)
        self.modules_to_save = listify(self.modules_to_save)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={self.bias!r}: use 'none', 'all' or 'lora_only'")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r={self.r!r}: the rank must be a positive integer")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.lora_bias:
            raise ConfigError("lora_bias=True (a bias on lora_B) is not supported; use bias='lora_only'")
        tp = self.target_parameters
        self.target_parameters = listify([tp] if isinstance(tp, str) else tp)  # LoRA on parameters: methods/lora_params.py
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only applies together with layers_to_transform")
        init = self.init_lora_weights
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and isinstance(init, str) and \
                (init.startswith("pissa") or init in ("olora", "corda", "lora_ga")):
            # PEFT's warning, word for word: save_pretrained's conversion to plain LoRA will refuse this config
            warnings.warn("Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of "
                          "modified base weights PiSSA/CorDA/OLoRA/LoRA-GA means that you won't be able to pass "
                          "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial "
                          "values of the base weights; if you intend to do this, please ensure not to use rslora or "
                          "rank_pattern/alpha_pattern.", stacklevel=3)

    # No for_loading override: a PiSSA/OLoRA config re-runs its decomposition on load (as PEFT), so
    # the file's A, B apply to the residual W − s·B₀A₀ of the original base, reproducing the trained
    # model. To load onto an already residual base, save with init_lora_weights=True first (PEFT's
    # advice), or convert to a plain LoRA: save_pretrained(path_initial_model_for_weight_conversion=...).

    def _register_custom_module(self, mapping: dict[type[nn.Module], type[nn.Module]]) -> None:
        """PEFT's (experimental) dynamic dispatch: LoRA on a layer type slimtune does not know.

        `mapping` is {target layer type: LoRA layer class}; the class (a slimtune `LoraLayer`
        subclass, e.g. of `methods.lora_layers.Linear`) is built as `cls(base, adapter, config=config,
        r=, lora_alpha=, lora_dropout=, init_lora_weights=, use_rslora=)`. Not saved in the config file."""
        custom = dict(getattr(self, "_custom_modules", None) or {})
        custom.update(mapping)
        self._custom_modules = custom

    def for_module(self, path: str) -> tuple[int, float]:
        """(r, alpha) for one module path, after rank_pattern / alpha_pattern (PEFT's matching)."""
        return (_pattern_value(self.rank_pattern, path, self.r), _pattern_value(self.alpha_pattern, path, self.lora_alpha))


def lora_bias_parameters(model: nn.Module, mode: str, adapter: str | None = None) -> dict[str, nn.Parameter]:
    """Biases that train under `bias` mode, by module path + ".bias" (found structurally).

    Keys are PEFT's: a bias inside adapter `adapter`'s modules_to_save copy is named without the
    adapter ("head.modules_to_save.bias"); other adapters' copies are left out. `adapter=None`:
    every copy (for marking what trains)."""
    if mode == "none":
        return {}
    if mode == "lora_only":
        owners = [(f"{path}.base_layer" if path else "base_layer", layer.get_base_layer())
                  for path, layer in adapter_layers(model)]
    else:
        copies = {f"{w}.modules_to_save.{a}": (f"{w}.modules_to_save", a)
                  for w, wrapper in save_wrappers(model) for a in wrapper.adapter_names()}
        owners = []
        for path, m in model.named_modules():
            hit = next((c for c in copies if path == c or path.startswith(c + ".")), None)
            if hit is not None and adapter is not None:
                stem, a = copies[hit]
                if a != adapter:
                    continue
                path = stem + path[len(hit):]
            owners.append((path, m))
    return {f"{path}.bias" if path else "bias": m._parameters["bias"]
            for path, m in owners if isinstance(m._parameters.get("bias"), nn.Parameter)}


def _pattern_value(patterns: dict, path: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", path):
            return value
    return default


@register_method(LoraConfig, mergeable=True, description="low-rank update B·A beside frozen weights")
class LoraModel(Tuner):
    supported_types = SUPPORTED_TYPES

    def default_targets(self, config: LoraConfig):
        return default_lora_targets(self.model)

    def _layer_kwargs(self, config: LoraConfig, path: str) -> dict:
        r, alpha = config.for_module(path)
        return dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                    init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora)

    def create_layer(self, base: nn.Module, config: LoraConfig, adapter: str, path: str) -> LoraLayer:
        kw = self._layer_kwargs(config, path)
        custom = next((c for t, c in (getattr(config, "_custom_modules", None) or {}).items() if isinstance(base, t)), None)
        if custom is not None:  # _register_custom_module: the user's layer class, as PEFT's dynamic dispatch
            return custom(base, adapter, config=config, **kw)
        cls = lora_layer_for(base)
        if config.use_dora:  # DoRA layers live in methods/dora.py
            from .dora import create_dora_layer

            return create_dora_layer(base, adapter, config, kw)
        if cls.__name__ == "Linear":
            return cls(base, adapter, fan_in_fan_out=config.fan_in_fan_out, **kw)
        return cls(base, adapter, **kw)

    def update_layer(self, layer: LoraLayer, config: LoraConfig, adapter: str, path: str) -> None:
        if config.use_dora or "lora_magnitude_vector" in layer.adapter_layer_names:
            from .dora import update_dora_layer

            return update_dora_layer(layer, adapter, config, path, self._layer_kwargs(config, path))
        layer.update_layer(adapter, **self._layer_kwargs(config, path))

    def inject_adapter(self, config: LoraConfig, adapter: str) -> None:
        custom = tuple(getattr(config, "_custom_modules", None) or ())
        self.supported_types = SUPPORTED_TYPES + custom  # registered custom layer types can be targeted
        try:
            super().inject_adapter(config, adapter)
        finally:
            self.supported_types = SUPPORTED_TYPES
        fuse_swiglu_blocks(self.model)  # gate/up/down of a SwiGLU MLP as one node (lora_blocks.py)

    def set_adapter(self, name: str | list[str]) -> None:
        super().set_adapter(name)
        fuse_swiglu_blocks(self.model)  # blocks undecided so far may hold the new adapter

    def inject_other_targets(self, config: LoraConfig, adapter: str) -> None:
        if config.target_parameters:  # fused MoE experts and other raw parameters (lora_params.py)
            from .lora_params import inject_parameters

            inject_parameters(self.model, config, adapter, self._layer_kwargs)

    def mark_extra_trainable(self, config: LoraConfig) -> None:
        for b in lora_bias_parameters(self.model, config.bias).values():
            b.requires_grad_(True)

    def adapter_key_map(self, adapter: str, root: nn.Module) -> dict:
        from ..checkpoint import PREFIX, adapter_key_map

        bias = lora_bias_parameters(self.model, self.peft_config[adapter].bias, adapter)
        return adapter_key_map(root, adapter, {PREFIX + k: p for k, p in bias.items()})

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                             svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """A new adapter from a weighted combination of existing ones (PEFT's combination types:
        "svd", "linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune" and the "_svd"
        variants; see lora_weighted.py)."""
        from .lora_weighted import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, svd_driver, density, majority_sign_method)
