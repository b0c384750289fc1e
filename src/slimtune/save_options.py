"""PEFT's save/load options beyond the adapter tensors themselves: `save_embedding_layers`,
`ignore_mismatched_sizes` and `low_cpu_mem_usage`.

- `save_pretrained(save_embedding_layers=True)` also writes the model's input and output
  embedding weights (what a resized vocabulary needs to travel with the adapter); `"auto"` (the
  default) does so when an embedding is adapted, or when the model's vocabulary differs from the
  base model's config in the local folder `base_model_name_or_path` names (offline: no Hub check).
  Keys are PEFT's: `<path>.weight`, or `<path>.base_layer.weight` under an adapter layer.
- `from_pretrained` / `load_adapter(..., ignore_mismatched_sizes=True)` leave out the file's
  tensors whose shape differs from the model's (they keep their initial values), with PEFT's warning.
- `low_cpu_mem_usage=True` (get_peft_model, add_adapter, inject_adapter_in_model, from_pretrained,
  load_adapter) leaves the new adapter's weights on the meta device (no memory, no init); loading a
  file or state dict materialises them on the base layer's device, as PEFT's `assign=True` load
  (only the adapter loaded; others stay on meta).
  An adapter still on meta cannot run: load its weights first.
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


def _holders(layer: AdapterLayer, adapter: str):
    """(holder, key, item) for each per-adapter entry of `layer` (a sub-module or a parameter)."""
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr)
        if adapter in holder:
            yield holder, adapter, holder[adapter]


def adapter_to_meta(model: nn.Module, adapter: str) -> None:
    """Move adapter `adapter`'s weights (in every adapter layer) to the meta device."""
    from .inject import adapter_layers

    for _, layer in adapter_layers(model):
        for holder, key, item in _holders(layer, adapter):
            if isinstance(item, nn.Parameter):
                holder[key] = nn.Parameter(torch.empty_like(item, device="meta"), requires_grad=item.requires_grad)
            else:
                item.to("meta")


def materialise(model: nn.Module, adapter: str) -> None:
    """Give adapter `adapter`'s weights still on meta real (uninitialised) memory on their base
    layer's device, so the load that follows copies into them; a no-op when none is on meta.
    Other adapters stay where they are (as PEFT: only the loaded adapter leaves meta)."""
    from .inject import adapter_layers

    for _, layer in adapter_layers(model):
        base_p = next(layer.get_base_layer().parameters(), None)
        dev = base_p.device if base_p is not None and base_p.device.type != "meta" else torch.device("cpu")
        for holder, key, item in _holders(layer, adapter):
            if isinstance(item, nn.Parameter) and item.is_meta:
                holder[key] = nn.Parameter(torch.empty_like(item, device=dev), requires_grad=item.requires_grad)
            elif isinstance(item, nn.Module) and any(t.is_meta for t in item.parameters()):
                item.to_empty(device=dev)
