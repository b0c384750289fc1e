"""AdaLoRA (Zhang et al. 2023): an SVD-shaped update W = W0 + P Λ Q whose ranks are chosen while
training, PEFT's `AdaLoraConfig`, keys and files.

    x ──► base ─────────────────────────────────────┐
    └──► dropout ─► Q=lora_A (r×in) ─► ×Λ=lora_E (r) ─► P=lora_B (out×r) ─► × α/ranknum ─► (+) ─► y

Every layer starts at `init_r` triplets (P column, λ, Q row). After each optimizer step the
trainer calls `update_and_allocate(step)`: the sensitivity |θ·∂L/∂θ| of every entry is smoothed
(EMA β1) with its uncertainty (EMA β2); a triplet's score is its λ's plus the mean of its P
column's and Q row's; the rank budget falls from init_r·layers to target_r·layers as a cubic
between `tinit` and `total_step − tfinal` (re-allocated every `deltaT` steps), and the triplets
below the budget get λ = 0. The mask is final at `total_step − tfinal` and kept after. The loss
gets `orth_reg_weight` · mean ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F so P and Q stay near-orthogonal.

`config.rank_pattern` records the kept triplets per layer (`"<path>.lora_E": [bool, ...]`, PEFT's);
the file holds only those (PEFT's pruned layout), and loading builds layers of the kept ranks,
with the scale still α/init_r as PEFT's `ranknum`. Linear and GPT-2 Conv1D layers; one trainable
AdaLoRA adapter per model, as in PEFT.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..config import ConfigError
from ..families import default_lora_targets
from ..inject import AdapterLayer, adapter_layers
from ..peft_types import PeftType
from ..registry import register_method
from ..targeting import LINEAR_TYPES, Conv1D
from ..tuner import Tuner
from .lora import LoraConfig


@dataclass
class AdaLoraConfig(LoraConfig):
    peft_type: ClassVar[PeftType] = PeftType.ADALORA
    method: ClassVar[str] = "adalora"

    target_r: int = 8  # average rank per layer at the end
    init_r: int = 12  # rank every layer starts with
    tinit: int = 0  # steps before the budget starts to fall
    tfinal: int = 0  # steps at the end with the ranks fixed
    deltaT: int = 1  # steps between re-allocations
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5
    total_step: Any = None  # the training steps (required, as in PEFT)
    rank_pattern: Any = None  # {"<path>.lora_E": [kept?, ...]}: written by the allocation

    def __post_init__(self) -> None:
        patterns = self.rank_pattern
        self.rank_pattern = {}  # LoRA's rank_pattern means something else; checked below as AdaLoRA's
        super().__post_init__()
        self.rank_pattern = patterns
        if self.use_dora:
            raise ConfigError("AdaLoRA does not support DoRA; set use_dora=False")
        if self.target_parameters:
            raise ConfigError("AdaLoRA does not support target_parameters; use LoRA for parameters")
        if self.r != 8:  # PEFT's warning: r is LoRA's
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored."
                          "If you intended to set the initial rank, use `init_r` instead.", stacklevel=3)
        if not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ConfigError("AdaLoRA needs total_step (the number of training steps, > 0) for its rank budget "
                              "schedule: pass total_step=<the job's steps>")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight={self.orth_reg_weight}: must be >= 0")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"beta1={self.beta1}, beta2={self.beta2}: both must be in (0, 1)")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError("The supplied schedule values don't allow for a budgeting phase (tinit >= total_step - "
                              "tfinal): decrease tfinal/tinit or increase total_step")
        if self.init_r <= 0 or self.target_r <= 0 or self.deltaT <= 0:
            raise ConfigError("init_r, target_r and deltaT must be positive integers")

    def for_module(self, path: str) -> tuple[int, float]:
        """(rank to build, alpha): the kept triplets when a rank pattern is known (loading), else init_r."""
        kept = (self.rank_pattern or {}).get(f"{path}.lora_E")
        return (int(sum(bool(k) for k in kept)) if kept is not None else self.init_r), self.lora_alpha


class SVDLinear(AdapterLayer):
    """AdaLoRA on nn.Linear (or GPT-2's Conv1D, weight stored (in, out))."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def __init__(self, base_layer: nn.Module, adapter: str, **kw) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        w = base_layer.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape
        self.lora_A, self.lora_B, self.lora_E = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}
        self.update_layer(adapter, **kw)

    def update_layer(self, adapter: str, r: int, lora_alpha: float, lora_dropout: float, init_lora_weights: Any,
                     init_r: int) -> None:
        w = self.get_base_layer().weight
        dtype = w.dtype if w.is_floating_point() else torch.get_default_dtype()
        self.r[adapter], self.lora_alpha[adapter] = r, lora_alpha
        self.scaling[adapter] = lora_alpha if lora_alpha > 0 else float(r)  # PEFT: α itself, divided by ranknum
        self.ranknum[adapter] = float(init_r)  # the starting rank: the scale stays put as triplets are dropped
        self.lora_dropout[adapter] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter] = nn.Parameter(torch.zeros(r, self.in_features, dtype=dtype, device=w.device))
        self.lora_E[adapter] = nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=w.device))
        self.lora_B[adapter] = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=w.device))
        with torch.no_grad():  # PEFT's init: Λ = 0 (the output starts at the base), P, Q ~ N(0, 0.02)
            self.lora_A[adapter].normal_(0.0, 0.02)
            self.lora_B[adapter].normal_(0.0, 0.02)
            if init_lora_weights is False:  # tests: a non-zero Λ so the adapter changes the output
                self.lora_E[adapter].normal_(0.0, 1.0)
        if not self.active_adapters:
            self.active_adapters = [adapter]

    def _scale(self, adapter: str) -> float:
        return self.scaling[adapter] / (self.ranknum[adapter] + 1e-5)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = self.lora_B[adapter] @ (self.lora_A[adapter] * self.lora_E[adapter]) * self._scale(adapter)
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError("AdaLoRA does not support mixed-adapter batches (as PEFT); run one adapter per batch")
        if self.disable_adapters or self.merged:
            return out
        shape = out.shape
        out = out.reshape(-1, shape[-1])
        for name in self.active_adapters:
            a = self.lora_A[name]
            qs = a * (self.lora_E[name] * self._scale(name))  # (r, in): Λ and the scale folded into Q, tiny
            xa = self.lora_dropout[name](x.to(a.dtype)) @ qs.t()  # (..., r): never an out×in product
            out = torch.addmm(out, xa.reshape(-1, xa.shape[-1]).to(out.dtype), self.lora_B[name].t().to(out.dtype))
        return out.view(shape)


class RankAllocator:
    """PEFT's budget schedule and importance scores, found structurally over the SVD layers."""

    def __init__(self, config: AdaLoraConfig, layers: dict[str, SVDLinear], adapter: str) -> None:
        self.config, self.adapter = config, adapter
        self.init_bgt = sum(layer.r[adapter] for layer in layers.values())
        self.target_bgt = config.target_r * len(layers)
        self.ema_ipt: dict[int, torch.Tensor] = {}
        self.ema_unc: dict[int, torch.Tensor] = {}

    def reset_ipt(self) -> None:
        self.ema_ipt.clear()
        self.ema_unc.clear()

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * mul ** 3 + self.target_bgt), step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, layers: dict[str, SVDLinear]) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for layer in layers.values():
            for p in (layer.lora_A[self.adapter], layer.lora_B[self.adapter], layer.lora_E[self.adapter]):
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs()
                avg = self.ema_ipt.get(id(p), torch.zeros_like(p)).mul_(b1).add_(ipt, alpha=1 - b1)
                self.ema_ipt[id(p)] = avg
                self.ema_unc[id(p)] = self.ema_unc.get(id(p), torch.zeros_like(p)).mul_(b2).add_(
                    (ipt - avg).abs(), alpha=1 - b2)

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        return self.ema_ipt.get(id(p), torch.zeros_like(p)) * self.ema_unc.get(id(p), torch.zeros_like(p))

    @torch.no_grad()
    def mask_to_budget(self, layers: dict[str, SVDLinear], budget: int) -> dict[str, list[bool]]:
        """λ = 0 for the triplets below the budget; returns the kept pattern per layer."""
        a = self.adapter
        triplet = {path: (self._score(layer.lora_E[a]).view(-1) + self._score(layer.lora_A[a]).mean(dim=1)
                          + self._score(layer.lora_B[a]).mean(dim=0)) for path, layer in layers.items()}
        k = self.init_bgt - budget
        # (PEFT's kthvalue needs k >= 1: with no triplet to drop, nothing is masked)
        threshold = torch.kthvalue(torch.cat(list(triplet.values())).float(), k)[0].item() if k > 0 else float("-inf")
        pattern = {}
        for path, layer in layers.items():
            drop = triplet[path] <= threshold
            layer.lora_E[a].masked_fill_(drop.view(-1, 1), 0.0)
            pattern[f"{path}.lora_E"] = (~drop).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, layers: dict[str, SVDLinear], pattern: dict[str, list[bool]]) -> None:
        for path, layer in layers.items():
            keep = torch.tensor(pattern[f"{path}.lora_E"], device=layer.lora_E[self.adapter].device)
            layer.lora_E[self.adapter].masked_fill_(~keep.view(-1, 1), 0.0)


@register_method(AdaLoraConfig, mergeable=True,
                 description="AdaLoRA: SVD-shaped LoRA whose ranks are allocated while training")
class AdaLoraModel(Tuner):
    supported_types = LINEAR_TYPES

    def default_targets(self, config: AdaLoraConfig):
        return default_lora_targets(self.model)

    def _kw(self, config: AdaLoraConfig, path: str) -> dict:
        r, alpha = config.for_module(path)
        return dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                    init_lora_weights=config.init_lora_weights, init_r=config.init_r)

    def create_layer(self, base: nn.Module, config: AdaLoraConfig, adapter: str, path: str) -> SVDLinear:
        return SVDLinear(base, adapter, **self._kw(config, path))

    def update_layer(self, layer: AdapterLayer, config: AdaLoraConfig, adapter: str, path: str) -> None:
        if not isinstance(layer, SVDLinear):
            raise ValueError(f"'{path}' already holds another method's adapter; AdaLoRA needs its own layers")
        layer.update_layer(adapter, **self._kw(config, path))

    def check_new_adapter(self, config: AdaLoraConfig, adapter: str) -> None:
        super().check_new_adapter(config, adapter)
        if not config.inference_mode and any(not c.inference_mode for c in self.peft_config.values()):
            raise ValueError("AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set "
                             "inference_mode to True for all adapters except the one you want to train.")

    def inject_adapter(self, config: AdaLoraConfig, adapter: str) -> None:
        super().inject_adapter(config, adapter)
        if not config.inference_mode:
            self.trainable_adapter_name = adapter
            self.rankallocator = RankAllocator(config, self._svd_layers(adapter), adapter)

    def _svd_layers(self, adapter: str) -> dict[str, SVDLinear]:
        return {path: m for path, m in adapter_layers(self.model) if isinstance(m, SVDLinear) and adapter in m.r}

    # ---- training ----------------------------------------------------------------------------
    def orth_regularizer(self, adapter: str) -> torch.Tensor:
        """mean over P and Q of ‖PᵀP − I‖_F / ‖QQᵀ − I‖_F (grouped by shape: one batched product per group)."""
        mats = []
        for layer in self._svd_layers(adapter).values():
            mats += [layer.lora_A[adapter], layer.lora_B[adapter].t()]  # both (r, n): rows should be orthonormal
        groups: dict[tuple, list[torch.Tensor]] = {}
        for m in mats:
            groups.setdefault(tuple(m.shape), []).append(m)
        total = 0.0
        for shape, ms in groups.items():
            s = torch.stack(ms)  # (g, r, n)
            eye = torch.eye(shape[0], dtype=s.dtype, device=s.device)
            total = total + torch.linalg.matrix_norm(s @ s.transpose(1, 2) - eye).sum()
        return total / max(len(mats), 1)

    def extra_loss(self) -> torch.Tensor | float:
        """orth_reg_weight × the regulariser of the trainable adapter (0 when there is none)."""
        name = getattr(self, "trainable_adapter_name", None)
        if name is None or name not in self.peft_config or self.peft_config[name].orth_reg_weight == 0:
            return 0.0
        return self.peft_config[name].orth_reg_weight * self.orth_regularizer(name)

    def forward(self, *args, **kwargs):
        """The model's output, its loss plus the regulariser while gradients are on (PEFT adds it to
        every loss, also in evaluation; here an eval loss stays the task's loss)."""
        out = self.model(*args, **kwargs)
        loss = getattr(out, "loss", None)
        if isinstance(loss, torch.Tensor) and torch.is_grad_enabled():
            out.loss = loss + self.extra_loss()
        return out

    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's call after each optimizer step (before zero_grad): update the scores, mask to the
        budget, fix the mask at total_step − tfinal and keep it after."""
        name = getattr(self, "trainable_adapter_name", None)
        if name is None:
            return
        cfg, layers, alloc = self.peft_config[name], self._svd_layers(name), self.rankallocator
        final = cfg.total_step - cfg.tfinal
        if global_step < final:
            alloc.update_ipt(layers)
            budget, mask = alloc.budget_schedule(global_step)
            if mask:
                cfg.rank_pattern = alloc.mask_to_budget(layers, budget)
        elif global_step == final:  # (PEFT: no score update at this step; the budget is target_r per layer)
            cfg.rank_pattern = alloc.mask_to_budget(layers, alloc.budget_schedule(global_step)[0])
            alloc.reset_ipt()
        elif cfg.rank_pattern:
            alloc.mask_using_rank_pattern(layers, cfg.rank_pattern)

    on_optimizer_step = update_and_allocate  # the job's trainer calls this after each step

    def final_ranks(self, adapter: str | None = None) -> dict[str, int]:
        """Kept rank per layer path (after allocation), for the run's report."""
        name = adapter or getattr(self, "trainable_adapter_name", None) or next(iter(self.peft_config))
        pattern = self.peft_config[name].rank_pattern or {}
        return {path: int(sum(pattern[f"{path}.lora_E"])) if f"{path}.lora_E" in pattern else layer.r[name]
                for path, layer in self._svd_layers(name).items()}

    def method_report(self) -> dict:
        """The run report's section: the rank each layer kept (of init_r), and the total."""
        name = getattr(self, "trainable_adapter_name", None) or next(iter(self.peft_config))
        ranks, cfg = self.final_ranks(name), self.peft_config[name]
        lines = [f"budget: {sum(ranks.values())} of {cfg.init_r * len(ranks)} triplets (target_r {cfg.target_r} x "
                 f"{len(ranks)} layers); schedule tinit {cfg.tinit}, tfinal {cfg.tfinal}, deltaT {cfg.deltaT}, "
                 f"total_step {cfg.total_step}"]
        lines += [f"`{path}`: rank {r}" for path, r in ranks.items()]
        return {"title": "AdaLoRA: final ranks", "lines": lines, "ranks": ranks}

    # ---- files -------------------------------------------------------------------------------
    def adapter_key_map(self, adapter: str, root: nn.Module) -> dict[str, torch.Tensor]:
        """PEFT's layout: with a rank pattern, only the kept triplets are in the file (copies; a layer
        already built at the kept rank, as after loading, maps its live tensors)."""
        from ..checkpoint import adapter_key_map

        out = adapter_key_map(root, adapter)
        pattern = self.peft_config[adapter].rank_pattern or {}
        if not pattern:
            return out
        prefix = {id(m): p for p, m in root.named_modules()}
        for path, layer in self._svd_layers(adapter).items():
            kept = pattern.get(f"{path}.lora_E")
            if kept is None or len(kept) != layer.r[adapter] or all(kept):
                continue
            idx = torch.tensor(kept, device=layer.lora_E[adapter].device)
            key = prefix[id(layer)]
            out[f"{key}.lora_A"] = layer.lora_A[adapter].detach()[idx]
            out[f"{key}.lora_E"] = layer.lora_E[adapter].detach()[idx]
            out[f"{key}.lora_B"] = layer.lora_B[adapter].detach()[:, idx]
        return out
