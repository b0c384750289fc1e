"""What prompt tuning, P-tuning and prefix tuning share: PEFT's config fields, the model-level
tuner that holds one prompt encoder per adapter (no module is swapped), and the input hook.

    PeftModel ─ base_model (PromptTunerBase) ─┬─ model (the user's model, untouched but for a
              │                               │   forward pre-hook on one module)
              │                               └─ prompt_encoder[adapter] (the trained tables)

The hook is a forward pre-hook (with kwargs) on the user's model, so it runs for both
`PeftModel.forward` and `PeftModel.generate` (which calls the model's own generate, whose
steps call the model): one code path rewrites the inputs for training and every decoding step.

On disk, as PEFT: a single `prompt_embeddings` tensor, the encoder's output with any
reparameterization MLP baked in; the config says `inference_mode: true`, so both libraries load
it as a plain table.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from ..compat import cache_arg, pop_cache
from ..config import ANY, AdapterConfig, ConfigError, listify
from ..inject import save_wrappers
from ..targeting import TargetError
from ..tuner import NotMergeableError, Tuner

PROMPT_KEY = "prompt_embeddings"


@dataclass
class PromptLearningConfig(AdapterConfig):
    """PEFT's `PromptLearningConfig` fields; None = read from the model's config at injection."""

    peft_only: ClassVar[dict[str, Any]] = {"auto_mapping": ANY, "peft_version": ANY}

    num_virtual_tokens: int = 20  # length of the learned prompt / prefix
    token_dim: int | None = None  # hidden size (prefix tuning with GQA: head_dim * num_key_value_heads)
    num_transformer_submodules: int | None = None  # 1 (decoder-only, encoder-only) or 2 (encoder-decoder)
    num_attention_heads: int | None = None  # prefix tuning: KV heads
    num_layers: int | None = None
    modules_to_save: Any = None  # e.g. a fresh classifier head (added by default for SEQ_CLS)

    def __post_init__(self) -> None:
        self.modules_to_save = listify(self.modules_to_save)
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens={self.num_virtual_tokens!r}: must be a positive integer")

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except Exception:
            return cfg
    return cfg


def fill_from_model(config: PromptLearningConfig, model: nn.Module, kv_heads: bool = False) -> None:
    """PEFT's `_prepare_prompt_learning_config`: take missing sizes from the model's config.

    `kv_heads` (prefix tuning): with grouped-query attention the prefix has the size of the
    keys/values, head_dim * num_key_value_heads, not the hidden size (PEFT #1901).
    """
    cfg = _text_config(model)
    if cfg is None:
        missing = [k for k in ("token_dim", "num_layers") + (("num_attention_heads",) if kv_heads else ())
                   if getattr(config, k) is None]
        if missing:
            raise TargetError(f"{config.method}: the model has no transformers config; set {', '.join(missing)} "
                              "in the config")
    get = lambda *names: next((getattr(cfg, n) for n in names if isinstance(getattr(cfg, n, None), int)), None)  # noqa: E731
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    if config.num_layers is None:
        config.num_layers = get("num_hidden_layers", "num_layers", "n_layer", "n_layers")
    if config.token_dim is None:
        config.token_dim = get("hidden_size", "n_embd", "d_model", "dim")
    if config.num_attention_heads is None:
        config.num_attention_heads = get("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
                                         "n_heads")
    for k in ("num_layers", "token_dim", "num_attention_heads"):
        if getattr(config, k) is None:
            raise TargetError(f"{config.method}: cannot read {k} from the model's config; set {k}=... in the config")
    if kv_heads and isinstance(getattr(cfg, "num_key_value_heads", None), int):
        head_dim = getattr(cfg, "head_dim", None) or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * cfg.num_key_value_heads
        config.num_attention_heads = cfg.num_key_value_heads
    if getattr(config, "encoder_hidden_size", ANY) is None:
        config.encoder_hidden_size = config.token_dim


class BakedSlot:
    """Stands in the checkpoint key map where the saved tensor is computed (an MLP's output).

    Saving reads `detach()` (the baked table). Loading calls `copy_`, which hands the table to
    `on_load`: the encoder drops its MLP and continues from the plain table, so a file is never
    silently ignored.
    """

    def __init__(self, compute: Callable[[], torch.Tensor], on_load: Callable[[torch.Tensor], None]) -> None:
        self._compute, self._on_load = compute, on_load
        t = compute()
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device

    def detach(self) -> torch.Tensor:
        with torch.no_grad():
            return self._compute().detach()

    def copy_(self, value: torch.Tensor) -> "BakedSlot":
        self._on_load(value)
        return self


class PromptTunerBase(Tuner):
    """Model-level tuner for methods that add inputs instead of swapping modules.

    Subclasses: `make_encoder(config)`, `check_model(config)`, `rewrite(module, kwargs, config, encoder)`
    (the hook body) and `hook_module()` (where the hook goes).
    """

    hook_module_attr: ClassVar[str] = ""

    # ---- subclass hooks ------------------------------------------------------------------
    def check_model(self, config: PromptLearningConfig) -> None:
        """Raise one clear error if the model cannot take this method."""

    def make_encoder(self, config: PromptLearningConfig) -> nn.Module:
        raise NotImplementedError

    def hook_module(self) -> nn.Module:
        return self.model

    def rewrite(self, module: nn.Module, kwargs: dict, config: PromptLearningConfig, encoder: nn.Module) -> dict:
        raise NotImplementedError

    # ---- injection ---------------------------------------------------------------------------
    def inject_adapter(self, config: PromptLearningConfig, adapter: str) -> None:
        self.check_new_adapter(config, adapter)
        if "prompt_encoder" not in self._modules:
            self.prompt_encoder = nn.ModuleDict()
            self._prompt_disabled = False
            self._hook_handle = None
        self.check_model(config)
        encoder = self.make_encoder(config)
        ref = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if ref is not None:  # adapters live in the base weights' device and dtype
            encoder.to(device=ref.device, dtype=ref.dtype)
        self.prompt_encoder[adapter] = encoder
        self._setup_modules_to_save(config, adapter)
        self.peft_config[adapter] = config
        if self._hook_handle is None:
            mod = self.hook_module()
            self._hook_module = mod
            self._arg_names = _arg_names(mod)
            self._cache_arg = cache_arg(mod)
            self._hook_handle = mod.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        if len(self.peft_config) == 1:
            self.set_adapter(adapter)
        else:
            self._apply_active()

    # ---- the hook ----------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        name = self.active_adapter
        if self._prompt_disabled or not isinstance(name, str) or name not in self.prompt_encoder:
            return None
        if args:  # positional -> named, so the rewrite sees one dict
            kwargs = {**dict(zip(self._arg_names, args)), **kwargs}
            if len(args) > len(self._arg_names):
                raise TypeError(f"{self.peft_config[name].method}: pass inputs by name")
        kwargs = dict(kwargs)
        given, past = pop_cache(kwargs)
        if past is not None:
            kwargs[self.cache_key if self._cache_arg else given] = past
        return (), self.rewrite(module, kwargs, self.peft_config[name], self.prompt_encoder[name])

    @property
    def cache_key(self) -> str:
        """The keyword the hooked module takes its KV cache as; `rewrite` reads and writes it."""
        return self._cache_arg or "past_key_values"

    # ---- adapters as a set -------------------------------------------------------------------
    def set_adapter(self, name: str | list[str]) -> None:
        if not isinstance(name, str):
            if len(name) != 1:
                raise ValueError(f"{self._method()}: one adapter is active at a time (its prompt is prepended); "
                                 f"got {list(name)}")
            name = name[0]
        super().set_adapter(name)

    def _method(self) -> str:
        return next(iter(self.peft_config.values())).method if self.peft_config else "prompt learning"

    def delete_adapter(self, name: str) -> None:
        self._check(name)
        del self.prompt_encoder[name]
        super().delete_adapter(name)

    def adapter_parameters(self, name: str):
        if name in self.prompt_encoder:
            yield from self.prompt_encoder[name].parameters()
        for _, w in save_wrappers(self.model):
            yield from (p for _, p in w.adapter_parameters(name))

    def _mark_trainable(self) -> None:
        self.prompt_encoder.requires_grad_(False)  # other adapters' tables stay frozen
        super()._mark_trainable()

    def _set_disabled(self, flag: bool) -> None:
        super()._set_disabled(flag)
        self._prompt_disabled = flag

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str]):
        raise NotImplementedError(f"{self._method()}: mixed-adapter batches are not supported (prompts of "
                                  "different adapters would need per-row lengths); run one adapter per batch")
        yield  # pragma: no cover

    # ---- files -------------------------------------------------------------------------------
    def adapter_key_map(self, adapter: str, root: nn.Module) -> dict[str, Any]:
        from ..checkpoint import PREFIX, adapter_key_map

        out: dict[str, Any] = {PROMPT_KEY: self.prompt_encoder[adapter].saved_tensor()}
        # modules_to_save copies (a classifier head). PEFT's prompt-learning models have no tuner
        # between the wrapper and the model, so their keys read "base_model.<path>".
        for k, v in adapter_key_map(root, adapter).items():
            out["base_model." + k[len(PREFIX):] if k.startswith(PREFIX) else k] = v
        return out

    # ---- not mergeable; unload removes the hook ------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise NotMergeableError(f"{self._method()} adds inputs, not weights: there is nothing to merge into the "
                                "base model. Keep the PeftModel for inference, or unload() for the base model")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        self.merge_adapter()
        raise AssertionError("unreachable")

    def unload(self) -> nn.Module:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        return super().unload()


def _arg_names(module: nn.Module) -> list[str]:
    try:
        return [n for n, p in inspect.signature(module.forward).parameters.items()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return []


def cache_length(past: Any) -> int:
    """Tokens already in a KV cache (a transformers Cache or the legacy tuple); 0 if none."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:
        return int(past[0][0].shape[-2])
    except Exception:
        return 0


def batch_size(kwargs: dict) -> int:
    for k in ("input_ids", "inputs_embeds"):
        if kwargs.get(k) is not None:
            return kwargs[k].shape[0]
    raise ValueError("prompt learning needs input_ids or inputs_embeds")


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Prepend n attended positions to a 2-D padding mask (B, T) -> (B, n + T)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"prompt learning takes a 2-D attention mask (batch, length); got shape {tuple(mask.shape)}")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def warn_mlp_dropped(method: str) -> None:
    warnings.warn(f"{method}: the file holds the baked prompt table (the reparameterization MLP is not saved, as in "
                  "PEFT); training continues on the table directly", stacklevel=4)
