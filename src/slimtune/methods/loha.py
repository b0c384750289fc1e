"""LoHa (Hyeon-Woo et al. 2022, FedPara): the weight delta is the Hadamard product of two low-rank
products, so rank r per factor reaches rank up to r² in ΔW for the parameters of a rank-2r LoRA.

    ΔW = (alpha/r) · (W1a · W1b) ⊙ (W2a · W2b)          W1a, W2a: (out, r)   W1b, W2b: (r, in)

Conv layers use the flattened kernel (in · k) as `in`, or with `use_effective_conv2d` a CP core per
factor: ΔW = (alpha/r) · (t1 ×₁ W1a ×₂ W1b) ⊙ (t2 ×₁ W2a ×₂ W2b), t: (r, r, k1, k2).

Config (`LoHaConfig`), tensor names (`hada_w1_a`, ..., `hada_t1`) and init are HF PEFT's, so
adapters move between the two libraries. Init: W2b = 0, so ΔW = 0 and the model starts as the base.
Mergeable (ΔW added into the weight); the forward and the rest are in `_lycoris.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..peft_types import PeftType
from ..registry import register_method
from ._lycoris import DeltaLayer, LycorisConfig, LycorisTuner


@dataclass
class LoHaConfig(LycorisConfig):
    peft_type: ClassVar[PeftType] = PeftType.LOHA
    method: ClassVar[str] = "loha"


class LoHaLayer(DeltaLayer):
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def _create(self, adapter: str, r: int, config: LycorisConfig) -> None:
        w = self.get_base_layer().weight  # (out, in/groups, *kernel)
        out, in_ = w.shape[0], w.shape[1]
        if self._effective_conv(config):
            kernel = tuple(w.shape[2:]) + ((1,) if w.dim() == 3 else ())  # Conv1d: (k, 1), as PEFT
            for i in ("1", "2"):
                getattr(self, f"hada_t{i}")[adapter] = nn.Parameter(torch.empty(r, r, *kernel))
                getattr(self, f"hada_w{i}_a")[adapter] = nn.Parameter(torch.empty(r, out))
                getattr(self, f"hada_w{i}_b")[adapter] = nn.Parameter(torch.empty(r, in_))
            return
        flat_in = w[0].numel()  # in (Linear) or in/groups · prod(kernel) (conv)
        for i in ("1", "2"):
            getattr(self, f"hada_w{i}_a")[adapter] = nn.Parameter(torch.empty(out, r))
            getattr(self, f"hada_w{i}_b")[adapter] = nn.Parameter(torch.empty(r, flat_in))

    def _reset(self, adapter: str, init) -> None:
        """PEFT's: Kaiming-uniform everywhere, W2b zero unless init_weights=False (random, tests)."""
        for attr in self.adapter_layer_names:
            if adapter in getattr(self, attr):
                nn.init.kaiming_uniform_(getattr(self, attr)[adapter], a=math.sqrt(5))
        if init:
            nn.init.zeros_(self.hada_w2_b[adapter])

    def _delta(self, adapter: str) -> torch.Tensor:
        if adapter in self.hada_t1:  # CP form: (out, in, k1, k2) per factor
            rebuild = [torch.einsum("ijkl,jr,ip->prkl", getattr(self, f"hada_t{i}")[adapter],
                                    getattr(self, f"hada_w{i}_b")[adapter], getattr(self, f"hada_w{i}_a")[adapter])
                       for i in ("1", "2")]
            return rebuild[0] * rebuild[1]
        return (self.hada_w1_a[adapter] @ self.hada_w1_b[adapter]) * (self.hada_w2_a[adapter] @ self.hada_w2_b[adapter])


@register_method(LoHaConfig, mergeable=True, description="LoHa: Hadamard product of two low-rank products as ΔW")
class LoHaModel(LycorisTuner):
    layer_cls = LoHaLayer
