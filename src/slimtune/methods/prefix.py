"""Prefix tuning (Li & Liang 2021): trained key/value prefixes in every attention layer.

Through transformers' cache API (>= 5): the prefixes are written into a `DynamicCache` before
the model runs, so every layer attends to N extra positions it never computed; the attention
mask gets N ones on the left and positions start at N (as in PEFT).

    table (N, L·2·D) ─view─► (L·2, H, N, D/H) ─► layer l: keys = [2l], values = [2l+1]
                     ─► DynamicCache pre-filled, batch-expanded ─► model(cache=...)

The cache goes in under the name the model's forward takes: `cache` (transformers >= 5.24) or
`past_key_values` (older), read from its signature (`compat.cache_arg`).

With `prefix_projection` the table is the output of an MLP (embedding (N, D) -> tanh -> L·2·D)
during training; the file holds that output, baked: PEFT's single `prompt_embeddings` tensor of
shape (N, L·2·D), with `inference_mode: true` so both libraries load it as a plain table.

Training uses a read-only prefix cache (keys = cat(prefix, new), nothing stored), so gradient
checkpointing can recompute a layer and see the same keys; transformers otherwise drops
the cache inside checkpointed layers, which would silently train nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..compat import cache_arg
from ..config import ConfigError
from ..peft_types import PeftType
from ..registry import register_method
from ..targeting import TargetError
from ._prompt_common import (BakedSlot, PromptLearningConfig, PromptTunerBase, batch_size, cache_length,
                             extend_mask, fill_from_model, warn_mlp_dropped)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    peft_type: ClassVar[PeftType] = PeftType.PREFIX_TUNING
    method: ClassVar[str] = "prefix"

    encoder_hidden_size: int | None = None  # MLP width with prefix_projection; None = token_dim
    prefix_projection: bool = False  # train through an MLP (more stable, Li & Liang); baked on save
    init_weights: str | None = None  # None: random N(0, 1) (PEFT); "zero": zero prefixes

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights={self.init_weights!r}: use None (random) or 'zero'")


class PrefixEncoder(nn.Module):
    """PEFT's `PrefixEncoder`: embedding (N, L·2·D), or embedding (N, D) + MLP to L·2·D."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        n, d = config.num_virtual_tokens, config.token_dim
        out = config.num_layers * 2 * d
        self.transform: nn.Module | None = None
        if config.prefix_projection and not config.inference_mode:
            e = config.encoder_hidden_size or d
            self.embedding = nn.Embedding(n, d)
            self.transform = nn.Sequential(nn.Linear(d, e), nn.Tanh(), nn.Linear(e, out))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, out)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def table(self) -> torch.Tensor:  # (N, L·2·D)
        x = self.embedding.weight
        return self.transform(x) if self.transform is not None else x

    def saved_tensor(self) -> Any:
        return self.embedding.weight if self.transform is None else BakedSlot(self.table, self.load_baked)

    def load_baked(self, table: torch.Tensor) -> None:
        warn_mlp_dropped("prefix")
        w = self.embedding.weight
        self.transform = None
        self.embedding = nn.Embedding(*table.shape).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(table.to(w))
        self.embedding.weight.requires_grad_(w.requires_grad)


def _prefix_kv(config: PrefixTuningConfig, encoder: PrefixEncoder, batch: int, dtype: torch.dtype
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (B, H, N, D/H), in PEFT's layout of the table."""
    n, h = config.num_virtual_tokens, config.num_attention_heads
    x = encoder.table().to(dtype).view(n, config.num_layers * 2, h, config.token_dim // h)
    x = x.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (L·2, B, H, N, D/H)
    return [(x[2 * i], x[2 * i + 1]) for i in range(config.num_layers)]


def _prefix_cache_cls():
    from transformers import DynamicCache

    class PrefixOnlyCache(DynamicCache):
        """Holds the prefixes; `update` returns cat(prefix, new) and stores nothing, so a layer
        recomputed under gradient checkpointing sees exactly the keys of the first pass."""

        def fill(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> "PrefixOnlyCache":
            for i, (k, v) in enumerate(kv):
                DynamicCache.update(self, k, v, i)
            return self

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx]
            return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))

    return PrefixOnlyCache


@register_method(PrefixTuningConfig, mergeable=False, description="trained key/value prefixes in every attention layer")
class PrefixTuningModel(PromptTunerBase):
    def _target(self) -> nn.Module | None:
        """The module whose forward takes a KV cache: the model, or its backbone (BertModel
        inside BertForSequenceClassification, whose head does not pass a cache on)."""
        if cache_arg(self.model):
            return self.model
        prefix = getattr(self.model, "base_model_prefix", "")
        inner = getattr(self.model, prefix, None) if prefix else None
        return inner if isinstance(inner, nn.Module) and cache_arg(inner) else None

    def check_model(self, config: PromptLearningConfig) -> None:
        cfg = getattr(self.model, "config", None)
        if cfg is None or self._target() is None:
            raise TargetError(
                f"prefix: {type(self.model).__name__} takes no KV cache (its forward has no `cache` or "
                "`past_key_values` argument), so "
                "there is nowhere to put prefixes; use prompt tuning, LoRA or bottleneck adapters for this model")
        if getattr(cfg, "is_encoder_decoder", False):
            raise TargetError("prefix: encoder-decoder models are not supported yet; use LoRA or IA3")
        fill_from_model(config, self.model, kv_heads=True)
        if config.token_dim % config.num_attention_heads:
            raise TargetError(f"prefix: token_dim={config.token_dim} is not a multiple of "
                              f"num_attention_heads={config.num_attention_heads}")

    def make_encoder(self, config: PromptLearningConfig) -> nn.Module:
        return PrefixEncoder(config)

    def hook_module(self) -> nn.Module:
        target = self._target()
        # restore the checkpointing flag after each forward, even when it raises
        self._post_handle = target.register_forward_hook(self._after_forward, always_call=True)
        self._gc_layers: list[nn.Module] = []
        return target

    def unload(self) -> nn.Module:
        if getattr(self, "_post_handle", None) is not None:
            self._post_handle.remove()
            self._post_handle = None
        return super().unload()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        for layer in self._gc_layers:
            layer.__dict__.pop("_can_checkpoint_with_cache", None)
        self._gc_layers = []

    def rewrite(self, module: nn.Module, kw: dict, config: PromptLearningConfig, encoder: nn.Module) -> dict:
        n = config.num_virtual_tokens
        past = kw.get(self.cache_key)
        if cache_length(past) == 0:  # first step: write the prefixes (later decoding steps find them there)
            b = batch_size(kw)
            ref = kw.get("inputs_embeds")
            dtype = ref.dtype if ref is not None else module.get_input_embeddings().weight.dtype
            kv = _prefix_kv(config, encoder, b, dtype)
            if module.training or kw.get("use_cache") is False:
                # read-only: holds only the prefixes, so it can be passed back (generate without a
                # cache does) and recomputed (gradient checkpointing) without growing
                past = _prefix_cache_cls()(config=self.model.config).fill(kv)
                if module.training:
                    self._allow_cache_under_checkpointing(module)
            else:
                from transformers import DynamicCache

                past = past if past is not None else DynamicCache(config=self.model.config)
                for i, (k, v) in enumerate(kv):
                    past.update(k, v, i)
            kw[self.cache_key] = past
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + n
        return kw

    def _allow_cache_under_checkpointing(self, module: nn.Module) -> None:
        # transformers' checkpointed layers drop the cache unless the layer says it only
        # reads the cache; our training cache is read-only, so that is true for this forward.
        for m in module.modules():
            if getattr(m, "gradient_checkpointing", False) and hasattr(type(m), "_can_checkpoint_with_cache"):
                fn = getattr(m, "_gradient_checkpointing_func", None)
                if getattr(fn, "keywords", {}).get("use_reentrant") is True:
                    raise ValueError(
                        "prefix: reentrant gradient checkpointing passes no gradient to the prefixes (they reach "
                        "the layers through the cache, not as inputs), so nothing would train. Enable it with "
                        "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")
                m._can_checkpoint_with_cache = True
                self._gc_layers.append(m)
