"""Attention-head fine-tuning: only the q/k/v/o weight slices of chosen heads train.

For each chosen head h of a layer (head_dim d), the trained slices are
    q, k, v projections: the d output rows of head h (for k/v under GQA: of h's key/value head);
    output projection:   the d input columns that read head h.
Each slice is a delta beside the frozen weight (rows are index_add-ed into the output, columns
read an index_select of the input), so no gradient is formed for the frozen rest:

    q(x) = W_q x + scatter_rows(ΔQ x)        o(c) = W_o c + ΔO c[cols]

Heads are chosen by index (`heads=[0, 2]` for every layer, or `{layer: [heads]}`), or as the
`top_k` per layer by an importance score measured on a few batches (Michel et al. 2019: the
gradient of the loss w.r.t. a gate on each head's output, |Σ grad·w| over the head's columns of
the output projection):

    scores = head_importance(model, batches)
    model = get_peft_model(model, HeadsConfig(top_k=2, scores=scores))

The chosen heads are written into the config (`heads`), so a saved adapter reloads without the
scores. Only the slices are saved (`<path>.heads_delta`); merging adds them into the weight (exact).
Biases stay frozen. Families: Llama-style (q/k/v/o_proj), BERT-style (query/key/value +
attention.output.dense), GPT-2 (fused c_attn + c_proj), OPT/BART (… out_proj); others via
`attention_modules`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, ConfigError, listify
from ..peft_types import PeftType
from ..families import model_type
from ..inject import AdapterLayer, replace_module
from ..registry import register_method
from ..targeting import LINEAR_TYPES, Conv1D, TargetError, layer_index
from ..tuner import Tuner
from ._select import LossFn, default_loss

_LLAMA = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_BERT = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
         "o": "attention.output.dense"}
_OPT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
ATTENTION_MODULES: dict[str, dict[str, str]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                           "olmo", "olmo2", "granite", "smollm3", "starcoder2", "phi")},
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    **{t: _OPT for t in ("opt", "bart", "mbart", "marian")},
    "gpt2": {"qkv": "attn.c_attn", "o": "attn.c_proj"},
}


@dataclass
class HeadsConfig(AdapterConfig):
    peft_type: ClassVar[PeftType] = PeftType.HEADS  # slimtune's own type
    method: ClassVar[str] = "heads"

    heads: Any = None  # [h, ...] for every layer, or {layer: [h, ...]}; written back resolved
    top_k: int | None = None  # else: the k most important heads per layer (needs `scores`)
    attention_modules: Any = None  # {"q","k","v","o"} or {"qkv","o"} -> module suffix; None = family default
    modules_to_save: Any = None
    scores: Any = field(default=None, repr=False, compare=False)  # {layer: (num_heads,)}; never saved

    def __post_init__(self) -> None:
        self.modules_to_save = listify(self.modules_to_save)
        if isinstance(self.heads, dict):  # JSON object keys are strings
            self.heads = {int(k): sorted({int(h) for h in v}) for k, v in self.heads.items()}
        elif self.heads is not None:
            self.heads = sorted({int(h) for h in listify(self.heads)})
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            raise ConfigError(f"top_k={self.top_k!r}: must be a positive integer")
        if self.heads is None and self.top_k is None:
            raise ConfigError("heads: choose the heads: heads=[0, 3] (every layer), heads={layer: [...]}, "
                              "or top_k=K with scores=head_importance(model, batches)")

    def needs_scores(self) -> bool:
        return self.heads is None and self.top_k is not None and self.scores is None

    def with_scores(self, model: nn.Module, batches: list) -> "HeadsConfig":
        return self.replace(scores=head_importance(model, batches, attention=self.attention_modules))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.pop("scores", None)
        if isinstance(d.get("heads"), dict):
            d["heads"] = {str(k): v for k, v in sorted(d["heads"].items())}
        return d


class _Index(nn.Module):
    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index, persistent=False)


class HeadSliceLinear(AdapterLayer):
    """A Linear/Conv1D with trained deltas on some output rows ("rows") or input columns ("cols")."""

    adapter_layer_names = ("heads_delta",)
    other_param_names = ("heads_index",)

    def __init__(self, base_layer: nn.Module, adapter: str, axis: str, index: torch.Tensor) -> None:
        super().__init__(base_layer)
        self.axis = axis  # "rows": output features; "cols": input features
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        w = base_layer.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape
        self.heads_delta = nn.ParameterDict()
        self.heads_index = nn.ModuleDict()
        self.update_layer(adapter, index)

    def update_layer(self, adapter: str, index: torch.Tensor) -> None:
        dtype, device = self._adapter_dtype_device()
        n = index.numel()
        shape = (n, self.in_features) if self.axis == "rows" else (self.out_features, n)
        self.heads_index[adapter] = _Index(index.to(device=device, dtype=torch.long))
        self.heads_delta[adapter] = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        if not self.active_adapters:
            self.active_adapters = [adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        d, idx = self.heads_delta[adapter], self.heads_index[adapter].index
        full = d.new_zeros(self.out_features, self.in_features)
        full = full.index_copy(0, idx, d) if self.axis == "rows" else full.index_copy(1, idx, d)
        return full.t() if self.fan_in_fan_out else full

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._mixed is not None and not self.disable_adapters and not self.merged:
            raise ValueError("mixed-adapter batches are LoRA-only; run one heads adapter per batch")
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return out
        for name in self.active_adapters:
            if name not in self.heads_delta:
                continue
            d, idx = self.heads_delta[name].to(x.dtype), self.heads_index[name].index
            if self.axis == "rows":
                out = out.index_add(out.dim() - 1, idx, F.linear(x, d))  # (..., n) into the chosen outputs
            else:
                out = out + F.linear(x.index_select(x.dim() - 1, idx), d)  # the chosen inputs only
        return out


def _geometry(model: nn.Module) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) from the model config."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not n or not hidden:
        raise TargetError("heads: the model config gives no num_attention_heads / hidden_size; "
                          "head fine-tuning needs a transformers model")
    kv = getattr(cfg, "num_key_value_heads", None) or n
    hd = getattr(cfg, "head_dim", None) or hidden // n
    return n, kv, hd


def attention_modules(model: nn.Module, config: HeadsConfig | None = None) -> dict[int, dict[str, str]]:
    """{layer: {"q"/"k"/"v"/"o" or "qkv"/"o": module path}} for the model's attention blocks."""
    spec = (config.attention_modules if config is not None else None) or ATTENTION_MODULES.get(model_type(model) or "")
    if not spec:
        raise TargetError(f"heads: no attention layout known for model type '{model_type(model)}' (known: "
                          f"{', '.join(sorted(ATTENTION_MODULES))}); pass attention_modules={{'q': ..., 'k': ..., "
                          "'v': ..., 'o': ...}} (module name suffixes)")
    out: dict[int, dict[str, str]] = {}
    for path, mod in model.named_modules():
        for role, suffix in spec.items():
            if (path == suffix or path.endswith("." + suffix)) and isinstance(mod, LINEAR_TYPES + (AdapterLayer,)):
                i = layer_index(path)
                if i is not None:
                    out.setdefault(i, {})[role] = path
    if not out:
        raise TargetError(f"heads: no module matches the attention layout {spec}")
    return out


def _slices(heads: list[int], start: int, hd: int) -> list[int]:
    return [start + h * hd + j for h in heads for j in range(hd)]


def head_importance(model: nn.Module, batches: Iterable, loss_fn: LossFn | None = None,
                    attention: dict[str, str] | None = None) -> dict[int, torch.Tensor]:
    """Per layer, a (num_heads,) importance: Σ over batches of |Σ grad·w| over each head's columns of
    the output projection (the loss's sensitivity to gating that head; Michel et al. 2019).

    Run it on the plain model; `batches` are model inputs with labels (or use loss_fn).
    """
    n, _, hd = _geometry(model)
    cfg = HeadsConfig(heads=[0], attention_modules=attention)
    mods = attention_modules(model, cfg)
    o_paths = {i: m["o"] for i, m in mods.items() if "o" in m}
    weights = {i: model.get_submodule(p).weight for i, p in o_paths.items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    loss_fn = loss_fn or default_loss
    total = {i: torch.zeros(n) for i in weights}
    model.eval()
    try:
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), list(weights.values()))
            for (i, w), g in zip(weights.items(), grads):
                gw = (g * w.detach()).float()
                gw = gw.t() if isinstance(model.get_submodule(o_paths[i]), Conv1D) else gw  # (out, in)
                total[i] += gw[:, : n * hd].reshape(gw.shape[0], n, hd).sum(dim=(0, 2)).abs().cpu()
    finally:
        for k, p in model.named_parameters():
            p.requires_grad_(flags.get(k, False))
        model.train(was_training)
    return total


@register_method(HeadsConfig, mergeable=True, description="train the q/k/v/o slices of chosen attention heads")
class HeadsModel(Tuner):
    supported_types = LINEAR_TYPES

    def inject_adapter(self, config: HeadsConfig, adapter: str) -> None:
        if adapter in self.peft_config:
            raise ValueError(f"an adapter named '{adapter}' already exists; pick another name or delete_adapter it first")
        config = config.replace()  # the stored copy records the resolved heads; the caller's stays reusable
        n, kv, hd = _geometry(self.model)
        mods = attention_modules(self.model, config)
        chosen = self._resolve(config, sorted(mods), n)
        group = n // kv
        plan: list[tuple[str, str, list[int]]] = []  # (path, axis, index)
        for i, heads in chosen.items():
            if not heads:
                continue
            kv_heads = sorted({h // group for h in heads})
            m = mods[i]
            if "qkv" in m:  # fused (GPT-2): [q | k | v] along the output
                e = n * hd
                plan.append((m["qkv"], "rows", _slices(heads, 0, hd) + _slices(heads, e, hd) + _slices(heads, 2 * e, hd)))
            else:
                missing = [r for r in ("q", "k", "v") if r not in m]
                if missing:
                    raise TargetError(f"heads: layer {i} has no '{missing[0]}' projection in {m}")
                plan += [(m["q"], "rows", _slices(heads, 0, hd)), (m["k"], "rows", _slices(kv_heads, 0, hd)),
                         (m["v"], "rows", _slices(kv_heads, 0, hd))]
            if "o" in m:
                plan.append((m["o"], "cols", _slices(heads, 0, hd)))
        if not plan:
            raise TargetError("heads: the configuration selects no head")
        config.heads = {i: h for i, h in chosen.items() if h}
        config.top_k, config.scores = None, None  # resolved: the saved config names the heads
        for path, axis, idx in plan:
            mod = self.model.get_submodule(path)
            index = torch.tensor(idx, dtype=torch.long)
            if isinstance(mod, HeadSliceLinear):
                if mod.axis != axis:
                    raise ValueError(f"'{path}' holds head slices on another axis")
                mod.update_layer(adapter, index)
            elif isinstance(mod, AdapterLayer):
                raise ValueError(f"'{path}' already holds a {type(mod).__name__}; heads cannot be added to it")
            else:
                replace_module(self.model, path, HeadSliceLinear(mod, adapter, axis, index))
        self._finish_injection(config, adapter)

    @staticmethod
    def _resolve(config: HeadsConfig, layers: list[int], n: int) -> dict[int, list[int]]:
        if config.heads is not None:
            chosen = {i: list(config.heads) for i in layers} if isinstance(config.heads, list) else dict(config.heads)
            for i, hs in chosen.items():
                if i not in layers:
                    raise TargetError(f"heads: layer {i} does not exist (layers {layers[0]}..{layers[-1]})")
                bad = [h for h in hs if not 0 <= h < n]
                if bad:
                    raise TargetError(f"heads: head {bad[0]} does not exist; layers have {n} heads (0..{n - 1})")
            return chosen
        if config.scores is None:
            raise ConfigError("heads: top_k needs importance scores: scores = slimtune.methods.heads."
                              "head_importance(model, batches) before get_peft_model, then "
                              "HeadsConfig(top_k=K, scores=scores); or name the heads with heads=[...]")
        if config.top_k > n:
            raise ConfigError(f"heads: top_k={config.top_k} but layers have {n} heads")
        out = {}
        for i in layers:
            s = config.scores.get(i, config.scores.get(str(i))) if isinstance(config.scores, dict) else None
            if s is None:
                raise ConfigError(f"heads: the scores have no entry for layer {i}")
            out[i] = sorted(torch.as_tensor(s).float().topk(config.top_k).indices.tolist())
        return out

    def _finish_injection(self, config: HeadsConfig, adapter: str) -> None:
        """Tuner.inject_adapter's tail: task head / modules_to_save, register, mark trainable."""
        self._setup_modules_to_save(config, adapter)
        self.peft_config[adapter] = config
        if len(self.peft_config) == 1:
            self.set_adapter(adapter)
        else:
            self._mark_trainable()

    @contextmanager
    def mixed_batch(self, adapter_names: list[str]):
        raise ValueError("mixed-adapter batches are LoRA-only; run one heads adapter per batch")
        yield  # pragma: no cover
