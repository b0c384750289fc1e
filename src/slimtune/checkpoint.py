"""Adapter weights on disk in HF PEFT's exact layout.

Keys are the in-memory parameter paths with the adapter name removed:
    base_model.model.<path>.lora_A.default.weight       -> base_model.model.<path>.lora_A.weight
    base_model.model.<path>.lora_embedding_A.default    -> base_model.model.<path>.lora_embedding_A
    base_model.model.<path>.modules_to_save.default.w   -> base_model.model.<path>.w
The mapping is built structurally from the adapter layers (`adapter_key_map`), so saving and
loading share one source of truth and a file for another model fails on its first bad key.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.modules.module import _IncompatibleKeys

from .inject import AdapterLayer, ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """An adapter file that does not fit this model, or cannot be read."""


def adapter_key_map(peft_model: nn.Module, adapter: str, extra: dict[str, nn.Parameter] | None = None
                    ) -> dict[str, torch.Tensor]:
    """On-disk key -> live tensor for one adapter, walking the adapter modules by type.

    `extra` adds method-specific tensors (e.g. LoRA's trained biases) under their full paths.
    """
    out: dict[str, torch.Tensor] = {}
    for path, m in peft_model.named_modules():
        if isinstance(m, AdapterLayer):
            for rel, p in m.adapter_parameters(adapter):
                attr, _, rest = rel.partition(".")
                out[f"{path}.{attr}" + (f".{rest}" if rest else "")] = p
        elif isinstance(m, ModulesToSaveWrapper):
            for rel, p in m.adapter_parameters(adapter):
                out[f"{path}.{rel}"] = p
            if adapter in m.modules_to_save:
                for rel, b in m.modules_to_save[adapter].named_buffers():
                    out[f"{path}.{rel}"] = b
    for k, p in (extra or {}).items():
        out.setdefault(k, p)
    return out


def save_adapter_weights(tensors: dict[str, torch.Tensor], directory: str, safe_serialization: bool = True) -> str:
    """Write atomically (temp file + rename) so a crash never leaves a half-written adapter."""
    os.makedirs(directory, exist_ok=True)
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if safe_serialization:
        path = os.path.join(directory, WEIGHTS_NAME)
        tmp = path + ".tmp"
        save_file(data, tmp, metadata={"format": "pt"})
    else:
        path = os.path.join(directory, WEIGHTS_NAME_BIN)
        tmp = path + ".tmp"
        torch.save(data, tmp)
    os.replace(tmp, path)
    return path


def read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """Read safetensors, or a .bin through torch.load(weights_only=True) (never arbitrary pickles)."""
    st, bn = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, WEIGHTS_NAME_BIN)
    if os.path.isfile(st):
        try:
            return load_file(st)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{st} is corrupt or truncated ({e}); save the adapter again "
                                  "or restore it from a checkpoint") from e
    if os.path.isfile(bn):
        try:
            return torch.load(bn, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{bn} cannot be read safely ({e}); convert it to safetensors") from e
    raise CheckpointError(f"no {WEIGHTS_NAME} (or {WEIGHTS_NAME_BIN}) in '{directory}': pass the folder "
                          "save_pretrained wrote (adapters not named 'default' sit in a sub-folder of their name)")


def load_into(key_map: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, strict: bool = True,
              model: nn.Module | None = None) -> _IncompatibleKeys:
    """Copy a file's tensors into the live ones; returns PEFT's load result (missing, unexpected keys).

    A file key outside the adapter that names a tensor of `model` (e.g. `classifier.original_module.bias`
    in PEFT files with bias="all") loads there, as PEFT's state-dict loading does. Other keys that do
    not fit raise with `strict` (the default: a partly loaded adapter computes something else), or are
    reported in the result with `strict=False`. A shape mismatch always raises."""
    live = dict(key_map)
    unexpected = [k for k in state if k not in live]
    if unexpected and model is not None:
        full = model.state_dict(keep_vars=True)
        live.update({k: full[k] for k in unexpected if k in full})
        unexpected = [k for k in unexpected if k not in live]
    if unexpected and strict:
        k = unexpected[0]
        raise CheckpointError(
            f"{source}: tensor '{k}' has no place in this model ({len(unexpected)} such keys): the adapter "
            "was trained for another model or with other target_modules. Load it into the base model it was made for.")
    for k, v in state.items():
        if k in live and tuple(live[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: tensor '{k}' has shape {tuple(v.shape)} in the file but {tuple(live[k].shape)} in the "
                "model: the adapter was made for a model of another size (or another rank than its config says)")
    missing = [k for k in key_map if k not in state]
    if missing and strict:
        raise CheckpointError(f"{source}: the file lacks {len(missing)} tensors the config implies, first "
                              f"'{missing[0]}': the file is incomplete or belongs to another adapter")
    with torch.no_grad():
        for k, v in state.items():
            if k in live:
                live[k].copy_(v.to(dtype=live[k].dtype, device=live[k].device))
    return _IncompatibleKeys(missing, unexpected)


def warn_zero_trainable(adapter: str) -> None:
    warnings.warn(f"adapter '{adapter}' was loaded with is_trainable=False, so 0 parameters will train. "
                  "To continue training it, load with PeftModel.from_pretrained(..., is_trainable=True)",
                  stacklevel=3)
