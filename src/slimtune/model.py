"""`PeftModel`: the user's model plus a set of named adapters, with HF PEFT's API and files.

    PeftModel ─ base_model (the method's Tuner) ─ model (the user's model, adapters swapped in)

Names and meaning follow PEFT (get_peft_model, from_pretrained, save_pretrained, set_adapter,
merge_and_unload, ...) so PEFT code runs with only the import changed.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .config import AdapterConfig
from .registry import get_method


class PeftModel(nn.Module):
    def __init__(self, model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        spec = get_method(peft_config.method)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self.base_model = spec.tuner_cls(model, peft_config, adapter_name)
        self._untrainable_loaded: set[str] = set()

    # ---- delegation: a PeftModel behaves like the model it wraps --------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self.base_model.mixed_batch(list(adapter_names)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        ctx = self.base_model.mixed_batch(list(adapter_names)) if adapter_names is not None else contextlib.nullcontext()
        with ctx:
            return self.base_model.generate(*args, **kwargs)

    def train(self, mode: bool = True):
        if mode:
            for name in self.active_adapters:
                if name in self._untrainable_loaded:
                    ckpt.warn_zero_trainable(name)
        return super().train(mode)

    # ---- adapters as a set ----------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig, low_cpu_mem_usage: bool = False) -> None:
        current = get_method(next(iter(self.peft_config.values())).method) if self.peft_config else None
        if current is not None and peft_config.method != current.name:
            raise ValueError(f"this model holds {current.name} adapters; a {peft_config.method} adapter needs its "
                             "own PeftModel (methods cannot be mixed on one model)")
        self.base_model.inject_adapter(peft_config, adapter_name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)
        self._untrainable_loaded.discard(adapter_name)

    def list_adapters(self) -> list[str]:
        return list(self.peft_config)

    @contextlib.contextmanager
    def disable_adapter(self):
        with self.base_model.disable_adapter():
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
                         progressbar: bool = False) -> nn.Module:
        """Merge into the base weights and return the plain model, no slimtune module left."""
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ---- parameter report -----------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        from .quant.backend import param_count  # a packed 4-bit weight counts its unpacked size, as PEFT does

        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(param_count(p) for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    # ---- files ----------------------------------------------------------------------------
    def _key_map(self, adapter: str) -> dict[str, torch.Tensor]:
        return self.base_model.adapter_key_map(adapter, self)

    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The tensors save_pretrained writes, keyed as on disk."""
        self.base_model._check(adapter_name)
        return {k: v.detach() for k, v in self._key_map(adapter_name).items()}

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True, **_: Any) -> None:
        """`adapter_config.json` + `adapter_model.safetensors`; adapters other than "default" go in a
        sub-folder of their name, as PEFT does."""
        if os.path.isfile(save_directory):
            raise ValueError(f"'{save_directory}' is a file; save_pretrained needs a folder")
        for name in selected_adapters or list(self.peft_config):
            self.base_model._check(name)
            out = os.path.join(save_directory, name) if name != "default" else str(save_directory)
            cfg = self.peft_config[name].replace(inference_mode=True)
            ckpt.save_adapter_weights(self.get_adapter_state_dict(name), out, safe_serialization)
            cfg.save_pretrained(out)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        subfolder: str | None = None, **_: Any) -> "PeftModel":
        """Load a saved adapter (slimtune's or PEFT's) onto `model`.

        `is_trainable=False` (PEFT's default) freezes it for inference; pass True to train on.
        """
        path = os.path.join(model_id, subfolder) if subfolder else str(model_id)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"adapter folder '{path}' does not exist (slimtune loads local folders only; "
                                    "download hub adapters first)")
        cfg = config or AdapterConfig.from_pretrained(path)
        cfg = cfg.replace(inference_mode=not is_trainable)
        state = ckpt.read_adapter_weights(path)
        self = cls(model, cfg.for_loading(), adapter_name)
        self.peft_config[adapter_name] = cfg  # the file's config, as saved (not the loading variant)
        self._load_state(adapter_name, state, path, is_trainable)
        return self

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, **_: Any) -> None:
        path = os.path.join(model_id, subfolder) if subfolder else str(model_id)
        cfg = AdapterConfig.from_pretrained(path).replace(inference_mode=not is_trainable)
        state = ckpt.read_adapter_weights(path)
        self.add_adapter(adapter_name, cfg.for_loading())
        self.peft_config[adapter_name] = cfg
        try:
            self._load_state(adapter_name, state, path, is_trainable)
        except Exception:
            self.delete_adapter(adapter_name)  # leave the model as it was
            raise

    def _load_state(self, adapter: str, state: dict[str, torch.Tensor], path: str, is_trainable: bool) -> None:
        ckpt.load_into(self._key_map(adapter), state, path)
        if not is_trainable:
            self._untrainable_loaded.add(adapter)
            self.eval()


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default", **_: Any) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (PEFT's entry point)."""
    return PeftModel(model, peft_config, adapter_name)


# PEFT's task-specific class names: the wrapper is task-agnostic, so they are the same class.
PeftModelForCausalLM = PeftModelForSequenceClassification = PeftModelForSeq2SeqLM = PeftModel
PeftModelForTokenClassification = PeftModelForQuestionAnswering = PeftModelForFeatureExtraction = PeftModel
