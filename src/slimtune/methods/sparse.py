"""Sparse subnetwork fine-tuning: a fixed subset of each target weight trains, the rest is frozen.

    W_eff = W + scatter(values at index)          index: flat positions in W, fixed before training
    y     = x · W_effᵀ + b                        (one GEMM; W itself gets no gradient)

Which positions train (per target layer, `density` of its weights, at least one):
- "magnitude": the largest |w| (deterministic);
- "fisher" (alias "gradient"): the largest Σ grad² over a few batches (empirical Fisher, as in
  FISH-mask). Compute the scores on the plain model first, then pass them in:
      scores = fisher_scores(model, batches)              # batches: dicts with labels
      model = get_peft_model(model, SparseConfig(density=0.01, selection="fisher", scores=scores))
- "random": a seeded random subset.

Only the sparse delta is saved: `<path>.sparse_values` (nnz,) and `<path>.sparse_index` (nnz,
int64 flat positions in the stored weight layout). Merging adds the values at their positions:
exact.

Cost (fwd+bwd, 2 CPU threads on a shared, loaded machine, so ranges over 3 runs): for a
2048×2048 weight and 512 tokens, scattering the values into a weight-shaped delta and running
one GEMM on W + delta took 0.40-0.57 s at density 1% and 0.32-0.53 s at 0.1%; a second GEMM on
the delta alone 0.54-0.96 s; an index_add of x[:, cols]·v into the output 0.95-1.19 s at 1% and
0.36-0.53 s at 0.1% (its memory also grows with tokens × nnz). For the tiny test shapes all three
take a few ms, within the noise. So the layer uses scatter + one GEMM; the transient delta is one
weight-sized tensor per layer (W itself never gets a gradient).
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import targeting
from ..config import AdapterConfig, ConfigError, listify
from ..peft_types import PeftType
from ..inject import AdapterLayer
from ..registry import register_method
from ..targeting import LINEAR_TYPES, Conv1D
from ..tuner import Tuner
from ._select import LossFn, squared_grad_sums

SELECTIONS = ("magnitude", "fisher", "gradient", "random")


@dataclass
class SparseConfig(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.SPARSE  # slimtune's own type
    method: ClassVar[str] = "sparse"

    target_modules: Any = "all-linear"  # names / regex / "all-linear" (the output head is never a target)
    exclude_modules: Any = None
    density: float = 0.01  # fraction of each target weight that trains (at least one entry per layer)
    selection: str = "magnitude"  # "magnitude" | "fisher" (= "gradient") | "random"
    seed: int = 0  # for selection="random"
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None
    # Set by slimtune once positions are chosen: a config read back from disk takes them from the
    # file instead of asking for scores again.
    selected: bool = False
    # {module path: score tensor shaped like its weight} for selection="fisher"; never written to disk.
    scores: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.target_modules = listify(self.target_modules)
        self.exclude_modules = listify(self.exclude_modules)
        self.modules_to_save = listify(self.modules_to_save)
        if not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise ConfigError(f"density={self.density!r}: must be in (0, 1] (e.g. 0.01 trains 1% of each weight)")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection={self.selection!r}: use one of {', '.join(SELECTIONS)}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.pop("scores", None)
        return d

    def for_loading(self) -> "SparseConfig":
        """Weights from a file bring their positions: choose none (no scores needed)."""
        return self.replace(selected=True, scores=None)

    def needs_scores(self) -> bool:
        return self.selection in ("fisher", "gradient") and self.scores is None and not self.selected

    def with_scores(self, model: nn.Module, batches: list) -> "SparseConfig":
        return self.replace(scores=fisher_scores(model, batches, self.target_modules or "all-linear"))

    def nnz(self, numel: int) -> int:
        return max(1, min(numel, round(self.density * numel)))


class _Index(nn.Module):
    """The fixed flat positions of one adapter (a buffer: moves with .to(), saved via the key map)."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index, persistent=False)


class SparseLinear(AdapterLayer):
    """A Linear/Conv1D whose weight gets a trained sparse delta at fixed positions."""

    adapter_layer_names = ("sparse_values",)
    other_param_names = ("sparse_index",)

    def __init__(self, base_layer: nn.Module, adapter: str, index: torch.Tensor) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.sparse_values = nn.ParameterDict()
        self.sparse_index = nn.ModuleDict()
        self._checked: set[str] = set()
        self.update_layer(adapter, index)

    def update_layer(self, adapter: str, index: torch.Tensor) -> None:
        dtype, device = self._adapter_dtype_device()
        self.sparse_index[adapter] = _Index(index.to(device=device, dtype=torch.long))
        self.sparse_values[adapter] = nn.Parameter(torch.zeros(index.numel(), dtype=dtype, device=device))
        self._checked.discard(adapter)
        if not self.active_adapters:
            self.active_adapters = [adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        w = self.get_base_layer().weight
        v = self.sparse_values[adapter]
        return torch.zeros(w.numel(), dtype=v.dtype, device=v.device).index_put(
            (self.sparse_index[adapter].index,), v).view(w.shape)  # stored layout, like W

    def _check(self, name: str) -> None:
        if name in self._checked:
            return
        idx = self.sparse_index[name].index
        if idx.numel() and int(idx.min()) < 0:
            raise RuntimeError(f"sparse adapter '{name}' has no positions: its config says they were chosen "
                               "(selected=True) but no adapter file was loaded. Load the saved adapter with "
                               "PeftModel.from_pretrained, or build a new one with selected=False")
        self._checked.add(name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError("mixed-adapter batches are LoRA-only; run one sparse adapter per batch")
        names = [] if (self.disable_adapters or self.merged) else [n for n in self.active_adapters
                                                                 if n in self.sparse_values]
        base = self.get_base_layer()
        if not names or type(base) not in (nn.Linear, Conv1D):
            if names:
                raise TypeError(f"sparse fine-tuning needs a plain Linear/Conv1D base, not {type(base).__name__}")
            return self.base_layer(x, *args, **kwargs)
        w = base.weight
        for n in names:
            self._check(n)
            w = w + self.get_delta_weight(n).to(w.dtype)  # W + scatter(values): one weight-sized temp
        w = w.t() if self.fan_in_fan_out else w  # (out, in)
        return F.linear(x, w, base.bias)


def _select_index(weight: torch.Tensor, config: SparseConfig, path: str,
                   scores: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Flat positions (sorted) of the weights that train in one layer."""
    k = config.nnz(weight.numel())
    if config.selected:  # positions come from the adapter file
        return torch.full((k,), -1, dtype=torch.long)
    if config.selection == "random":
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(path.encode()))
        idx = torch.randperm(weight.numel(), generator=g)[:k]
    else:
        if config.selection == "magnitude":
            score = weight.detach().abs().flatten().float()
        else:
            if scores is None:
                raise ConfigError(
                    f"sparse: selection='{config.selection}' needs scores measured on a few batches: "
                    "scores = slimtune.methods.sparse.fisher_scores(model, batches) before get_peft_model, then "
                    "SparseConfig(selection='fisher', scores=scores); or use selection='magnitude'")
            if path not in scores:
                raise ConfigError(f"sparse: the scores have no entry for '{path}' (they cover "
                                  f"{len(scores)} modules); compute them with the same target_modules")
            score = scores[path].detach().flatten().float().to(weight.device)
            if score.numel() != weight.numel():
                raise ConfigError(f"sparse: scores['{path}'] has {score.numel()} entries, the weight {weight.numel()}")
        idx = torch.topk(score, k, sorted=False).indices
    return idx.sort().values


def fisher_scores(model: nn.Module, batches: Iterable, target_modules: Any = "all-linear",
                  loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """Σ grad² of each target weight over `batches` (empirical Fisher), keyed by module path.

    Run it on the plain model (before get_peft_model). `batches`: a few model inputs with labels
    (dicts for HF models), or (x, y) pairs with a loss_fn(model, batch) -> loss.
    """
    sel = targeting.select(model, target_modules, supported_types=LINEAR_TYPES, method="sparse")
    params = {p: model.get_submodule(p).weight for p in sel.names}
    return squared_grad_sums(model, params, batches, loss_fn)


gradient_scores = fisher_scores


@register_method(SparseConfig, mergeable=True, description="train a fixed sparse subset of each weight")
class SparseModel(Tuner):
    supported_types = LINEAR_TYPES

    def inject_adapter(self, config: SparseConfig, adapter: str) -> None:
        config = config.replace()  # the stored copy records selected=True; the caller's stays reusable
        super().inject_adapter(config, adapter)
        config.selected = True  # the positions now live in the layers (and in the saved file)
        config.scores = None  # drop the (weight-sized) score tensors

    def create_layer(self, base: nn.Module, config: SparseConfig, adapter: str, path: str) -> AdapterLayer:
        return SparseLinear(base, adapter, _select_index(base.weight, config, path, config.scores))

    def update_layer(self, layer: AdapterLayer, config: SparseConfig, adapter: str, path: str) -> None:
        if not isinstance(layer, SparseLinear):
            raise ValueError(f"'{path}' already holds a {type(layer).__name__}; a sparse adapter cannot be added to it")
        layer.update_layer(adapter, _select_index(layer.get_base_layer().weight, config, path, config.scores))

    def adapter_key_map(self, adapter: str, root: nn.Module) -> dict[str, torch.Tensor]:
        from ..checkpoint import adapter_key_map

        extra = {f"{path}.sparse_index": m.sparse_index[adapter].index for path, m in root.named_modules()
                 if isinstance(m, SparseLinear) and adapter in m.sparse_index}
        return adapter_key_map(root, adapter, extra)

    @contextmanager
    def mixed_batch(self, adapter_names: list[str]):
        raise ValueError("mixed-adapter batches are LoRA-only; run one sparse adapter per batch")
        yield  # pragma: no cover
