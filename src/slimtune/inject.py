"""Model surgery: adapter layers that hold their base layer, and the walk that swaps them in.

An `AdapterLayer` wraps one base module (composition: `self.base_layer`) and keeps each named
adapter's weights in dicts keyed by adapter name. The attributes listed in
`adapter_layer_names` are the *only* place adapter parameters live, which is how the rest of
slimtune finds them: structurally, by type, never by a substring of a parameter name.

    parent.q_proj = LoraLinear(base_layer=<old q_proj>)   # same path, base kept inside
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
import torch.nn as nn


class AdapterLayer(nn.Module):
    """Base of every method's layer. Subclasses set `adapter_layer_names` and implement
    `update_layer`, `forward`, and (if mergeable) `get_delta_weight` / `merge` / `unmerge`."""

    adapter_layer_names: tuple[str, ...] = ()  # attributes holding per-adapter ModuleDict/ParameterDict
    other_param_names: tuple[str, ...] = ()  # per-adapter plain values (scaling, r, ...)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Per-sample routing for mixed batches: (adapter names, LongTensor of per-row indices).
        self._mixed: tuple[list[str], torch.Tensor] | None = None

    # ---- bookkeeping shared by all methods --------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:  # code that reads module.weight keeps working
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for k in getattr(self, attr).keys():
                if k not in names:
                    names.append(k)
        return names

    def adapter_parameters(self, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(attribute-relative name, parameter) of one adapter; the structural lookup."""
        for attr in self.adapter_layer_names:
            holder = getattr(self, attr)
            if adapter not in holder:
                continue
            item = holder[adapter]
            if isinstance(item, nn.Parameter):
                yield attr, item
            else:
                for n, p in item.named_parameters():
                    yield f"{attr}.{n}", p

    def set_adapter(self, names: str | list[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self.active_adapters = [n for n in names if n in self.adapter_names()]
        for n in self.adapter_names():
            for _, p in self.adapter_parameters(n):
                p.requires_grad_(n in self.active_adapters)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter '{name}' is merged into '{type(self.get_base_layer()).__name__}'; unmerge first")
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """Adapters live in the base weight's dtype (no fp32 upcast on a bf16 model)."""
        w = self.get_base_layer().weight
        dtype = w.dtype if w.is_floating_point() else torch.get_default_dtype()
        return dtype, w.device

    # ---- merging (mergeable methods override get_delta_weight) -------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' deltas into the base weight in place."""
        names = adapter_names if adapter_names is not None else list(self.active_adapters)
        base = self.get_base_layer()
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names():
                continue
            delta = self.get_delta_weight(name).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter '{name}' into a {type(base).__name__} gives NaN/Inf; "
                                     "the adapter weights are broken (check the training loss); nothing was merged")
                base.weight.data.copy_(merged)
            else:
                base.weight.data.add_(delta)
            self._merge_extra(name, +1)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.data.sub_(self.get_delta_weight(name).to(base.weight.dtype))
            self._merge_extra(name, -1)

    def _merge_extra(self, name: str, sign: int) -> None:
        """Hook for methods that also merge into the bias."""


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full for each adapter (e.g. a classifier head), saved with it.

    PEFT's layout: `original_module` plus a copy per adapter in `modules_to_save[name]`. Attribute
    reads (`.weight`, `.out_features`) go to the active copy, or to the original when no copy is
    active or adapters are disabled: what the forward computes with.
    """

    def __init__(self, module: nn.Module, adapter: str) -> None:
        if isinstance(module, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
            raise TypeError(f"modules_to_save cannot wrap a {type(module).__name__}: it has no forward of its own; "
                            "name the module inside it that runs (e.g. 'score', 'classifier')")
        if isinstance(module, AdapterLayer):
            raise TypeError(f"modules_to_save cannot wrap a {type(module).__name__} (it already holds adapters); "
                            "take that module out of modules_to_save or out of the adapters' target_modules")
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({})
        self.active_adapter: str | None = None
        self.disable_adapters = False
        # Per-sample routing for mixed batches, as in AdapterLayer: (adapter names, per-row indices).
        self._mixed: tuple[list[str], torch.Tensor] | None = None
        self.update(adapter)

    def update(self, adapter: str, activate: bool = True) -> None:
        if adapter not in self.modules_to_save:
            self.modules_to_save[adapter] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        if activate:
            self.set_adapter(adapter)
        else:
            self.modules_to_save[adapter].requires_grad_(False)

    def set_adapter(self, adapter: str | list[str]) -> None:
        names = [adapter] if isinstance(adapter, str) else list(adapter)
        held = [n for n in names if n in self.modules_to_save]
        if len(held) > 1:
            raise ValueError(f"adapters {held} each have their own copy of this module (modules_to_save), so they "
                             "cannot be active together; activate one of them (or a mixed batch, one per row)")
        for name, mod in self.modules_to_save.items():
            mod.requires_grad_(name in held)
        self.active_adapter = held[0] if held else None

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def adapter_parameters(self, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
        if adapter in self.modules_to_save:
            yield from self.modules_to_save[adapter].named_parameters()

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        if self.disable_adapters:
            return self.original_module(*args, **kwargs)
        if self._mixed is not None:
            return self._mixed_forward(*args, **kwargs)
        if self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Row i through the copy of adapter_names[i] (the original for "__base__" or an adapter without
        a copy here): one call per distinct module on its rows, written back in row order."""
        names, idx = self._mixed
        out = None
        for i, name in enumerate(names):
            rows = (idx == i).nonzero().flatten()
            if rows.numel() == 0:
                continue
            mod = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            y = mod(x[rows], *args, **kwargs)  # (n_rows, ...)
            if out is None:
                out = y.new_empty((idx.shape[0],) + tuple(y.shape[1:]))
            out[rows] = y
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        mods = self.__dict__.get("_modules", {})
        active = self.__dict__.get("active_adapter")
        if active is not None and not self.__dict__.get("disable_adapters") and active in mods.get("modules_to_save", {}):
            return getattr(mods["modules_to_save"][active], name)
        if "original_module" in mods:
            return getattr(mods["original_module"], name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")


def get_submodule_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, path)
    setattr(parent, child, new)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer in the model (outermost only is fine: layers don't nest here)."""
    for n, m in model.named_modules():
        if isinstance(m, AdapterLayer):
            yield n, m


def outer_adapter_modules(model: nn.Module) -> list[nn.Module]:
    """The adapter layers and modules_to_save wrappers of the model, without walking into them: an
    adapter layer's own submodules (per adapter: its A, B, dropout, ...) are most of a model's
    modules once it holds many adapters (SmolLM2 with 16 LoRA adapters: ~10x the rest), so this
    finds them at a fraction of a full walk. For what runs per batch (a mixed batch's entry)."""
    out: list[nn.Module] = []
    stack = [model]
    while stack:
        m = stack.pop()
        if isinstance(m, (AdapterLayer, ModulesToSaveWrapper)):
            out.append(m)
        else:
            stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return out


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for n, m in model.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            yield n, m


def wrapped_paths(model: nn.Module) -> list[str]:
    """Paths inside adapter machinery that must never become targets themselves."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, AdapterLayer):
            out.extend(f"{n}.{a}" for a in m.adapter_layer_names + ("base_layer",))
        elif isinstance(m, ModulesToSaveWrapper):
            out.extend([f"{n}.modules_to_save", f"{n}.original_module"])
    return out


def add_modules_to_save(model: nn.Module, names: list[str], adapter: str, activate: bool = True) -> list[str]:
    """Wrap each module whose path equals or ends with an entry; return the wrapped paths.
    `activate=False` (a second adapter) leaves the new copies inactive until set_adapter."""
    found: list[str] = []
    skip = tuple(wrapped_paths(model))
    for path, mod in list(model.named_modules()):
        if not path or any(path == s or path.startswith(s + ".") for s in skip):
            continue
        if any(path == n or path.endswith("." + n) for n in names):
            if isinstance(mod, ModulesToSaveWrapper):
                mod.update(adapter, activate)
            elif any(path.startswith(f + ".") for f in found):
                continue
            else:
                wrapper = ModulesToSaveWrapper(mod, adapter)
                if not activate:
                    wrapper.set_adapter([])
                replace_module(model, path, wrapper)
            found.append(path)
    return found


_BLOCK_CLASSES: dict = {}  # (block class, forward function) -> the subclass that runs that forward


def install_block_forward(block: nn.Module, fn) -> None:
    """Run `fn(block, *args, **kwargs)` as `block`'s forward (e.g. a fused MLP); `unwrap` removes it.

    The block's class becomes a cached subclass of its own class whose forward is `fn`: one
    subclass per (class, fn), so torch.compile guards on that type and identical blocks share one
    compiled graph (an object per block would recompile per block). isinstance and the class
    name are unchanged; pickling and deepcopy keep the subclass (`__reduce_ex__`)."""
    cls = base_block_class(block)
    sub = _BLOCK_CLASSES.get((cls, fn))
    if sub is None:
        sub = type(cls.__name__, (cls,), {"forward": fn, "_slimtune_block_base": cls, "_slimtune_block_fn": fn,
                                           "__reduce_ex__": _reduce_block, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__})
        _BLOCK_CLASSES[(cls, fn)] = sub
    block.__class__ = sub


def installed_block_forward(block: nn.Module):
    """The function installed with install_block_forward as `block`'s forward, or None."""
    return type(block).__dict__.get("_slimtune_block_fn")


def base_block_class(block: nn.Module) -> type:
    return type(block).__dict__.get("_slimtune_block_base", type(block))


def original_forward(block: nn.Module, *args, **kwargs):
    """The block's own class forward: what a block forward calls whenever its fast path does not apply."""
    return base_block_class(block).forward(block, *args, **kwargs)


def _reduce_block(self, protocol):
    state = self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__
    return _rebuild_block, (base_block_class(self), type(self)._slimtune_block_fn), state


def _rebuild_block(cls, fn):
    block = cls.__new__(cls)
    install_block_forward(block, fn)
    return block


def remove_block_forwards(model: nn.Module) -> None:
    for m in model.modules():
        if installed_block_forward(m) is not None:
            m.__class__ = base_block_class(m)


def unwrap(model: nn.Module, keep_adapter: str | None = None) -> nn.Module:
    """Replace every adapter layer by its base layer and every save-wrapper by a plain module.

    `keep_adapter` picks which modules_to_save copy replaces the original (the active one after
    a merge); None restores the original modules.
    """
    remove_block_forwards(model)
    # innermost first: an adapter layer may hold another one inside its base (LoRA on MultiheadAttention)
    for path, layer in reversed(list(adapter_layers(model))):
        replace_module(model, path, layer.get_base_layer())
    for path, wrapper in list(save_wrappers(model)):
        if keep_adapter is not None and keep_adapter in wrapper.modules_to_save:
            replace_module(model, path, wrapper.modules_to_save[keep_adapter])
        else:
            replace_module(model, path, wrapper.original_module)
    return model
