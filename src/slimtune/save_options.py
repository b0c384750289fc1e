"""PEFT's two save/load options that reach past the adapter: `save_embedding_layers` and
`ignore_mismatched_sizes`.

- `save_pretrained(save_embedding_layers=True)` also writes the model's input and output
  embedding weights (what a resized vocabulary needs to travel with the adapter); `"auto"` (the
  default) does so when an embedding is adapted, or when the model's vocabulary differs from the
  base model's config in the local folder `base_model_name_or_path` names (offline: no Hub check).
  Keys are PEFT's: `<path>.weight`, or `<path>.base_layer.weight` under an adapter layer.
- `from_pretrained` / `load_adapter(..., ignore_mismatched_sizes=True)` leave out the file's
  tensors whose shape differs from the model's (they keep their initial values), with PEFT's warning.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from .checkpoint import PREFIX
from .inject import AdapterLayer


def embedding_layers_state(pm: nn.Module, adapter: str, save_embedding_layers) -> dict[str, torch.Tensor]:
    """The embedding tensors `save_pretrained` adds to adapter `adapter`'s file (empty: none)."""
    base = pm.get_base_model()
    layers = [m for m in (_call(base, "get_input_embeddings"), _call(base, "get_output_embeddings")) if m is not None]
    targeted = any(isinstance(m, AdapterLayer) and adapter in m.adapter_names() for m in layers)
    if save_embedding_layers == "auto":
        if targeted:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                          stacklevel=3)
            save_embedding_layers = True
        elif _vocab_resized(base, getattr(pm.peft_config[adapter], "base_model_name_or_path", None)):
            warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                          "finetuning.", stacklevel=3)
            save_embedding_layers = True
        else:
            return {}
    if not save_embedding_layers:
        return {}
    if not layers:
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                      stacklevel=3)
        return {}
    names = {id(m): n for n, m in base.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for m in layers:
        if targeted and not isinstance(m, AdapterLayer):
            continue  # PEFT: with an adapted embedding, an un-adapted one is not saved
        owner = m.get_base_layer() if isinstance(m, AdapterLayer) else m
        path = names[id(m)] + (".base_layer" if isinstance(m, AdapterLayer) else "")
        for rel, t in owner.named_parameters(recurse=False):
            out[PREFIX + f"{path}.{rel}"] = t.detach().clone()  # a tied pair: two tensors, as safetensors needs
    return out


def _call(model: nn.Module, fn: str):
    try:
        return getattr(model, fn)()
    except (AttributeError, NotImplementedError):
        return None


def _vocab_resized(base: nn.Module, model_id: str | None) -> bool:
    vocab = getattr(getattr(base, "config", None), "vocab_size", None)
    if not (vocab and model_id and os.path.isfile(os.path.join(str(model_id), "config.json"))):
        return False
    return vocab != type(base.config).from_pretrained(model_id).vocab_size


def drop_mismatched(live: dict[str, torch.Tensor], state: dict[str, torch.Tensor], model_name: str
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(`live` without the keys left out, `state` without them): file tensors whose shape differs
    from the model's are not loaded, and named in PEFT's warning."""
    bad = [(k, tuple(v.shape), tuple(live[k].shape)) for k, v in state.items()
           if k in live and tuple(v.shape) != tuple(live[k].shape)]
    if not bad:
        return live, state
    lines = "\n".join(f"- {k}: found shape {a} in the checkpoint and {b} in the model instantiated" for k, a, b in bad)
    warnings.warn(f"Some weights of {model_name} were not initialized from the model checkpoint and are being ignored "
                  f"because you passed `ignore_mismatched_sizes=True`: {lines}.", stacklevel=4)
    drop = {k for k, _, _ in bad}
    return ({k: v for k, v in live.items() if k not in drop}, {k: v for k, v in state.items() if k not in drop})
