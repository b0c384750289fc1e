"""The model-level half of a method: inject adapters, switch, merge, unload, mark trainable.

`Tuner` is generic over methods whose layers are `AdapterLayer`s; a method subclasses it and
fills in `supported_types`, `default_targets` and `create_layer`. PEFT's structure is kept so
state-dict keys match: PeftModel.base_model (a Tuner) .model (the user's model).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
import torch.nn as nn

from . import targeting
from .config import AdapterConfig
from .families import TASK_HEADS
from .inject import (AdapterLayer, ModulesToSaveWrapper, add_modules_to_save, adapter_layers, outer_adapter_modules,
                     replace_module, save_wrappers, unwrap, wrapped_paths)


class NotMergeableError(TypeError):
    """The method has no weight delta to fold into the base weights."""


class UnknownAdapterError(KeyError, ValueError):  # PEFT raises ValueError for an unknown adapter name
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"no adapter named '{name}'; known adapters: {', '.join(known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class Tuner(nn.Module):
    supported_types: tuple[type, ...] = ()

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str = adapter_name
        from .quant.prepare import on_inject

        on_inject(model, config.method)  # a quantized base: refuse what cannot work, guard the CPU repack
        self.inject_adapter(config, adapter_name)

    # ---- method hooks --------------------------------------------------------------------
    def default_targets(self, config: AdapterConfig) -> Any:
        return None

    def create_layer(self, base: nn.Module, config: AdapterConfig, adapter: str, path: str) -> AdapterLayer:
        raise NotImplementedError

    def update_layer(self, layer: AdapterLayer, config: AdapterConfig, adapter: str, path: str) -> None:
        raise NotImplementedError

    def inject_other_targets(self, config: AdapterConfig, adapter: str) -> None:
        """Adapt what is not a module, after the modules (LoRA's `target_parameters`)."""

    def mark_extra_trainable(self, config: AdapterConfig) -> None:
        """Unfreeze what a method trains besides its adapter weights (e.g. LoRA's bias modes)."""

    def check_new_adapter(self, config: AdapterConfig, adapter: str) -> None:
        """Refuse an adapter that cannot live beside the ones already here (PEFT's checks)."""
        if adapter in self.peft_config:
            raise ValueError(f"an adapter named '{adapter}' already exists; pick another name or delete_adapter it first")
        with_bias = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if with_bias and getattr(config, "bias", "none") != "none":
            raise ValueError(f"bias={getattr(config, 'bias')!r}: adapter '{with_bias[0]}' already trains biases, and all "
                             "adapters share the base model's biases, so only one adapter per model may set bias; "
                             "use bias='none' for the others")

    # ---- injection -------------------------------------------------------------------------
    def inject_adapter(self, config: AdapterConfig, adapter: str) -> None:
        self.check_new_adapter(config, adapter)
        targets = getattr(config, "target_modules", None)
        params_only = not targets and bool(getattr(config, "target_parameters", None))  # LoRA on parameters alone
        if targets is None and not params_only:
            targets = self.default_targets(config)
            if targets is None:
                mt = getattr(getattr(self.model, "config", None), "model_type", type(self.model).__name__)
                raise targeting.TargetError(
                    f"{config.method}: no target_modules given and no default for model type '{mt}'; "
                    "pass target_modules=[...] (module names) or 'all-linear'")
        # Heads trained in full are wrapped first, so no target (e.g. "all-linear") lands inside them.
        try:
            self._setup_modules_to_save(config, adapter)
            sel = targeting.Selection([]) if params_only else targeting.select(
                self.model, targets, supported_types=self.supported_types,
                exclude_modules=getattr(config, "exclude_modules", None),
                layers_to_transform=getattr(config, "layers_to_transform", None),
                layers_pattern=getattr(config, "layers_pattern", None),
                skip=wrapped_paths(self.model), method=config.method,
            )
        except (targeting.TargetError, TypeError):
            self._drop_modules_to_save(adapter)  # leave the model as it was
            raise
        tied = shared_weights(self.model)
        for path in sel.names:
            module = self.model.get_submodule(path)
            if isinstance(module, AdapterLayer):
                self.update_layer(module, config, adapter, path)
            else:
                w = getattr(module, "weight", None)
                if isinstance(w, nn.Parameter) and len(tied.get(id(w), ())) > 1:
                    others = [n for n in tied[id(w)] if not n.startswith(path + ".")]
                    warnings.warn(f"'{path}' shares its weight with {others} (tied weights, e.g. tie_word_embeddings=True): "
                                  "the adapter changes this module only; merging it unties the two so the other "
                                  "keeps computing what it did", stacklevel=4)
                replace_module(self.model, path, self.create_layer(module, config, adapter, path))
        self.inject_other_targets(config, adapter)
        # Record what was chosen in a form PEFT reads (types and defaults become names).
        if hasattr(config, "target_modules"):
            if config.target_modules is None or (not isinstance(targets, str) and any(isinstance(t, type) for t in targets)):
                config.target_modules = sorted({p.split(".")[-1] for p in sel.names})
        self.peft_config[adapter] = config
        if len(self.peft_config) == 1:
            self.set_adapter(adapter)
        else:
            self._apply_active()  # the new adapter waits for set_adapter, also on modules only it targets

    def _apply_active(self) -> None:
        """Re-apply the active set to every adapter module (new layers start with their own adapter
        active) and recompute what trains."""
        for _, m in list(adapter_layers(self.model)) + list(save_wrappers(self.model)):
            m.set_adapter(self.active_adapters)
        self._mark_trainable()

    def adapter_key_map(self, adapter: str, root: nn.Module) -> dict[str, torch.Tensor]:
        """On-disk key -> live tensor for `adapter` (what save_pretrained writes and loading fills).

        `root` is the PeftModel, whose module paths are the keys ("base_model.model.<path>...").
        Methods with tensors outside adapter layers (biases, prompt tables) extend this.
        """
        from .checkpoint import adapter_key_map

        return adapter_key_map(root, adapter)

    def _setup_modules_to_save(self, config: AdapterConfig, adapter: str) -> None:
        """Wrap `modules_to_save` (plus the task's fresh head, PEFT's rule) for training in full."""
        to_save = list(getattr(config, "modules_to_save", None) or [])
        defaults = TASK_HEADS.get(config.task_type or "", [])
        heads = [h for h in defaults if h not in to_save]
        if heads and hasattr(config, "modules_to_save"):  # PEFT records every default head name
            to_save += heads
            config.modules_to_save = list(to_save)
        if to_save:
            found = add_modules_to_save(self.model, to_save, adapter, activate=not self.peft_config)
            # PEFT lists every default head name ("classifier", "score"); only one exists in a model.
            missing = [n for n in to_save if n not in defaults and not any(p == n or p.endswith("." + n) for p in found)]
            if missing:
                raise targeting.TargetError(f"modules_to_save entry '{missing[0]}' matches no module")

    def _drop_modules_to_save(self, adapter: str) -> None:
        for path, w in list(save_wrappers(self.model)):
            w.delete_adapter(adapter)
            if not w.adapter_names():
                replace_module(self.model, path, w.original_module)

    # ---- adapters as a set ----------------------------------------------------------------
    def _check(self, name: str) -> None:
        if name not in self.peft_config:
            raise UnknownAdapterError(name, list(self.peft_config))

    def set_adapter(self, name: str | list[str]) -> None:
        names = [name] if isinstance(name, str) else list(name)
        for n in names:
            self._check(n)
        layers = list(adapter_layers(self.model))
        if any(layer.merged for _, layer in layers):
            raise RuntimeError("adapters are merged into the base weights; unmerge_adapter() before switching")
        wrappers = list(save_wrappers(self.model))
        for _, w in wrappers:  # first: it refuses two active adapters that each have a copy of one module
            w.set_adapter(names)
        for _, layer in layers:
            layer.set_adapter(names)
        self.active_adapter = names[0] if len(names) == 1 else names
        self._mark_trainable()

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def delete_adapter(self, name: str) -> None:
        self._check(name)
        if any(name in layer.merged_adapters for _, layer in adapter_layers(self.model)):  # PEFT: ValueError, nothing deleted
            raise ValueError(f"Cannot delete adapter '{name}' while it is merged into the base weights; "
                             "call unmerge_adapter() first")
        for _, layer in adapter_layers(self.model):
            layer.delete_adapter(name)
        for _, w in save_wrappers(self.model):
            w.delete_adapter(name)
        del self.peft_config[name]
        remaining = [a for a in self.active_adapters if a != name]
        if remaining:
            self.set_adapter(remaining)
        elif self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))
        else:
            self.active_adapter = []  # PEFT's value: no adapter left, none active

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Every parameter owned by adapter `name`, found by module type."""
        for _, layer in adapter_layers(self.model):
            for _, p in layer.adapter_parameters(name):
                yield p
        for _, w in save_wrappers(self.model):
            yield from (p for _, p in w.adapter_parameters(name))

    def _mark_trainable(self) -> None:
        self.model.requires_grad_(False)
        for name in self.active_adapters:
            cfg = self.peft_config.get(name)
            if cfg is None or cfg.inference_mode:
                continue
            for p in self.adapter_parameters(name):
                p.requires_grad_(True)
            self.mark_extra_trainable(cfg)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside: the base model's output (merged adapters are unmerged and restored after).

        On exit the adapters are enabled again only if they were enabled before, as PEFT: a model
        switched off with disable_adapter_layers() stays off. A half-switched model (some adapter
        modules off) warns, and comes out all enabled, PEFT's rule."""
        flags = {m.disable_adapters for _, m in list(adapter_layers(self.model)) + list(save_wrappers(self.model))}
        was_off = flags == {True}
        if len(flags) > 1:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all adapters "
                          "will be enabled", stacklevel=3)
        merged = {path: list(layer.merged_adapters) for path, layer in adapter_layers(self.model) if layer.merged}
        for path in merged:
            self.model.get_submodule(path).unmerge()
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(was_off)
            for path, names in merged.items():
                self.model.get_submodule(path).merge(names)

    def _set_disabled(self, flag: bool) -> None:
        """Disabled: adapter modules compute the base and nothing trains (PEFT freezes the adapter
        layers too); enabled again: the active adapters train as before."""
        for _, m in list(adapter_layers(self.model)) + list(save_wrappers(self.model)):
            m.disable_adapters = flag
        if flag:
            for name in self.peft_config:
                for p in self.adapter_parameters(name):
                    p.requires_grad_(False)
        else:
            self._mark_trainable()

    def disable_adapter_layers(self) -> None:
        """PEFT's switch: every adapter module computes the base model until enable_adapter_layers()."""
        self._set_disabled(True)

    def enable_adapter_layers(self) -> None:
        self._set_disabled(False)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str], weights_dtype: torch.dtype | None = None,
                    weights_epoch=None):
        """Per-row adapters: row i uses adapter_names[i] ("__base__" = no adapter).

        `weights_dtype`: LoRA linears read their stacked adapter weights in this dtype (no gradients
        only; e.g. bfloat16 halves the bytes a serving step reads, lora_mixed.MixedLinear._mixed_forward);
        None keeps the input's dtype.

        `weights_epoch`: a value the caller changes whenever any adapter may have been added, removed
        or changed (the server: its registry's generation, bumped at every load and drop). While it
        is the same as at a layer's last batch, the layer reuses its stack of adapter weights
        without checking each adapter tensor's pointer and version (~20 ms a new batch on
        SmolLM2-135M with 16 adapters). None (the default): always checked, so weights changed in
        place (a training step) are seen at the next batch."""
        from .methods.lora_layers import BASE_ADAPTER
        from .methods.lora_mixed import MixedRows

        uniq = list(dict.fromkeys(adapter_names))
        for n in uniq:
            if n != BASE_ADAPTER:
                self._check(n)
        # modules_to_save copies route rows too: each row runs through its own adapter's head
        layers = outer_adapter_modules(self.model)  # one walk that skips the adapters' own modules
        if any(isinstance(m, AdapterLayer) and m.merged for m in layers):
            raise RuntimeError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first")
        dev = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        idx = torch.tensor([uniq.index(n) for n in adapter_names], device=dev)
        mixed = MixedRows(uniq, idx, weights_epoch)  # its layers share their row plans (lora_mixed._row_plan)
        for layer in layers:
            layer._mixed = mixed
            if weights_dtype is not None:
                layer._mixed_dtype = weights_dtype
        try:
            yield
        finally:
            for layer in layers:
                layer._mixed = None
                layer.__dict__.pop("_mixed_dtype", None)

    # ---- merging ---------------------------------------------------------------------------
    def _check_mergeable(self) -> None:
        from .registry import get_method

        cfg = next(iter(self.peft_config.values()), None)
        if cfg is not None and not get_method(cfg.method).mergeable:
            raise NotMergeableError(f"{cfg.method} adapters cannot be merged into the base weights; keep them "
                                    "unmerged (inference runs with the adapter) or train a mergeable method (lora, ia3, ...)")

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_mergeable()
        names = adapter_names or self.active_adapters
        for n in names:
            self._check(n)
        layers = [layer for _, layer in adapter_layers(self.model)]
        merged = list(dict.fromkeys(a for layer in layers for a in layer.merged_adapters))
        if merged:  # PEFT's warnings: merging twice is almost always a mistake
            more = [n for n in names if n not in merged]
            warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally "
                          f"merging {','.join(more)}." if more else "All adapters are already merged, nothing to do.",
                          stacklevel=3)
        tied = shared_weights(self.model)
        for layer in layers:
            if any(n in layer.adapter_names() for n in names):
                self._untie(layer, tied)
            layer.merge(names, safe_merge=safe_merge)

    def _untie(self, layer: AdapterLayer, tied: dict[int, list[str]]) -> None:
        """Give `layer`'s base its own copy of a weight it shares with another module (an embedding tied
        to the LM head), so merging changes this module only; the model's config stops saying tied."""
        base = layer.get_base_layer()
        w = base._parameters.get("weight")
        if w is None or len(tied.get(id(w), ())) < 2:
            return
        base.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        cfg = getattr(self.model, "config", None)
        for c in {id(c): c for c in (cfg, getattr(cfg, "get_text_config", lambda: None)())}.values():
            if c is not None and getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
        warnings.warn(f"merging into a weight shared by {tied[id(w)]}: the adapted module got its own copy "
                      "(tie_word_embeddings is now False), so the merged model computes what the adapter did",
                      stacklevel=4)

    def unmerge_adapter(self) -> None:
        layers = [layer for _, layer in adapter_layers(self.model)]
        if layers and not any(layer.merged for layer in layers):
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=3)
        for layer in layers:
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
                         progressbar: bool = False) -> nn.Module:
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        keep = (adapter_names or self.active_adapters)[0]
        from .quant.merge import dequantize_model

        # a quantized base comes back plain: dequantize(W_q) + ΔW, never re-quantized (quant/merge.py)
        return dequantize_model(unwrap(self.model, keep_adapter=keep))

    def unload(self) -> nn.Module:
        """The base model back, adapters dropped and any merge undone."""
        for _, layer in adapter_layers(self.model):
            layer.unmerge()
        return unwrap(self.model, keep_adapter=None)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


def shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in `model` (more than one: tied weights)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def is_adapter_module(m: nn.Module) -> bool:
    return isinstance(m, (AdapterLayer, ModulesToSaveWrapper))
