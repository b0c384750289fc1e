"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020, He et al. 2021).

A small down-project / non-linearity / up-project MLP placed on a module's output:

    sequential (Houlsby, Pfeiffer):  y = base(x) + s·up(act(down(LN?(base(x)))))
    parallel   (He et al.):           y = base(x) + s·up(act(down(LN?(x))))     # beside the block

    Houlsby:  after the attention output projection AND after the feed-forward block
    Pfeiffer: after the feed-forward block only
    parallel: beside the feed-forward block (its input -> added to its output), scaled

The up-projection starts at zero, so a fresh adapter is the identity: training starts from the
base model's outputs. Where the adapters go is a small per-family table (`PLACEMENT`); any other
model takes `target_modules=[...]` naming the modules whose output to adapt.

Not mergeable: the non-linearity makes the adapter a function of the activations, not a weight
delta. Files are slimtune-only (PEFT has no bottleneck adapters) but in PEFT's layout:
adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<path>.bottleneck.adapter_down.weight` (AdapterHub's sub-module names).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..config import AdapterConfig, ConfigError, listify
from ..peft_types import PeftType
from ..families import model_type
from ..inject import AdapterLayer
from ..registry import register_method
from ..targeting import TargetError
from ..tuner import NotMergeableError, Tuner  # noqa: F401  (NotMergeableError re-exported)

# AdapterHub's names for the same architectures.
ADAPTER_TYPES = {"houlsby": "houlsby", "double_seq_bn": "houlsby", "pfeiffer": "pfeiffer", "seq_bn": "pfeiffer",
                 "parallel": "parallel", "par_bn": "parallel"}

# model_type -> (attention output, FFN output for sequential adapters, FFN block for the parallel
# adapter, index of the block's argument that is the FFN input). Regexes end a module path.
_DECODER = (r"layers\.\d+\.self_attn\.o_proj", r"layers\.\d+\.mlp", r"layers\.\d+\.mlp", 0)
_BERT = (r"layer\.\d+\.attention\.output\.dense", r"layer\.\d+\.output\.dense",
         r"layer\.\d+\.output", 1)  # BertOutput(hidden_states, input_tensor): input_tensor is the FFN input
PLACEMENT: dict[str, tuple[str, str, str, int]] = {
    **{t: _DECODER for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "granite")},
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "distilbert": (r"layer\.\d+\.attention\.out_lin", r"layer\.\d+\.ffn", r"layer\.\d+\.ffn", 0),
    "gpt2": (r"h\.\d+\.attn\.c_proj", r"h\.\d+\.mlp", r"h\.\d+\.mlp", 0),
    **{t: (r"layer\.0\.SelfAttention\.o", r"DenseReluDense", r"DenseReluDense", 0) for t in ("t5", "mt5")},
}




@dataclass
class BottleneckConfig(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.BOTTLENECK  # slimtune-only: PEFT has no bottleneck adapters
    method: ClassVar[str] = "bottleneck"

    adapter_type: str = "pfeiffer"  # "houlsby" | "pfeiffer" | "parallel" (or AdapterHub's double_seq_bn/seq_bn/par_bn)
    reduction_factor: float = 16  # bottleneck size = hidden / reduction_factor (AdapterHub's default 16)
    bottleneck_size: int | None = None  # set to fix the size directly (overrides reduction_factor)
    non_linearity: str = "relu"  # any transformers ACT2FN name: relu, gelu, silu, tanh, ...
    scaling: float | None = None  # s: None = 1 for sequential, 4 for parallel (He et al. 2021)
    ln_before: bool = False  # LayerNorm on the adapter input (a trained LN per adapter)
    adapter_dropout: float = 0.0
    init_weights: bool = True  # True: up-projection zero (identity at start); False: random (tests)
    target_modules: Any = None  # None = the family placement table; else module names / regex
    exclude_modules: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None

    def __post_init__(self) -> None:
        key = str(self.adapter_type).lower()
        if key not in ADAPTER_TYPES:
            raise ConfigError(f"adapter_type={self.adapter_type!r}: use 'houlsby', 'pfeiffer' or 'parallel'")
        self.adapter_type = ADAPTER_TYPES[key]
        self.target_modules = listify(self.target_modules)
        self.exclude_modules = listify(self.exclude_modules)
        self.modules_to_save = listify(self.modules_to_save)
        if self.bottleneck_size is not None and (not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0):
            raise ConfigError(f"bottleneck_size={self.bottleneck_size!r}: must be a positive integer")
        if not self.reduction_factor or self.reduction_factor <= 0:
            raise ConfigError(f"reduction_factor={self.reduction_factor!r}: must be > 0")
        if not 0 <= self.adapter_dropout < 1:
            raise ConfigError(f"adapter_dropout={self.adapter_dropout}: must be in [0, 1)")
        from transformers.activations import ACT2FN
        if self.non_linearity not in ACT2FN:
            raise ConfigError(f"non_linearity={self.non_linearity!r}: use one of {', '.join(sorted(ACT2FN))}")

    @property
    def parallel(self) -> bool:
        return self.adapter_type == "parallel"

    @property
    def scale(self) -> float:
        return float(self.scaling) if self.scaling is not None else (4.0 if self.parallel else 1.0)

    def size_for(self, dim: int) -> int:
        return self.bottleneck_size or max(1, int(dim // self.reduction_factor))


class Bottleneck(nn.Module):
    """LN? -> down (dim->size) -> act -> dropout -> up (size->dim) -> ·s. (B, T, dim) -> (B, T, dim)"""

    def __init__(self, dim: int, size: int, non_linearity: str, ln_before: bool, dropout: float, scaling: float,
                 init_weights: bool) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.adapter_norm = nn.LayerNorm(dim) if ln_before else nn.Identity()
        self.adapter_down = nn.Linear(dim, size)
        self.act = ACT2FN[non_linearity]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_up = nn.Linear(size, dim)
        self.scaling = scaling
        if init_weights:  # identity at start: only the up-projection is zero, so gradients still flow
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
            nn.init.normal_(self.adapter_down.weight, std=1e-2)
            nn.init.zeros_(self.adapter_down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.adapter_down.weight.dtype)
        return self.adapter_up(self.dropout(self.act(self.adapter_down(self.adapter_norm(x))))) * self.scaling


class BottleneckLayer(AdapterLayer):
    """Wraps a module; adds each active adapter to its output (first element if it returns a tuple)."""

    adapter_layer_names = ("bottleneck",)
    other_param_names = ("parallel", "input_arg")

    def __init__(self, base_layer: nn.Module, adapter: str, **kw: Any) -> None:
        super().__init__(base_layer)
        self.bottleneck = nn.ModuleDict()
        self.parallel: dict[str, bool] = {}
        self.input_arg: dict[str, int] = {}
        try:
            self._arg_names = list(inspect.signature(self.get_base_layer().forward).parameters)
        except (TypeError, ValueError):
            self._arg_names = []
        self.update_layer(adapter, **kw)

    def update_layer(self, adapter: str, *, dim: int, size: int, parallel: bool, input_arg: int, non_linearity: str,
                     ln_before: bool, dropout: float, scaling: float, init_weights: bool) -> None:
        p = next((p for p in self.get_base_layer().parameters() if p.is_floating_point()), None)
        dtype = p.dtype if p is not None else torch.get_default_dtype()
        device = p.device if p is not None else None
        self.bottleneck[adapter] = Bottleneck(dim, size, non_linearity, ln_before, dropout, scaling,
                                              init_weights).to(dtype=dtype, device=device)
        self.parallel[adapter] = parallel
        self.input_arg[adapter] = input_arg
        self.set_adapter(self.active_adapters or [adapter])

    def _block_input(self, adapter: str, args: tuple, kwargs: dict) -> torch.Tensor:
        i = self.input_arg[adapter]
        if len(args) > i:
            return args[i]
        if i < len(self._arg_names) and self._arg_names[i] in kwargs:
            return kwargs[self._arg_names[i]]
        raise TypeError(f"parallel bottleneck adapter: cannot find input #{i} of {type(self.get_base_layer()).__name__}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        active = [a for a in self.active_adapters if a in self.bottleneck]
        if self.disable_adapters or not active:
            return out
        if self._mixed is not None:
            raise NotImplementedError("mixed-adapter batches are not supported for bottleneck adapters")
        h = out[0] if isinstance(out, tuple) else out
        for name in active:
            src = self._block_input(name, args, kwargs) if self.parallel[name] else h
            h = h + self.bottleneck[name](src).to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h


def _hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return None


def _out_dim(module: nn.Module, model: nn.Module) -> int | None:
    if isinstance(module, AdapterLayer):
        module = module.get_base_layer()
    if isinstance(getattr(module, "out_features", None), int):
        return module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight (in, out)
        return module.weight.shape[1]
    hidden = _hidden_size(model)
    if hidden is not None:
        return hidden
    lin = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return lin[-1].out_features if lin else None


def default_placement(model: nn.Module, adapter_type: str) -> tuple[str, dict[str, int]]:
    """(full-match regex of the modules to wrap, {regex of parallel blocks: input arg index})."""
    mt = model_type(model)
    if mt not in PLACEMENT:
        raise TargetError(
            f"bottleneck: no placement known for model type '{mt or type(model).__name__}' (known: "
            f"{', '.join(sorted(PLACEMENT))}); pass target_modules=[...] naming the modules whose output to adapt "
            "(e.g. the feed-forward block of each layer)")
    attn, ffn, block, arg = PLACEMENT[mt]
    parts = {"houlsby": [attn, ffn], "pfeiffer": [ffn], "parallel": [block]}[adapter_type]
    return r"(.*\.)?(?:" + "|".join(parts) + ")", {block: arg}


@register_method(BottleneckConfig, mergeable=False,
                 description="bottleneck MLP adapters after attention/FFN (Houlsby, Pfeiffer) or beside the FFN (parallel)")
class BottleneckModel(Tuner):
    supported_types = (nn.Module,)  # any module whose output is a hidden state

    def inject_adapter(self, config: BottleneckConfig, adapter: str) -> None:
        if config.target_modules is None:
            # The regex is written to adapter_config.json, so a reload selects exactly these modules.
            config.target_modules, _ = default_placement(self.model, config.adapter_type)
        super().inject_adapter(config, adapter)

    def _layer_kwargs(self, base: nn.Module, config: BottleneckConfig, path: str) -> dict:
        dim = _out_dim(base, self.model)
        if dim is None:
            raise TargetError(f"bottleneck: cannot tell the output size of '{path}' ({type(base).__name__}); "
                              "target a Linear layer or a block of a model whose config has hidden_size")
        input_arg = 0
        mt = model_type(self.model)
        if config.parallel and mt in PLACEMENT and re.fullmatch(r"(.*\.)?" + PLACEMENT[mt][2], path):
            input_arg = PLACEMENT[mt][3]
        if config.parallel:
            inner = base.get_base_layer() if isinstance(base, AdapterLayer) else base
            in_dim = getattr(inner, "in_features", None)
            if isinstance(in_dim, int) and in_dim != dim:
                raise TargetError(f"bottleneck: a parallel adapter adds f(input) to the output, but '{path}' maps "
                                  f"{in_dim} -> {dim} features; target a block whose input and output sizes match")
        return dict(dim=dim, size=config.size_for(dim), parallel=config.parallel, input_arg=input_arg,
                    non_linearity=config.non_linearity, ln_before=config.ln_before, dropout=config.adapter_dropout,
                    scaling=config.scale, init_weights=config.init_weights)

    def create_layer(self, base: nn.Module, config: BottleneckConfig, adapter: str, path: str) -> BottleneckLayer:
        return BottleneckLayer(base, adapter, **self._layer_kwargs(base, config, path))

    def update_layer(self, layer: BottleneckLayer, config: BottleneckConfig, adapter: str, path: str) -> None:
        layer.update_layer(adapter, **self._layer_kwargs(layer, config, path))

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise NotMergeableError("bottleneck adapters cannot be merged into the base weights (the adapter is a "
                                "non-linear function of the activations); keep the PeftModel for inference, "
                                "or use unload() to get the base model back without them")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        self.merge_adapter()
        raise AssertionError("unreachable")
