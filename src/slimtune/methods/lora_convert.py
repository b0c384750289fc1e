"""PiSSA / OLoRA → plain LoRA at save time (PEFT's `path_initial_model_for_weight_conversion`).

PiSSA and OLoRA start from A₀, B₀ taken out of the base weight (W = W_res + s·B₀A₀) and train A, B
on the residual. The trained model is W_res + s·BA = W + s·(BA − B₀A₀), which is a LoRA of rank 2r
on the *original* base:

    A' = [A ; A₀]   (2r, in)      B' = [B , −B₀]   (out, 2r)      α' = 2α (rsLoRA: √2·α), so s' = s

so the converted adapter needs no residual base, and mixes with other adapters.
"""
from __future__ import annotations

import torch

from .. import checkpoint as ckpt
from ..config import AdapterConfig, ConfigError


def convert_to_plain_lora(pm, adapter: str, cfg: AdapterConfig, state: dict[str, torch.Tensor], init_path: str):
    """(config, tensors) of `adapter` as a plain LoRA; `init_path` holds the adapter saved at init."""
    if cfg.peft_type != "LORA" or getattr(cfg, "use_dora", False):
        raise ConfigError("path_initial_model_for_weight_conversion converts PiSSA/OLoRA LoRA adapters; "
                          f"'{adapter}' is {'a DoRA' if getattr(cfg, 'use_dora', False) else cfg.method} adapter")
    if cfg.use_rslora and (cfg.rank_pattern or cfg.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    init = ckpt.read_adapter_weights(init_path)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"):
            if k not in init or init[k].shape != v.shape:
                raise ckpt.CheckpointError(f"{init_path}: no tensor '{k}' of shape {tuple(v.shape)}: it is not the "
                                           f"initial state of adapter '{adapter}' (save it right after get_peft_model)")
            a0 = init[k].to(v)
            out[k] = torch.cat([v, a0], 0) if ".lora_A." in k else torch.cat([v, -a0], 1)
        else:
            out[k] = v
    # PEFT rewrites the initial folder's config as a plain LoRA, so that folder loads without re-init.
    cfg.replace(init_lora_weights=True).save_pretrained(init_path)
    new = cfg.replace(init_lora_weights=True, r=2 * cfg.r,
                      lora_alpha=cfg.lora_alpha * (2 ** 0.5 if cfg.use_rslora else 2),
                      rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
                      alpha_pattern={k: 2 * v for k, v in cfg.alpha_pattern.items()})
    return new, out
