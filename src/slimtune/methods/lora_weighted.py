"""Build one LoRA adapter from a weighted combination of others (PEFT's add_weighted_adapter).

- "cat":    A = [w_i·s_i·A_i] stacked on the rank axis, B = [B_i]: exactly Σ w_i·ΔW_i, rank Σ r_i.
- "linear": A = Σ √(w_i·s_i)·A_i, B = Σ √(w_i·s_i)·B_i: same rank needed; not exactly Σ w_i·ΔW_i
            (cross terms), PEFT's definition kept for compatibility.
- "svd":    Σ w_i·ΔW_i truncated to rank `svd_rank` by SVD: the best rank-k approximation.
The new adapter's alpha equals its rank, so its scale is 1.
"""
from __future__ import annotations

import math

import torch

from ..inject import adapter_layers


def add_weighted_adapter(tuner, adapters: list[str], weights: list[float], name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("pass one weight per adapter (and at least one adapter)")
    for a in adapters:
        tuner._check(a)
    if name in tuner.peft_config:
        raise ValueError(f"an adapter named '{name}' already exists")
    if combination_type not in ("linear", "cat", "svd"):
        raise ValueError(f"combination_type={combination_type!r}: use 'linear', 'cat' or 'svd'")
    cfgs = [tuner.peft_config[a] for a in adapters]
    ranks = {c.r for c in cfgs} | {r for c in cfgs for r in c.rank_pattern.values()}
    if combination_type == "linear" and len(ranks) > 1:
        raise ValueError(f"'linear' needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
    if combination_type == "cat":
        new_r = sum(c.r for c in cfgs)
    elif combination_type == "svd":
        new_r = svd_rank or max(c.r for c in cfgs)
    else:
        new_r = cfgs[0].r
    targets = sorted({t for c in cfgs for t in (c.target_modules if isinstance(c.target_modules, list) else [])})
    new_cfg = cfgs[0].replace(r=new_r, lora_alpha=new_r, target_modules=targets or cfgs[0].target_modules,
                              rank_pattern={}, alpha_pattern={}, init_lora_weights=True, use_rslora=False,
                              layers_to_transform=None, layers_pattern=None)
    for path, layer in adapter_layers(tuner.model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.scaling]
        if not present or not hasattr(layer, "lora_A") or not all(a in layer.lora_A for a, _ in present):
            continue
        layer.update_layer(name, r=new_r, lora_alpha=new_r, lora_dropout=0.0, init_lora_weights=True, use_rslora=False)
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        with torch.no_grad():
            if combination_type == "linear":
                A.zero_(); B.zero_()
                for a, w in present:
                    k = math.sqrt(w * layer.scaling[a]) if w * layer.scaling[a] >= 0 else None
                    if k is None:
                        raise ValueError("'linear' needs non-negative weight×scale; use 'svd' or 'cat'")
                    A.add_(layer.lora_A[a].weight, alpha=k)
                    B.add_(layer.lora_B[a].weight, alpha=k)
            elif combination_type == "cat":
                A.zero_(); B.zero_()
                start = 0
                for a, w in present:  # adapters absent from this layer leave their rank slots zero
                    r = layer.r[a]
                    A[start:start + r] = layer.lora_A[a].weight * (w * layer.scaling[a])
                    B[:, start:start + r] = layer.lora_B[a].weight
                    start += r
            else:
                delta = sum(w * (layer.lora_B[a].weight.flatten(1).float() @ layer.lora_A[a].weight.flatten(1).float())
                            * layer.scaling[a] for a, w in present)  # (out, in·k)
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                k = min(new_r, s.shape[0])
                b = torch.zeros(B.shape[0], new_r); a_ = torch.zeros(new_r, delta.shape[1])
                b[:, :k] = u[:, :k] * s[:k]
                a_[:k] = vh[:k]
                B.copy_(b.view_as(B)); A.copy_(a_.view_as(A))
    tuner.peft_config[name] = new_cfg
    tuner._mark_trainable()
