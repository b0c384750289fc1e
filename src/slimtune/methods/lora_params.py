"""LoRA on parameters (`LoraConfig(target_parameters=[...])`, PEFT's ParamWrapper, v0.17+).

transformers 5 stores the experts of a mixture-of-experts block (Mixtral, Qwen2/3-MoE, OLMoE,
gpt-oss) as one 3-D `nn.Parameter` per projection, `(experts, out, in)`, and indexes it inside the
experts module's forward: there is no per-expert `nn.Linear` for module-name LoRA to wrap. This
layer wraps the module that owns the parameter and, for the duration of its forward, hands it
W + ΔW instead of W (`torch.func.functional_call`: nothing is mutated, autograd reaches A and B).

    ΔW[e] = s · B_e A_e   with A: Linear(in, r·E) and B: Linear(r·E, out), PEFT's layout:
    A.weight (r·E, in) is read as (E, r, in); B.weight (out, r·E) as (out, r, E).

A 2-D parameter is one plain matrix (E = 1, ΔW = s·B·A). Modules that store experts as
(experts, in, out) say so with `is_transposed = True` (gpt-oss), as PEFT reads it. Two parameters
of one module nest, as PEFT's (the first one named by the module is the inner wrapper), so the
file keys are PEFT's: `<module>.lora_A.weight` (outer) and `<module>.base_layer.lora_A.weight`.
Dropout, DoRA, fan_in_fan_out and mixed-adapter batches are refused, as by PEFT.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from ..config import ConfigError
from ..inject import AdapterLayer, replace_module
from ..targeting import TargetError
from .lora_layers import LoraLayer


class ParamWrapper(LoraLayer):
    """LoRA on one parameter (`parameter_name`) of the wrapped module."""

    def __init__(self, base_layer: nn.Module, adapter: str, parameter_name: str, **kw) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = tuple(self.get_param().shape)
        if len(shape) == 3:
            self.num_experts = shape[0]
            # transformers: (experts, out, in) unless the module says is_transposed (experts, in, out)
            self.is_transposed = bool(getattr(self.get_base_layer(), "is_transposed", False))
            self.in_features, self.out_features = (shape[1], shape[2]) if self.is_transposed else (shape[2], shape[1])
        elif len(shape) == 2:
            self.num_experts, self.is_transposed = 1, False
            self.out_features, self.in_features = shape
        else:
            raise ConfigError(f"target_parameters: '{parameter_name}' has {len(shape)} dimensions; LoRA on a "
                              "parameter needs a 2-D matrix or a 3-D stack of expert matrices")
        self.update_layer(adapter, **kw)

    def get_param(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.parameter_name)

    def update_layer(self, adapter: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool | str, use_rslora: bool) -> None:
        if lora_dropout:  # PEFT's reason: x cannot be factored out of B(A(dropout(x))) for a weight
            raise ConfigError("target_parameters does not work with lora_dropout != 0; set lora_dropout=0")
        super().update_layer(adapter, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)

    def _adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        p = self.get_param()
        return (p.dtype if p.is_floating_point() else torch.get_default_dtype()), p.device

    def _create_weights(self, adapter: str, r: int) -> None:
        self.lora_A[adapter] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def _factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) with ΔW = s · lhs @ rhs in the parameter's own layout (batched over experts)."""
        e = self.num_experts
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        a = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
        b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, out, r)
        return (a.transpose(-2, -1), b.transpose(-2, -1)) if self.is_transposed else (b, a)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        p = self.get_param()
        if p.dim() == 2:
            delta = self.lora_B[adapter].weight @ self.lora_A[adapter].weight
        else:
            lhs, rhs = self._factors(adapter)
            delta = lhs @ rhs
        return (delta * self.scaling[adapter]).to(p.dtype)

    def _adapted(self, names: list[str]) -> torch.Tensor:
        w = self.get_param()
        if len(names) == 1 and w.dim() == 3:  # one GEMM per expert stack, no separate ΔW tensor
            lhs, rhs = self._factors(names[0])
            return torch.baddbmm(w, lhs.to(w.dtype), rhs.to(w.dtype), alpha=self.scaling[names[0]])
        return w + sum(self.get_delta_weight(n) for n in names)

    def _param_path(self) -> str:
        """The parameter's name as seen from `self.base_layer` (through nested wrappers)."""
        path, m = self.parameter_name, self.base_layer
        while isinstance(m, AdapterLayer):
            path, m = "base_layer." + path, m.base_layer
        return path

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError("LoRA on parameters (target_parameters) does not support mixed-adapter batches, as in "
                             "PEFT; run one adapter per batch")
        names = [] if (self.disable_adapters or self.merged) else [n for n in self.active_adapters if n in self.lora_A]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return functional_call(self.base_layer, {self._param_path(): self._adapted(names)}, (x, *args), kwargs,
                               tie_weights=False, strict=False)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        p = self.get_param()
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            new = p.data + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter '{name}' into '{self.parameter_name}' gives NaN/Inf; the adapter "
                                 "weights are broken (check the training loss); nothing was merged")
            p.data.copy_(new)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        p = self.get_param()
        while self.merged_adapters:
            p.data.sub_(self.get_delta_weight(self.merged_adapters.pop()))


def _unwrapped(path: str) -> str:
    """A module path with the wrappers' `.base_layer` hops removed (how targets are matched)."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def inject_parameters(model: nn.Module, config, adapter: str, layer_kwargs) -> list[str]:
    """Wrap every parameter `config.target_parameters` names ("experts.gate_up_proj" matches any
    module path ending in "experts" with that parameter); returns the matched "<module>.<param>".

    A parameter already wrapped (a second adapter) gets the new adapter in its wrapper. A name
    that matches nothing is an error, as a wrong target_modules name is."""
    if config.use_dora or config.fan_in_fan_out or getattr(config, "lora_bias", False):
        raise ConfigError("target_parameters does not work with use_dora, fan_in_fan_out or lora_bias (as in PEFT); "
                          "turn them off or target modules instead")
    targets = list(config.target_parameters)
    inside = tuple(f"{n}.{a}." for n, m in model.named_modules() if isinstance(m, AdapterLayer)
                   for a in m.adapter_layer_names + ("lora_dropout",))  # adapter weights are never targets
    plain = [(path, m) for path, m in model.named_modules()
             if not isinstance(m, AdapterLayer) and not (path + ".").startswith(inside)]
    hit_targets: set[str] = set()
    matched: list[str] = []
    for path, module in plain:
        owner_path = _owner_path(path)  # the outermost wrapper standing where `module` was
        for pname, _ in list(module.named_parameters(recurse=False)):
            key = f"{_unwrapped(path)}.{pname}"
            t = next((t for t in targets if key == t or key.endswith("." + t)), None)
            if t is None:
                continue
            hit_targets.add(t)
            matched.append(key)
            kw = layer_kwargs(config, key)
            existing = _wrapper_for(model.get_submodule(owner_path), pname)
            if existing is not None:
                existing.update_layer(adapter, **kw)
            else:
                replace_module(model, owner_path, ParamWrapper(model.get_submodule(owner_path), adapter, pname, **kw))
    missing = [t for t in targets if t not in hit_targets]
    if missing:
        raise TargetError(f"lora: target_parameters entry '{missing[0]}' matches no parameter; name it as "
                          "'<module name>.<parameter name>' (e.g. 'experts.gate_up_proj'; see model.named_parameters())")
    return matched


def _owner_path(path: str) -> str:
    """`path` of a module, or of the outermost ParamWrapper chain that now holds it."""
    parts = path.split(".")
    while parts and parts[-1] == "base_layer":
        parts.pop()
    return ".".join(parts)


def _wrapper_for(m: nn.Module, pname: str) -> ParamWrapper | None:
    while isinstance(m, ParamWrapper):
        if m.parameter_name == pname:
            return m
        m = m.base_layer
    return None
