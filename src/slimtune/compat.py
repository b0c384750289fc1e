"""Where transformers' API moves between releases, the one place slimtune adapts to it.

Each helper finds what the installed transformers offers by looking at the object itself (a
signature, an attribute), never by comparing version strings: a model's own code decides, and a
model written against an older API keeps working. The supported range is pyproject's
`transformers>=5.15,<6` (measured: README); `scripts/lock.sh` pins what the suite last passed on.

    transformers 5.24 renamed forward(past_key_values=) -> forward(cache=)   (old name warns)
    transformers 5.2x renamed gradient_checkpointing_enable -> activation_checkpointing_enable
"""
from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

# The names a forward takes its KV cache under, newest first.
CACHE_ARGS = ("cache", "past_key_values")


def cache_arg(module: nn.Module) -> str | None:
    """The argument `module.forward` takes its KV cache as ('cache' or 'past_key_values'), or None.

    inspect.signature follows `__wrapped__`, so transformers' deprecation decorators (which
    accept the old name and forward it) show the real, new parameter."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in CACHE_ARGS if n in params), None)


def pop_cache(kwargs: dict) -> tuple[str | None, Any]:
    """Remove a cache passed under either name: (the name it came under, the cache), or (None, None).

    Callers (generate, a user, PEFT-era code) may use the old name on a new model or the reverse;
    the prompt-learning hook puts the cache back under the name the model takes, so the model
    sees it once and never warns about a call slimtune made."""
    found: tuple[str | None, Any] = (None, None)
    for name in CACHE_ARGS:
        value = kwargs.pop(name, None)
        if value is not None:
            if found[1] is not None:
                raise TypeError("pass the KV cache once: got both 'cache' and 'past_key_values'")
            found = (name, value)
    return found


def output_cache(output: Any) -> Any:
    """The KV cache a model returned (`output.cache` from 5.24, `output.past_key_values` before)."""
    for name in CACHE_ARGS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> bool:
    """Turn on transformers' per-layer activation (gradient) checkpointing under its current name.

    Returns False when the model offers neither method (not a transformers model)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        return False
    return True


def is_activation_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (`is_activation_checkpointing`, formerly
    `is_gradient_checkpointing`); False for models that have neither."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in dir(type(model)):
            return bool(getattr(model, name))
    return False
