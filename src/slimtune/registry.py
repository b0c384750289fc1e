"""The one list of methods: name -> (config class, tuner class).

A method registers itself with `@register_method` on its tuner; everything else (the wrapper,
checkpoint loading by `peft_type`, the CLI's `method:` key) looks methods up here.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

# Every module under slimtune.methods is imported on first lookup; those that define a tuner
# register it. Plug-in packages add theirs with add_method_module.
_EXTRA_MODULES: list[str] = []


@dataclass(frozen=True)
class MethodSpec:
    name: str  # slimtune's key ("lora")
    peft_type: str  # PEFT's on-disk name ("LORA")
    config_cls: type
    tuner_cls: type
    mergeable: bool
    description: str


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(config_cls: type, *, mergeable: bool, description: str) -> Callable[[type], type]:
    """Class decorator for a tuner: `@register_method(LoraConfig, mergeable=True, description=...)`."""

    def deco(tuner_cls: type) -> type:
        spec = MethodSpec(config_cls.method, config_cls.peft_type, config_cls, tuner_cls, mergeable, description)
        _REGISTRY[spec.name] = spec
        return tuner_cls

    return deco


def add_method_module(module: str) -> None:
    """Let a plug-in package register methods lazily (imported on first lookup)."""
    if module not in _EXTRA_MODULES:
        _EXTRA_MODULES.append(module)


def _load_all() -> None:
    from . import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"slimtune.methods.{info.name}")
    for mod in _EXTRA_MODULES:
        importlib.import_module(mod)


def all_methods() -> dict[str, MethodSpec]:
    _load_all()
    return dict(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """Look up by slimtune name ("lora") or PEFT type ("LORA"), case-insensitive."""
    methods = all_methods()
    key = name.lower()
    for spec in methods.values():
        if key in (spec.name, spec.peft_type.lower()):
            return spec
    names = sorted(methods)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise KeyError(f"unknown method '{name}'.{hint} Known methods: {', '.join(names)}")


def make_config(method: str, **kwargs: Any):
    """Build a method's config from keyword arguments (what the YAML `method:` block holds)."""
    spec = get_method(method)
    return spec.config_cls.from_dict(kwargs, source=f"method '{spec.name}'", strict=True)
