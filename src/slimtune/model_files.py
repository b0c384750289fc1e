"""`PeftModel`'s files: save_pretrained, from_pretrained, load_adapter and the key handling behind
them, in PEFT's folder layout (adapter_config.json + adapter_model.safetensors + README.md).

Split from model.py (the live model: adapters, forward, merging) as a mixin, `AdapterFiles`, that
PeftModel inherits; it reads only what PeftModel defines (base_model, peft_config, add_adapter, ...).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .config import AdapterConfig

AUTOCAST_DEFAULT = None  # None: adapters in the base weights' dtype (slimtune); True: PEFT's fp32 upcast


class AdapterFiles:
    """The file half of PeftModel (a mixin: `self` is the PeftModel)."""

    def _key_map(self, adapter: str) -> dict[str, torch.Tensor]:
        return self.base_model.adapter_key_map(adapter, self)

    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The tensors save_pretrained writes, keyed as on disk."""
        self.base_model._check(adapter_name)
        return {k: v.detach() for k, v in self._key_map(adapter_name).items()}

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: Any = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        **kwargs: Any) -> None:
        """`adapter_config.json` + `adapter_model.safetensors` (+ a README.md model card); adapters other
        than "default" go in a sub-folder of their name, as PEFT does.

        `path_initial_model_for_weight_conversion`: the folder where this adapter was saved right after
        a PiSSA/OLoRA init, before training. The adapter is then written as a plain LoRA of twice the
        rank (ΔW = BA − B₀A₀) that applies to the original base model, as PEFT's conversion."""
        if os.path.isfile(save_directory):
            raise ValueError(f"'{save_directory}' is a file; save_pretrained needs a folder")
        names = selected_adapters or list(self.peft_config)
        for name in names:
            self.base_model._check(name)
        if not is_main_process:
            return
        from .hub import write_model_card

        os.makedirs(save_directory, exist_ok=True)
        write_model_card(self, str(save_directory))
        for name in names:
            out = os.path.join(save_directory, name) if name != "default" else str(save_directory)
            cfg = self.peft_config[name].replace(inference_mode=True)
            if cfg.base_model_name_or_path is None:
                cfg.base_model_name_or_path = base_model_name(self.get_base_model())
            state = self.get_adapter_state_dict(name)
            from .save_options import embedding_layers_state

            state.update(embedding_layers_state(self, name, save_embedding_layers))
            if path_initial_model_for_weight_conversion is not None:
                from .methods.lora_convert import convert_to_plain_lora

                cfg, state = convert_to_plain_lora(self, name, cfg, state, str(path_initial_model_for_weight_conversion))
            ckpt.save_adapter_weights(state, out, safe_serialization)
            cfg.save_pretrained(out)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        from .hub import offline_error

        raise offline_error("push_to_hub")

    def create_or_update_model_card(self, output_dir: str) -> None:
        from .hub import write_model_card

        write_model_card(self, output_dir)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        autocast_adapter_dtype: bool | None = AUTOCAST_DEFAULT, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict[str, str] | None = None,
                        subfolder: str | None = None, strict: bool = True, **kwargs: Any) -> "PeftModel":
        """Load a saved adapter (slimtune's or PEFT's) onto `model`.

        `is_trainable=False` (PEFT's default) freezes it for inference; pass True to train on. A
        `config` passed in is the one the model keeps (PEFT's behaviour), its inference_mode set.
        `key_mapping` ({regex: replacement}) renames file keys (after "base_model.model.") first;
        by default the model's own `_checkpoint_conversion_mapping`, as PEFT. `strict=False` loads
        what fits and reports the rest, as PEFT does; the default raises on the first bad tensor."""
        path = _adapter_dir(model_id, subfolder)
        if config is None:
            config = AdapterConfig.from_pretrained(path)
        elif not isinstance(config, AdapterConfig):
            raise ValueError(f"config must be a slimtune adapter config (LoraConfig, ...), got {type(config).__name__}")
        config.inference_mode = not is_trainable  # (PEFT refuses is_trainable for prompt learning; slimtune trains on)
        if key_mapping is None and not config.is_prompt_learning:
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None
        state = ckpt.read_adapter_weights(path)
        from .model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel

        task_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(config.task_type or ""), cls) if cls is PeftModel else cls
        self = task_cls(model, config.for_loading(), adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                        low_cpu_mem_usage=low_cpu_mem_usage)
        self.peft_config[adapter_name] = config  # the caller's / the file's config, not the loading variant
        result = self._load_state(adapter_name, state, path, is_trainable, key_mapping, strict,
                                  kwargs.get("ignore_mismatched_sizes", False))
        if result.missing_keys:
            warnings.warn(f"Found missing adapter keys while loading the checkpoint: {result.missing_keys}.")
        return self

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool | None = AUTOCAST_DEFAULT,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, subfolder: str | None = None,
                     strict: bool = True, **kwargs: Any):
        """Load a saved adapter under `adapter_name` (a new one, inactive until set_adapter; or an
        existing one, whose weights are replaced, as PEFT and the Trainer's resume do).

        Returns PEFT's load result: `.missing_keys` (adapter tensors the file lacks) and
        `.unexpected_keys` (file tensors with no place here), both empty unless `strict=False`."""
        path = _adapter_dir(model_id, subfolder)
        state = ckpt.read_adapter_weights(path)
        new = adapter_name not in self.peft_config
        if new:
            cfg = AdapterConfig.from_pretrained(path)
            cfg.inference_mode = not is_trainable
            self.add_adapter(adapter_name, cfg.for_loading(), autocast_adapter_dtype=autocast_adapter_dtype,
                             low_cpu_mem_usage=low_cpu_mem_usage)
            self.peft_config[adapter_name] = cfg
        elif is_trainable:
            self.peft_config[adapter_name].inference_mode = False
        if key_mapping is None and not self.peft_config[adapter_name].is_prompt_learning:
            key_mapping = getattr(self.get_base_model(), "_checkpoint_conversion_mapping", None) or None
        try:
            result = self._load_state(adapter_name, state, path, is_trainable, key_mapping, strict,
                                      kwargs.get("ignore_mismatched_sizes", False))
        except Exception:
            if new:
                self.delete_adapter(adapter_name)  # leave the model as it was
            raise
        if torch_device is not None:
            for p in self.base_model.adapter_parameters(adapter_name):
                p.data = p.data.to(torch_device)
        self.base_model._mark_trainable()
        return result

    def _load_state(self, adapter: str, state: dict[str, torch.Tensor], path: str, is_trainable: bool,
                    key_mapping: dict[str, str] | None = None, strict: bool = True,
                    ignore_mismatched_sizes: bool = False):
        """`ignore_mismatched_sizes`: PEFT's option, file tensors of another shape are left out (warned).
        Adapter weights made with `low_cpu_mem_usage=True` (on meta) get memory here, then the file's values."""
        from .save_options import drop_mismatched, materialise

        if key_mapping:
            state = apply_key_mapping(state, key_mapping)
        materialise(self.base_model.model, adapter)
        key_map = self._key_map(adapter)
        if ignore_mismatched_sizes:
            full = self.state_dict(keep_vars=True)
            live, state = drop_mismatched({**{k: full[k] for k in state if k in full}, **key_map}, state,
                                          type(self).__name__)
            key_map = {k: v for k, v in key_map.items() if k in live}
        result = ckpt.load_into(key_map, state, path, strict=strict, model=self)
        if not is_trainable:
            if self.peft_config[adapter].inference_mode:
                self._untrainable_loaded.add(adapter)
            self.eval()  # dropout off, as PEFT leaves a model loaded for inference
        else:
            self._untrainable_loaded.discard(adapter)
        return result


def _adapter_dir(model_id: str | os.PathLike, subfolder: str | None) -> str:
    path = os.path.join(model_id, subfolder) if subfolder else str(model_id)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter folder '{path}' does not exist (slimtune loads local folders only; "
                                "download hub adapters first)")
    return path


def apply_key_mapping(state: dict[str, torch.Tensor], key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """PEFT's `key_mapping`: each {regex: replacement} applied to the key after "base_model.model."."""
    out = {}
    for k, v in state.items():
        head, rest = (ckpt.PREFIX, k[len(ckpt.PREFIX):]) if k.startswith(ckpt.PREFIX) else ("", k)
        for pattern, repl in key_mapping.items():
            rest, n = re.subn(pattern, repl, rest)
            if n:
                break
        out[head + rest] = v
    return out


def base_model_name(model: nn.Module) -> str | None:
    """What adapter_config.json records as the base: the model's name_or_path, with a model that
    slimtune ships (a cache folder on this machine) named by its Hub id, so other tools find it."""
    name = getattr(model, "name_or_path", None) or None
    if name:
        from .train.models import hub_id_for

        return hub_id_for(name) or name
    return None
