"""OFT (Qiu et al. 2023; PEFT's OFT v2): rotate the input of each adapted linear by a trained
block-diagonal orthogonal matrix, which keeps the angles between the weight's neurons (the
"hyperspherical energy") that plain additive updates disturb.

    y = base(x · R),   R = diag(R_1, ..., R_n),  R_i = cayley(Q_i): (b, b),  n·b = in_features
    Q_i skew-symmetric from b(b-1)/2 trained numbers (`oft_R.weight`: (n, b(b-1)/2), zeros = identity)
    cayley(Q) = (I - Q)(I + Q)⁻¹, or its Neumann series I + 2Q + 2Q² + ... + Q^(k-1) (default, k = 5)

The rotation is applied to x block by block (one batched matmul, T·in·b flops, no dense R), so a
step costs little more than the frozen layer. Merging multiplies it into the weight, W ← W·Rᵀ;
unmerging multiplies by the inverse (the Neumann series is only nearly orthogonal).
Config (`OFTConfig`: r or oft_block_size, block_share, coft, eps, use_cayley_neumann, ...),
tensor names and the r/block-size adjustment are HF PEFT's, so adapters move both ways.
Linear and Conv2d layers (the conv's rotation acts on the flattened kernel, applied to the weight:
`OFTConv2d`); PEFT also adapts Embedding.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, ConfigError, listify
from ..families import default_lora_targets
from ..inject import AdapterLayer
from ..peft_types import PeftType
from ..registry import register_method
from ..tuner import Tuner
from ._lycoris import whole_numbers


@dataclass
class OFTConfig(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.OFT
    method: ClassVar[str] = "oft"

    r: int = 0  # number of blocks per layer; give r or oft_block_size, not both (r · block = in_features)
    oft_block_size: int = 32  # size b of each rotation block: b(b-1)/2 trained numbers per block
    module_dropout: float = 0.0  # training only: this fraction of the blocks is the identity for a call
    target_modules: Any = None  # names / regex / "all-linear"; None = PEFT's family default (LoRA's)
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: Any = None
    init_weights: bool = True  # True: R = I (the model starts as the base); False: random (tests only)
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None
    coft: bool = False  # constrained OFT: each block's Q is kept within a ball of radius eps (in place)
    eps: float = 6e-5
    block_share: bool = False  # one rotation for all blocks of a layer
    use_cayley_neumann: bool = True  # the Neumann series instead of a matrix inverse per step
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        for k in ("target_modules", "exclude_modules"):
            v = getattr(self, k)
            setattr(self, k, sorted(v) if isinstance(v, set) else listify(v))
        self.modules_to_save = listify(self.modules_to_save)
        whole_numbers(self, "r", "oft_block_size", "num_cayley_neumann_terms")
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ConfigError(f"r={self.r}, oft_block_size={self.oft_block_size}: give exactly one of them (the other "
                              "follows, r · oft_block_size = in_features): r=0 with a block size, or oft_block_size=0 with r")
        if self.r < 0 or self.oft_block_size < 0:
            raise ConfigError("r and oft_block_size must not be negative")
        if not 0 <= self.module_dropout < 1:
            raise ConfigError(f"module_dropout={self.module_dropout}: must be in [0, 1)")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: OFT with trained biases is not supported in slimtune; use "
                              "bias='none' (or add the biases with modules_to_save)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only applies together with layers_to_transform")

    def to_dict(self) -> dict[str, Any]:
        """PEFT's fields plus `peft_version`: PEFT warns on loading an OFT file older than 0.18.0 (its
        Cayley-Neumann series changed then); this file follows the 0.18.0 series, so it says so."""
        return {**super().to_dict(), "peft_version": "0.18.0"}


def adjust(dim: int, value: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of `dim` nearest `value` (ties to the lower)."""
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher:
        higher += 1
    lower = value
    while lower > 1 and dim % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


class Rotation(nn.Module):
    """One adapter's blocks on one layer: `weight` (n or 1, b(b-1)/2) holds the upper triangles of
    the skew-symmetric Q_i (PEFT's OFTRotationModule, same key `oft_R.weight`)."""

    def __init__(self, n_blocks: int, block: int, config: OFTConfig) -> None:
        super().__init__()
        self.n_blocks, self.block = n_blocks, block
        self.block_share, self.coft, self.eps = config.block_share, config.coft, config.eps
        k = config.num_cayley_neumann_terms
        self.neumann = (4 if k == 3 else k) if config.use_cayley_neumann else None  # PEFT: 3 terms compute as 4
        self.weight = nn.Parameter(torch.zeros(1 if config.block_share else n_blocks, block * (block - 1) // 2))
        rows, cols = torch.triu_indices(block, block, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def _skew(self, vec: torch.Tensor) -> torch.Tensor:
        q = vec.new_zeros(vec.shape[0], self.block, self.block)
        q[:, self.rows, self.cols] = vec
        return q - q.transpose(-2, -1)

    @torch.no_grad()
    def _constrain(self) -> None:
        """COFT: scale each block's Q back onto the ball ‖Q‖_F ≤ eps/√(blocks) when it leaves it."""
        q = self._skew(self.weight)
        eps = self.eps / float(q.shape[0]) ** 0.5
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        q = torch.where(norm <= eps, q, eps * q / norm)
        self.weight.copy_(q[:, self.rows, self.cols])

    def blocks(self) -> torch.Tensor:
        """The rotations R_i, (n, b, b) (one repeated n times with block_share)."""
        if self.coft:
            self._constrain()
        q = self._skew(self.weight)
        eye = torch.eye(self.block, device=q.device, dtype=q.dtype).expand_as(q)
        if self.neumann is None:
            r = torch.linalg.solve(eye + q, eye - q, left=False)
        else:  # PEFT's series: I + 2Q + 2Q² + ... + 2Q^(k-2) + Q^(k-1) (k = 1: I, 2: I + 2Q)
            r, power = eye.clone(), eye
            for i in range(1, self.neumann):
                power = q if i == 1 else power @ q
                r = r + (power if i == self.neumann - 1 and i > 1 else 2 * power)
        return r.expand(self.n_blocks, -1, -1) if self.block_share else r

    def rotate(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """x (..., n·b) → x·diag(R_i): one einsum over the blocks (PEFT's form; torch runs it as one
        batched matmul). A CPU microbenchmark on the shared VM put it at 1.4-1.5× the base GEMM's time
        against 2.0× for an explicit transpose-bmm-transpose (512-2048 tokens, 576 features; noisy)."""
        xb = x.reshape(*x.shape[:-1], self.n_blocks, self.block)
        return torch.einsum("...nb,nbc->...nc", xb, r).reshape(x.shape)

    def dense(self) -> torch.Tensor:
        """diag(R_1, ..., R_n) as an (in, in) matrix, for merging."""
        return torch.block_diag(*self.blocks().float())


class OFTLinear(AdapterLayer):
    adapter_layer_names = ("oft_R",)
    other_param_names = ("r", "oft_block_size", "module_dropout")

    def __init__(self, base_layer: nn.Module, adapter: str, config: OFTConfig) -> None:
        super().__init__(base_layer)
        self.out_features, self.in_features = base_layer.weight.shape
        self.oft_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.module_dropout: dict[str, float] = {}
        self.update_layer(adapter, config)

    def update_layer(self, adapter: str, config: OFTConfig) -> None:
        n, b, dim = config.r, config.oft_block_size, self.in_features
        if n == 0:
            if dim % b or b > dim:
                b, old = adjust(dim, b), b
                warnings.warn(f"oft_block_size={old} does not divide in_features={dim}; adjusted to {b} (PEFT's rule)",
                              stacklevel=5)
            n = dim // b
        else:
            if dim % n or n > dim:
                n, old = adjust(dim, n), n
                warnings.warn(f"r={old} does not divide in_features={dim}; adjusted to {n} (PEFT's rule)", stacklevel=5)
            b = dim // n
        rot = Rotation(n, b, config)
        if not config.init_weights:
            nn.init.normal_(rot.weight, mean=0.0, std=0.1)
        dtype, device = self._adapter_dtype_device()
        self.oft_R[adapter] = rot.to(device=device, dtype=dtype)
        self.r[adapter], self.oft_block_size[adapter], self.module_dropout[adapter] = n, b, config.module_dropout
        if not self.active_adapters:
            self.active_adapters = [adapter]

    def _blocks(self, name: str) -> torch.Tensor:
        r = self.oft_R[name].blocks()
        p = self.module_dropout[name]
        if self.training and p > 0 and r.shape[0] > 1:  # PEFT's multiplicative dropout: int(p·n) blocks → I
            n = r.shape[0]
            drop = torch.zeros(n, device=r.device, dtype=r.dtype)
            drop[torch.randperm(n, device=r.device)[: int(p * n)]] = 1
            eye = torch.eye(r.shape[-1], device=r.device, dtype=r.dtype)
            r = torch.lerp(r, eye.expand_as(r), drop.view(n, 1, 1))
        return r

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError("mixed-adapter batches are not supported for OFT (nor in PEFT); run one adapter per batch")
        if not (self.disable_adapters or self.merged):
            active = [n for n in self.active_adapters if n in self.oft_R]
            if active and not torch.is_grad_enabled() and x.numel() // self.in_features > self.out_features:
                return self._folded(x, active)
            dtype = x.dtype
            for name in self.active_adapters:
                if name in self.oft_R:
                    rot = self.oft_R[name]
                    x = rot.rotate(x.to(rot.weight.dtype), self._blocks(name))
            x = x.to(dtype)
        return self.base_layer(x, *args, **kwargs)

    def _folded(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """No-grad calls with more tokens than output features: rotate the weight instead of the input,
        W' = W·diag(R_i)ᵀ (out·in·b flops instead of tokens·in·b, and no pass over the activations);
        the same value up to rounding. Training keeps the input rotation (its backward is cheaper)."""
        base = self.get_base_layer()
        w = base.weight
        for name in active:
            rot = self.oft_R[name]
            r = self._blocks(name).to(w.dtype)
            w = torch.einsum("onb,ncb->onc", w.reshape(w.shape[0], rot.n_blocks, rot.block), r).reshape(w.shape)
        return F.linear(x, w.to(x.dtype), base.bias)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The block-diagonal rotation (in, in) in fp32 (PEFT's name; OFT multiplies, it does not add)."""
        return self.oft_R[adapter].dense()

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        w = self.get_base_layer().weight
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name in self.merged_adapters or name not in self.oft_R:
                continue
            new = w.data.float().reshape(w.shape[0], -1) @ self.get_delta_weight(name).t()  # W' = W·Rᵀ: base(x·R) = base'(x)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"merging OFT adapter '{name}' gives NaN/Inf; the adapter is broken; nothing was merged")
            w.data.copy_(new.view(w.shape).to(w.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        w = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            inv_t = torch.linalg.inv(self.get_delta_weight(name)).t()
            w.data.copy_((w.data.float().reshape(w.shape[0], -1) @ inv_t).view(w.shape).to(w.dtype))


class OFTConv2d(OFTLinear):
    """OFT on nn.Conv2d: the rotation acts on the flattened kernel (in · k · k, PEFT's `oft_R` shape),
    applied to the weight, W' = W·Rᵀ, and the base's own convolution runs with W'. This is exactly
    PEFT's merge of the same file, so unmerged, merged and PEFT-merged outputs agree (PEFT's unmerged
    conv forward folds overlapping patches back by summing, which is not that: docs/peft_compat.md)."""

    def __init__(self, base_layer: nn.Conv2d, adapter: str, config: OFTConfig) -> None:
        k = base_layer.kernel_size
        if base_layer.groups != 1 or k[0] != k[1] or max(base_layer.dilation) > 1:
            raise ValueError(f"OFT on Conv2d needs groups=1, a square kernel and no dilation (PEFT's limits); this "
                             f"layer has groups={base_layer.groups}, kernel {tuple(k)}, dilation {base_layer.dilation}: "
                             "leave it out of target_modules")
        AdapterLayer.__init__(self, base_layer)
        self.out_features, self.in_features = base_layer.weight.shape[0], base_layer.weight[0].numel()
        self.oft_R = nn.ModuleDict()
        self.r, self.oft_block_size, self.module_dropout = {}, {}, {}
        self.update_layer(adapter, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError("mixed-adapter batches are not supported for OFT (nor in PEFT); run one adapter per batch")
        active = [] if (self.disable_adapters or self.merged) else [n for n in self.active_adapters if n in self.oft_R]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        w = base.weight.reshape(self.out_features, -1)
        for name in active:
            rot = self.oft_R[name]
            r = self._blocks(name).to(w.dtype)  # (n, b, b)
            w = torch.einsum("onb,ncb->onc", w.reshape(self.out_features, rot.n_blocks, rot.block), r).reshape_as(w)
        return base._conv_forward(x, w.view(base.weight.shape).to(x.dtype), base.bias)


@register_method(OFTConfig, mergeable=True, description="OFT: trained block-diagonal rotation of each layer's input")
class OFTModel(Tuner):
    supported_types = (nn.Linear, nn.Conv2d)

    def default_targets(self, config: OFTConfig):
        return default_lora_targets(self.model)

    def create_layer(self, base: nn.Module, config: OFTConfig, adapter: str, path: str) -> AdapterLayer:
        return OFTConv2d(base, adapter, config) if isinstance(base, nn.Conv2d) else OFTLinear(base, adapter, config)

    def update_layer(self, layer: AdapterLayer, config: OFTConfig, adapter: str, path: str) -> None:
        if not isinstance(layer, OFTLinear):
            raise ValueError(f"'{path}' already holds a {type(layer).__name__}; an OFT adapter cannot be added to it")
        layer.update_layer(adapter, config)

    @contextmanager
    def mixed_batch(self, adapter_names: list[str]):
        raise ValueError("mixed-adapter batches are not supported for oft (PEFT has them for LoRA only); "
                         "run one adapter per batch")
        yield  # pragma: no cover
