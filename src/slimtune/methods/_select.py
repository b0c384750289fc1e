"""Shared pieces of the non-LoRA methods: in-place tuners, task heads, gradient scores.

`InPlaceTuner` is the base of the methods that train some of the model's *own* parameters
(BitFit, layer-wise, full fine-tuning). Nothing is swapped in: the chosen parameters are
unfrozen where they are, and saved under their own paths (`base_model.model.<param path>`),
which is also where a ModulesToSaveWrapper copy would put them, so a task head saved this way
reads like PEFT's `modules_to_save`. Because the base is edited in place, one PeftModel holds
one such adapter; "merging" is a no-op (the weights already are the merged model).

    model.encoder.layer.0.attention.self.query.bias   <- trains in place, saved under that path
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from ..checkpoint import PREFIX
from ..config import AdapterConfig
from ..families import TASK_HEADS
from ..targeting import TargetError
from ..tuner import Tuner


def head_paths(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Module paths of `modules_to_save` entries plus the task head (SEQ_CLS: classifier/score).

    A `modules_to_save` entry that matches nothing is an error (nothing is silently ignored).
    """
    wanted = list(getattr(config, "modules_to_save", None) or [])
    defaults = TASK_HEADS.get(config.task_type or "", [])  # PEFT lists all ("classifier", "score"); one exists
    heads = [h for h in defaults if h not in wanted]
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for entry in wanted + heads:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits and entry not in defaults:
            raise TargetError(f"{config.method}: modules_to_save entry '{entry}' matches no module")
        out += [h for h in hits if not any(h == o or h.startswith(o + ".") for o in out)]
    return out


def module_params(model: nn.Module, paths: Iterable[str]) -> dict[str, nn.Parameter]:
    """Every parameter under the given module paths, by full parameter path (tied ones once)."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for path in paths:
        mod = model.get_submodule(path)
        for n, p in mod.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{path}.{n}" if path else n] = p
    return out


class InPlaceTuner(Tuner):
    """A method that trains a subset of the base model's own parameters.

    Subclasses implement `select_parameters(config) -> {param path: Parameter}` and set
    `keep_original` (True: a copy of the trained tensors' starting values is kept, so
    `disable_adapter()` and `unload()` give the base model back; False for methods where that
    copy would double the model's memory).
    """

    keep_original: bool = False

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        self._trained: dict[str, dict[str, nn.Parameter]] = {}
        self._original: dict[str, dict[str, torch.Tensor]] = {}
        super().__init__(model, config, adapter_name)

    def select_parameters(self, config: AdapterConfig) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    # ---- injection: choose parameters, nothing is swapped ----------------------------------
    def inject_adapter(self, config: AdapterConfig, adapter: str) -> None:
        if self.peft_config:
            raise ValueError(
                f"{config.method} trains the base model's own parameters in place, so a model holds one "
                f"{config.method} adapter ('{next(iter(self.peft_config))}' is already there); load the other "
                "adapter onto a fresh copy of the base model (or use LoRA for several adapters on one model)")
        params = self.select_parameters(config)
        if not params:
            raise TargetError(f"{config.method}: the configuration selects no parameter to train")
        self._trained[adapter] = params
        if self.keep_original:
            self._original[adapter] = {k: p.detach().clone() for k, p in params.items()}
        self.peft_config[adapter] = config
        self.set_adapter(adapter)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self._trained.get(name, {}).values()

    def adapter_key_map(self, adapter: str, root: nn.Module) -> dict[str, torch.Tensor]:
        return {PREFIX + k: p for k, p in self._trained[adapter].items()}

    def set_adapter(self, name: str | list[str]) -> None:
        names = [name] if isinstance(name, str) else list(name)
        for n in names:
            self._check(n)
        self.active_adapter = names[0]
        self._mark_trainable()

    # ---- the base model back (only with a kept copy) ---------------------------------------
    def _need_original(self, what: str) -> None:
        if not self.keep_original:
            method = next(iter(self.peft_config.values())).method if self.peft_config else "this method"
            raise RuntimeError(
                f"{what} needs the base model's original weights, but {method} trained them in place and kept "
                "no copy (it would double the memory); reload the base model from its checkpoint instead")

    @torch.no_grad()
    def _swap(self, adapter: str) -> None:
        for k, p in self._trained[adapter].items():
            tmp = p.detach().clone()
            p.copy_(self._original[adapter][k])
            self._original[adapter][k] = tmp

    @contextlib.contextmanager
    def disable_adapter(self):
        self._need_original("disable_adapter()")
        adapter = self.active_adapter
        self._swap(adapter)
        try:
            yield
        finally:
            self._swap(adapter)

    def delete_adapter(self, name: str) -> None:
        self._check(name)
        self._need_original("delete_adapter()")
        self._swap(name)
        del self._trained[name], self._original[name], self.peft_config[name]
        self.active_adapter = []
        self.model.requires_grad_(False)

    # ---- merging: the weights already are the merged model ---------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        for n in adapter_names or self.active_adapters:
            self._check(n)
        if safe_merge:
            for n in adapter_names or self.active_adapters:
                for k, p in self._trained[n].items():
                    if not torch.isfinite(p).all():
                        raise ValueError(f"parameter '{k}' of adapter '{n}' holds NaN/Inf; the training diverged")

    def unmerge_adapter(self) -> None:
        """Nothing to undo: the trained parameters are the model's own."""

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
                         progressbar: bool = False) -> nn.Module:
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        self.model.requires_grad_(True)
        return self.model

    def unload(self) -> nn.Module:
        self._need_original("unload()")
        for name in list(self._trained):
            self._swap(name)
        self._trained.clear()
        self._original.clear()
        self.model.requires_grad_(True)
        return self.model

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str]):
        raise ValueError("mixed-adapter batches need module-swap adapters (LoRA, IA3, ...); "
                         "this method edits the base model in place and holds one adapter")
        yield  # pragma: no cover


# ---- importance scores from a few batches --------------------------------------------------
LossFn = Callable[[nn.Module, object], torch.Tensor]


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """The model's own loss: batch is a dict with labels (HF models) or (inputs, target)."""
    if isinstance(batch, dict):
        out = model(**batch)
        loss = out["loss"] if isinstance(out, dict) or hasattr(out, "keys") else getattr(out, "loss", None)
        if loss is None:
            raise ValueError("the batches give no loss: pass dicts with 'labels' (HF models) or a loss_fn")
        return loss
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def squared_grad_sums(model: nn.Module, params: dict[str, nn.Parameter], batches: Iterable,
                      loss_fn: LossFn | None = None, taylor: bool = False) -> dict[str, torch.Tensor]:
    """Σ over batches of grad² (empirical Fisher diagonal) per parameter, or with `taylor` of
    (grad·w)² (first-order estimate of the loss change from zeroing each weight).

    Gradients are enabled only on `params`; the model's requires_grad flags and mode are restored.
    """
    loss_fn = loss_fn or default_loss
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    model.eval()  # no dropout: the score measures the weights, not the noise
    n = 0
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (k, p), g in zip(params.items(), grads):
                if g is not None:
                    g = g.float() * p.detach().float() if taylor else g.float()
                    sums[k].add_(g * g)
            n += 1
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))
        model.train(was_training)
    if n == 0:
        raise ValueError("no batches given: pass a few batches (an iterable of model inputs with labels)")
    return sums
