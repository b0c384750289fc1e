"""Ways to combine task tensors T_i (one per adapter) with weights w_i into one, for weighted adapters.

    linear          Σ w_i·T_i                                          (task arithmetic)
    magnitude_prune Σ w_i·top_d(T_i)            top_d: keep the fraction d of largest |values|
    ties            elect a sign per entry from the pruned T_i (Σ of values, or of signs), then the
                    mean of the w_i·top_d(T_i) that agree with it        (Yadav et al. 2023)
    dare_linear     Σ w_i·drop_d(T_i)           drop_d: keep each value with probability d, ×1/d
    dare_ties       ties with drop_d instead of top_d                    (Yu et al. 2023)

The same definitions as PEFT's merge utilities, so a weighted adapter built here equals PEFT's
(with the same random draws for the dare variants: one torch.bernoulli per tensor, in order).
"""
from __future__ import annotations

import warnings

import torch


def _top(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().flatten(), k=k).indices] = 1
    return t * keep.view(t.shape)


def _drop(t: torch.Tensor, density: float) -> torch.Tensor:
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _prune(t: torch.Tensor, density: float, how) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"density={density} >= 1: nothing is pruned", stacklevel=4)
        return t
    if density < 0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return how(t, density)


def _weighted(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stack * weights.to(stack).view(-1, *([1] * (stack.dim() - 1)))  # (n, ...) * (n, 1, ...)


def _agreeing_mean(stack: torch.Tensor, weighted: torch.Tensor, method: str) -> torch.Tensor:
    sign = stack.sign()
    if method == "total":
        votes = stack.sum(0)
    elif method == "frequency":
        votes = sign.sum(0)
    else:
        raise ValueError(f"majority_sign_method={method!r}: use 'total' or 'frequency'")
    agree = sign == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(op: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None = None,
            majority_sign_method: str = "total") -> torch.Tensor:
    """Combine same-shape `tensors` with `weights` by `op` (see the module doc)."""
    if op == "linear":
        return _weighted(torch.stack(tensors), weights).sum(0)
    how = {"ties": _top, "magnitude_prune": _top, "dare_linear": _drop, "dare_ties": _drop}.get(op)
    if how is None:
        raise ValueError(f"unknown combination {op!r}")
    stack = torch.stack([_prune(t, density, how) for t in tensors])
    weighted = _weighted(stack, weights)
    if op in ("ties", "dare_ties"):
        return _agreeing_mean(stack, weighted, majority_sign_method)
    return weighted.sum(0)
