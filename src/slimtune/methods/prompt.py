"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): N trained "virtual token"
embeddings prepended to the input embeddings of a frozen model.

    input_ids (B, T) ─ embed ─► (B, T, D) ─ cat ─► [prompt (N, D) | tokens] (B, N+T, D) ─► model
    attention_mask (B, T) -> (B, N+T) (prompt always attended); labels -> -100 on the prompt

Prompt tuning trains the table itself, initialised at random, from sampled vocabulary
embeddings, or from the embeddings of a text. P-tuning (`PromptEncoderConfig`) computes the table
with a small MLP (or LSTM+MLP) during training; the file holds its output, baked, as PEFT does.
Config fields and the file (`prompt_embeddings`, shape (N, D)) are PEFT's.

`generate()` works through the same hook: the first step gets the prompt, later steps find it
in the KV cache; the returned sequences are the real tokens only.

Encoder-decoder models (T5, BART), as PEFT: the prompt goes in front of the *encoder's* input
(a pre-hook on `model.get_encoder()`), the encoder attention mask grows by N wherever it is used
(the encoder and the decoder's cross-attention), the decoder and the labels are untouched. With
task_type SEQ_2_SEQ_LM the table has 2N rows (PEFT's num_transformer_submodules=2), of which the
first N are the prompt, so files move between the libraries unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..config import ConfigError
from ..peft_types import PeftType
from ..registry import register_method
from ..targeting import TargetError
from ._prompt_common import (BakedSlot, PromptLearningConfig, PromptTunerBase, _arg_names, cache_length,
                             extend_mask, fill_from_model, warn_mlp_dropped)

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    peft_type: ClassVar[PeftType] = PeftType.PROMPT_TUNING
    method: ClassVar[str] = "prompt"
    slimtune_only: ClassVar[tuple[str, ...]] = ("tokenizer",)

    prompt_tuning_init: str = "RANDOM"  # "RANDOM" | "SAMPLE_VOCAB" | "TEXT"
    prompt_tuning_init_text: str | None = None  # TEXT: its tokens' embeddings (cut or repeated to N)
    tokenizer_name_or_path: str | None = None  # TEXT: a local tokenizer folder
    tokenizer_kwargs: dict | None = None
    # slimtune-only: a tokenizer object for TEXT init (used once, never written to disk)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        if init not in INITS:
            raise ConfigError(f"prompt_tuning_init={self.prompt_tuning_init!r}: use one of {', '.join(INITS)}")
        self.prompt_tuning_init = init
        if init == "TEXT":
            if not self.prompt_tuning_init_text:
                raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text='...'")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer "
                                  "folder) or tokenizer=<a tokenizer object>")
            if self.tokenizer is not None and not self.tokenizer_name_or_path:
                self.tokenizer_name_or_path = getattr(self.tokenizer, "name_or_path", None) or None
        elif self.tokenizer_kwargs:
            raise ConfigError("tokenizer_kwargs only applies with prompt_tuning_init='TEXT'")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("tokenizer", None)  # an object, used once at init
        return out

    def for_loading(self) -> "PromptTuningConfig":
        """Weights come from the file: no tokenizer needed to initialise from text."""
        if self.prompt_tuning_init != "TEXT":
            return self
        return self.replace(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_kwargs=None)


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: the prompt table is the output of an MLP (or LSTM + MLP) while training."""

    peft_type: ClassVar[PeftType] = PeftType.P_TUNING
    method: ClassVar[str] = "p_tuning"

    encoder_reparameterization_type: str = "MLP"  # "MLP" | "LSTM"
    encoder_hidden_size: int | None = None  # None = token_dim
    encoder_num_layers: int = 2  # LSTM layers (the MLP always has PEFT's 3 linear layers)
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = str(getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)).upper()
        if kind not in ("MLP", "LSTM"):
            raise ConfigError(f"encoder_reparameterization_type={kind!r}: use 'MLP' or 'LSTM'")
        self.encoder_reparameterization_type = kind


class PromptEmbedding(nn.Module):
    """The trained table (N, D), as PEFT's `PromptEmbedding`."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        n = config.total_virtual_tokens
        self.embedding = nn.Embedding(n, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.num_embeddings, (n,))
        else:
            ids = _text_ids(config, n)
        w = word_embeddings.weight
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(ids.to(w.device)).detach().float())
        config.tokenizer = None  # used once; the config stays serialisable

    def prompts(self) -> torch.Tensor:  # (N, D)
        return self.embedding.weight

    def saved_tensor(self) -> torch.Tensor:
        return self.embedding.weight


def _text_ids(config: PromptTuningConfig, n: int) -> torch.Tensor:
    tok = config.tokenizer
    if tok is None:
        from transformers import AutoTokenizer

        kw = dict(config.tokenizer_kwargs or {})
        kw.pop("trust_remote_code", None)  # a config file must not run code
        try:
            tok = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kw)
        except Exception as e:
            raise ConfigError(f"prompt_tuning_init='TEXT': cannot load the tokenizer "
                              f"'{config.tokenizer_name_or_path}' ({e}); pass a local folder, or tokenizer=<object>") from e
    ids = list(tok(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenizes to nothing")
    ids = (ids * math.ceil(n / len(ids)))[:n]  # PEFT: cut, or repeat to fill the prompt
    return torch.tensor(ids, dtype=torch.long)


class PromptEncoder(nn.Module):
    """P-tuning: table (N, D) -> MLP (D -> E -> E -> D), or bidirectional LSTM + MLP. PEFT's layout."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        d, e = config.token_dim, config.encoder_hidden_size or config.token_dim
        self.embedding = nn.Embedding(config.total_virtual_tokens, d)
        self.lstm_head: nn.Module | None = None
        self.mlp_head: nn.Module | None = None
        if config.inference_mode:
            return  # a loaded file holds the baked table
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(d, e, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * e, 2 * e), nn.ReLU(), nn.Linear(2 * e, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, e), nn.ReLU(), nn.Linear(e, e), nn.ReLU(), nn.Linear(e, d))

    def prompts(self) -> torch.Tensor:  # (N, D)
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0][0]
        return self.mlp_head(x) if self.mlp_head is not None else x

    def saved_tensor(self) -> Any:
        if self.mlp_head is None:
            return self.embedding.weight
        return BakedSlot(self.prompts, self.load_baked)

    def load_baked(self, table: torch.Tensor) -> None:
        warn_mlp_dropped("p_tuning")
        self.lstm_head = self.mlp_head = None
        with torch.no_grad():
            self.embedding.weight.copy_(table.to(self.embedding.weight))


@register_method(PromptTuningConfig, mergeable=False, description="trained virtual-token embeddings prepended to the input")
class PromptTuningModel(PromptTunerBase):
    def check_model(self, config: PromptLearningConfig) -> None:
        get = getattr(self.model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if not isinstance(emb, nn.Embedding):
            raise TargetError(f"{config.method}: the model has no input embedding layer (get_input_embeddings()); "
                              "prompt tuning needs a transformers model that takes inputs_embeds")
        fill_from_model(config, self.model)
        if config.token_dim != emb.embedding_dim:
            raise TargetError(f"{config.method}: token_dim={config.token_dim} but the input embeddings have "
                              f"{emb.embedding_dim} dims; leave token_dim unset")

    def make_encoder(self, config: PromptLearningConfig) -> nn.Module:
        if isinstance(config, PromptEncoderConfig):
            return PromptEncoder(config)
        return PromptEmbedding(config, self.model.get_input_embeddings())

    def _is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    def hook_module(self) -> nn.Module:
        if self._is_encoder_decoder():
            enc = self.model.get_encoder()
            self._enc_arg_names = _arg_names(enc)
            self._enc_handle = enc.register_forward_pre_hook(self._encoder_hook, with_kwargs=True)
        return self.model

    def unload(self) -> nn.Module:
        if getattr(self, "_enc_handle", None) is not None:
            self._enc_handle.remove()
            self._enc_handle = None
        return super().unload()

    def _encoder_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        """Encoder-decoder: the prompt in front of the encoder's input, the mask grown to match."""
        name = self.active_adapter
        if self._prompt_disabled or not isinstance(name, str) or name not in self.prompt_encoder:
            return None
        kw = {**dict(zip(self._enc_arg_names, args)), **kwargs}
        n = self.peft_config[name].num_virtual_tokens
        ids = kw.pop("input_ids", None)
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = self.model.get_input_embeddings()(ids)
        b, t = embeds.shape[:2]
        prompts = self.prompt_encoder[name].prompts()[:n].to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        kw["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)  # (B, N+T, D)
        mask = kw.get("attention_mask")
        if mask is not None and mask.shape[-1] == t:
            kw["attention_mask"] = extend_mask(mask, n)
        return (), kw

    def _rewrite_encoder_decoder(self, kw: dict, config: PromptLearningConfig) -> dict:
        """The model-level call: only the encoder mask (also used by cross-attention) needs the N extra
        positions; the encoder itself gets the prompt from its own hook."""
        n, mask = config.num_virtual_tokens, kw.get("attention_mask")
        if mask is None:
            return kw
        enc_out = kw.get("encoder_outputs")
        if enc_out is not None:  # decoding steps: the encoder ran already, with the prompt
            enc_len = (enc_out[0] if isinstance(enc_out, (tuple, list)) else enc_out.last_hidden_state).shape[1]
            grow = mask.shape[-1] == enc_len - n
        else:
            src = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
            grow = src is not None and mask.shape[-1] == src.shape[1]
        if grow:
            kw["attention_mask"] = extend_mask(mask, n)
        return kw

    def rewrite(self, module: nn.Module, kw: dict, config: PromptLearningConfig, encoder: nn.Module) -> dict:
        if self._is_encoder_decoder():
            return self._rewrite_encoder_decoder(kw, config)
        n = config.total_virtual_tokens
        if cache_length(kw.get(self.cache_key)) > 0:
            # a decoding step: the cache already holds the prompt, only the mask and positions shift
            kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n)
            if kw.get("position_ids") is not None:
                kw["position_ids"] = kw["position_ids"] + n
            return kw
        ids = kw.pop("input_ids", None)
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise ValueError(f"{config.method}: pass input_ids or inputs_embeds")
            embeds = module.get_input_embeddings()(ids)
        b, t = embeds.shape[:2]
        prompts = encoder.prompts().to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, N, D)
        kw["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)  # (B, N+T, D)
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n)
        labels = kw.get("labels")
        if labels is not None and labels.dim() >= 2 and labels.shape[1] == t:  # per-token labels
            kw["labels"] = torch.cat([labels.new_full((b, n) + tuple(labels.shape[2:]), -100), labels], dim=1)
        pos = kw.get("position_ids")
        if pos is not None:  # prompt at 0..N-1, tokens after it (left padding kept)
            kw["position_ids"] = torch.cat([torch.arange(n, device=pos.device).expand(pos.shape[0], n), pos + n], 1)
        tt = kw.get("token_type_ids")
        if tt is not None:
            kw["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], n), tt], dim=1)
        return kw


register_method(PromptEncoderConfig, mergeable=False,
                description="P-tuning: virtual tokens computed by a small MLP/LSTM, baked on save")(PromptTuningModel)
