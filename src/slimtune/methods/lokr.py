"""LoKr (Edalati et al. 2022; LyCORIS): the weight delta is a Kronecker product of a small matrix and
a (low-rank) larger one, so a few thousand parameters cover a full out×in delta.

    out = a·b, in = c·d (a ≤ b, c ≤ d: `factorization`, near √dim, or `decompose_factor`)
    ΔW = (alpha/r) · W1 ⊗ W2          W1: (a, c), or W1a·W1b with decompose_both and a small r
                                       W2: (b, d), or W2a·W2b (rank r) when r < max(b, d)/2

Conv layers add the kernel to W2 ((b, d, k1, k2), or a CP core t2 with `use_effective_conv2d`).
Config (`LoKrConfig`), tensor names (`lokr_w1`, `lokr_w1_a`, ..., `lokr_t2`), the factorisation and
init are HF PEFT's, so adapters move between the two libraries. Init: W1 (or W1a) = 0, so ΔW = 0;
"lycoris" zeroes W2 (or W2b) instead. Mergeable; the forward and the rest are in `_lycoris.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..config import ConfigError
from ..peft_types import PeftType
from ..registry import register_method
from ._lycoris import DeltaLayer, LycorisConfig, LycorisTuner, whole_numbers


@dataclass
class LoKrConfig(LycorisConfig):
    peft_type: ClassVar[PeftType] = PeftType.LOKR
    method: ClassVar[str] = "lokr"

    decompose_both: bool = False  # also factor W1 as W1a·W1b (rank r) when r < max(a, c)/2
    decompose_factor: int = -1  # split each dimension as (factor, dim/factor); -1: the pair nearest √dim
    rank_dropout_scale: bool = False  # rescale the rows kept by rank_dropout by 1/mean

    def __post_init__(self) -> None:
        super().__post_init__()
        whole_numbers(self, "decompose_factor")
        if self.init_weights not in (True, False, "lycoris"):
            raise ConfigError(f"init_weights={self.init_weights!r}: use True (W1 = 0), 'lycoris' (W2 = 0) or "
                              "False (random, tests only)")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m ≤ n, m·n = dimension: PEFT's (and LyCORIS's) split, which fixes the tensor shapes on disk.
    A positive `factor` dividing the dimension gives (factor, dim/factor); otherwise m grows through
    the divisors while m + n shrinks and m stays ≤ factor (no limit for -1), i.e. the pair nearest √dim."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    divisors = [k for k in range(2, dimension + 1) if dimension % k == 0]
    for k in divisors:
        if k >= n or k + dimension // k > m + n or k > limit:
            break
        m, n = k, dimension // k
    return (m, n) if m <= n else (n, m)


class LoKrLayer(DeltaLayer):
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    other_param_names = DeltaLayer.other_param_names + ("rank_dropout_scale",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.rank_dropout_scale: dict[str, bool] = {}

    def _create(self, adapter: str, r: int, config: LoKrConfig) -> None:
        w = self.get_base_layer().weight  # (out, in/groups, *kernel)
        kernel = tuple(w.shape[2:])
        a, b = factorization(w.shape[0], config.decompose_factor)
        c, d = factorization(w.shape[1], config.decompose_factor)
        self.rank_dropout_scale[adapter] = config.rank_dropout_scale
        p = lambda *shape: nn.Parameter(torch.empty(*shape))  # noqa: E731
        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a[adapter], self.lokr_w1_b[adapter] = p(a, r), p(r, c)
        else:
            self.lokr_w1[adapter] = p(a, c)
        if r >= max(b, d) / 2:
            self.lokr_w2[adapter] = p(b, d, *kernel)
        elif self._effective_conv(config):
            k = kernel + ((1,) if len(kernel) == 1 else ())  # Conv1d: (k, 1), as PEFT
            self.lokr_t2[adapter], self.lokr_w2_a[adapter], self.lokr_w2_b[adapter] = p(r, r, *k), p(r, b), p(r, d)
        else:
            self.lokr_w2_a[adapter], self.lokr_w2_b[adapter] = p(b, r), p(r, d * math.prod(kernel))

    def _reset(self, adapter: str, init) -> None:
        """PEFT's: Kaiming-uniform everywhere, then True zeroes W1 (or W1a), "lycoris" W2 (or W2b)."""
        for attr in self.adapter_layer_names:
            if adapter in getattr(self, attr):
                nn.init.kaiming_uniform_(getattr(self, attr)[adapter], a=math.sqrt(5))
        if init == "lycoris":
            nn.init.zeros_((self.lokr_w2 if adapter in self.lokr_w2 else self.lokr_w2_b)[adapter])
        elif init:
            nn.init.zeros_((self.lokr_w1 if adapter in self.lokr_w1 else self.lokr_w1_a)[adapter])

    def _delta(self, adapter: str) -> torch.Tensor:
        w1 = self.lokr_w1[adapter] if adapter in self.lokr_w1 else self.lokr_w1_a[adapter] @ self.lokr_w1_b[adapter]
        if adapter in self.lokr_w2:
            w2 = self.lokr_w2[adapter]
        elif adapter in self.lokr_t2:
            w2 = torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2[adapter], self.lokr_w2_a[adapter], self.lokr_w2_b[adapter])
        else:
            w2 = self.lokr_w2_a[adapter] @ self.lokr_w2_b[adapter]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous())  # PEFT's layout, reshaped to the weight by the caller

    def _delta_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """On a Linear, (W1 ⊗ W2)·x without ΔW: each token's x viewed as X (c, d) gives W1·X·W2ᵀ (a, b),
        i.e. the (a·b) outputs in PEFT's order, for N·(c·d·b + a·c·b) flops instead of building the
        out×in ΔW and a full-size GEMM (about 8% of the base layer's flops at SmolLM2's 576×576)."""
        if adapter in self.lokr_t2 or not isinstance(self.get_base_layer(), nn.Linear):
            return None
        dt = x.dtype
        w1 = self.lokr_w1[adapter] if adapter in self.lokr_w1 else self.lokr_w1_a[adapter] @ self.lokr_w1_b[adapter]
        w1 = (w1 * self.scaling[adapter]).to(dt)
        a, c = w1.shape
        z = x.reshape(-1, c, x.shape[-1] // c)  # (N, c, d)
        if adapter in self.lokr_w2:
            z = z @ self.lokr_w2[adapter].to(dt).t()  # (N, c, b)
        else:
            z = (z @ self.lokr_w2_b[adapter].to(dt).t()) @ self.lokr_w2_a[adapter].to(dt).t()
        return torch.matmul(w1, z).reshape(*x.shape[:-1], a * z.shape[-1])  # (N, a, b) → (..., out)

    def _rank_keep_scale(self, adapter: str, keep: torch.Tensor) -> torch.Tensor:
        return keep / keep.mean().clamp_min(1e-12) if self.rank_dropout_scale[adapter] else keep


@register_method(LoKrConfig, mergeable=True, description="LoKr: Kronecker product of a small and a low-rank factor as ΔW")
class LoKrModel(LycorisTuner):
    layer_cls = LoKrLayer
