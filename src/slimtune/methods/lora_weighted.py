"""One new LoRA adapter from a weighted combination of others (PEFT's `add_weighted_adapter`).

Weights may be negative (w = −1 subtracts an adapter). Per layer, with s_i each adapter's scale:

- "cat":   A = [w_i·s_i·A_i] stacked on the rank axis, B = [B_i]: exactly Σ w_i·ΔW_i, rank Σ r_i.
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": the A's and the B's are combined
  separately (`merge_ops`), A with weights sign(w_i s_i)·√|w_i s_i| and B with √|w_i s_i|; equal ranks
  needed. "linear" is not Σ w_i·ΔW_i (cross terms), PEFT's definition kept for compatibility.
- "svd" and "<op>_svd": Σ-combine the ΔW_i with `merge_ops` (weights w_i), then the best rank-k
  approximation by SVD (k = `svd_rank`, default the largest source rank), optionally clamped.

The new adapter's alpha equals its rank (scale 1). A module trained in full (modules_to_save) by
one of the sources is copied for the new adapter, so it runs with the trained head (PEFT gives it an
untrained copy); two sources with their own copy of one module cannot be combined.
"""
from __future__ import annotations

import copy
import math

import torch

from ..inject import adapter_layers, save_wrappers
from . import merge_ops

LINEAR_FAMILY = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_FAMILY = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def _rank(cfg) -> int:
    return max(cfg.r, *cfg.rank_pattern.values()) if cfg.rank_pattern else cfg.r


def _ab(layer, name: str):
    """(A, B) tensors of adapter `name` in a LoRA layer: lora_A/lora_B weights, or the embedding tables."""
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def add_weighted_adapter(tuner, adapters: list[str], weights: list[float], name: str, combination_type: str = "svd",
                         svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    cfgs = check_weighted_args(tuner, adapters, weights, name)
    if any(getattr(c, "use_dora", False) for c in cfgs):
        raise ValueError("add_weighted_adapter combines plain LoRA adapters; DoRA magnitudes cannot be combined")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = [_rank(c) for c in cfgs]
    if combination_type in LINEAR_FAMILY:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={combination_type!r} needs adapters of one rank, got {ranks}; "
                             "use 'cat' or 'svd'")
        new_r = ranks[0]
    elif combination_type == "cat":
        new_r = sum(ranks)
    elif combination_type in SVD_FAMILY:
        new_r = svd_rank or max(ranks)
    else:
        raise ValueError(f"combination_type={combination_type!r}: use one of 'cat', "
                         f"{', '.join(repr(t) for t in LINEAR_FAMILY + SVD_FAMILY)}")
    if combination_type not in ("cat", "linear", "svd") and density is None:
        raise ValueError(f"combination_type={combination_type!r} needs density=... (the fraction of values kept)")
    heads = _heads_to_copy(tuner, adapters)

    todo = [(path, layer, [(a, w) for a, w in zip(adapters, weights) if a in getattr(layer, "scaling", {})])
            for path, layer in adapter_layers(tuner.model)]
    todo = [t for t in todo if t[2]]
    if not todo:
        raise ValueError(f"none of {adapters} has a LoRA layer to combine")
    for _, layer, _ in todo:  # every layer first, then the values (PEFT's order of random draws)
        layer.update_layer(name, r=new_r, lora_alpha=new_r, lora_dropout=0.0, init_lora_weights=True, use_rslora=False)
    for path, layer, present in todo:
        A, B = _ab(layer, name)
        with torch.no_grad():
            A.zero_()
            B.zero_()
            if combination_type == "cat":
                start = 0
                for a, w in present:  # adapters absent from this layer leave their rank slots zero
                    a_w, b_w = _ab(layer, a)
                    r = a_w.shape[0]
                    A[start:start + r] = a_w * (w * layer.scaling[a])
                    B[:, start:start + r] = b_w
                    start += r
            elif combination_type in LINEAR_FAMILY:
                op = combination_type
                ws = [w * layer.scaling[a] for a, w in present]
                wa = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in ws])
                wb = torch.tensor([math.sqrt(abs(x)) for x in ws])
                A.copy_(merge_ops.combine(op, [_ab(layer, a)[0] for a, _ in present], wa, density, majority_sign_method))
                B.copy_(merge_ops.combine(op, [_ab(layer, a)[1] for a, _ in present], wb, density, majority_sign_method))
            else:
                op = "linear" if combination_type == "svd" else combination_type[: -len("_svd")]
                deltas = [layer.get_delta_weight(a) for a, _ in present]
                delta = merge_ops.combine(op, deltas, torch.tensor([w for _, w in present]), density, majority_sign_method)
                a_new, b_new = _svd_factors(layer, delta, new_r, A, B, name in layer.lora_embedding_A,
                                            svd_clamp, svd_full_matrices, svd_driver)
                A.copy_(a_new)
                B.copy_(b_new)
    done = [path for path, _, _ in todo]
    new_cfg = cfgs[0].replace(r=new_r, lora_alpha=new_r, rank_pattern={}, alpha_pattern={}, init_lora_weights=True,
                              use_rslora=False, layers_to_transform=None, layers_pattern=None,
                              target_modules=_new_targets(cfgs, done))
    for path, src in heads.items():
        wrapper = tuner.model.get_submodule(path)
        wrapper.modules_to_save[name] = copy.deepcopy(wrapper.modules_to_save[src])
    tuner.peft_config[name] = new_cfg
    tuner._apply_active()


def check_weighted_args(tuner, adapters: list[str], weights: list[float], name: str) -> list:
    """The checks every add_weighted_adapter makes (LoRA's and IA³'s): one weight per adapter, each
    adapter known, the new name free. Returns the source adapters' configs."""
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("pass one weight per adapter (and at least one adapter)")
    for a in adapters:
        tuner._check(a)
    if name in tuner.peft_config:
        raise ValueError(f"an adapter named '{name}' already exists")
    return [tuner.peft_config[a] for a in adapters]


def _heads_to_copy(tuner, adapters: list[str]) -> dict[str, str]:
    """{wrapper path: the one source adapter with its own copy there}; two copies of one module refuse."""
    out = {}
    for path, w in save_wrappers(tuner.model):
        held = [a for a in adapters if a in w.modules_to_save]
        if len(held) > 1:
            raise ValueError(f"adapters {held} each trained their own copy of '{path}' (modules_to_save): there is "
                             "no rule to combine two trained modules; combine adapters with at most one such copy")
        if held:
            out[path] = held[0]
    return out


def _new_targets(cfgs, paths: list[str]):
    """The modules that got the new adapter. All list targets: their union (what PEFT records); else the
    exact module paths, which both libraries match as suffixes."""
    if all(isinstance(c.target_modules, list) and c.layers_to_transform is None for c in cfgs):
        return sorted({t for c in cfgs for t in c.target_modules})
    return sorted(paths)


def _svd_factors(layer, delta: torch.Tensor, rank: int, A: torch.Tensor, B: torch.Tensor, is_embedding: bool,
                 clamp, full_matrices, driver):
    """(A, B) of rank `rank` with B·A the best approximation of the combined delta in the layer's layout."""
    m = delta.flatten(1) if delta.dim() > 2 else delta  # conv: (out, in·k)
    if getattr(layer, "fan_in_fan_out", False) or is_embedding:
        m = m.t()  # to (out, in): Conv1D stores (in, out), an embedding's delta is (vocab, dim)
    u, s, vh = torch.linalg.svd(m, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.shape[0])
    b = m.new_zeros(m.shape[0], rank)
    a = m.new_zeros(rank, m.shape[1])
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return a.reshape(A.shape), b.reshape(B.shape)
