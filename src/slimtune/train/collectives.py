"""Cross-rank reductions the objectives need under torchrun (DDP / FSDP), each a no-op in one process.

Why: DDP averages gradients, which equals one process on the global batch only when every rank's loss
is already a share of the global batch's. A token mean whose ranks hold different token counts (ORPO's
and RPO's NLL, GRPO's dapo loss, KTO's fast layout) must divide by the global count (world_share);
KTO's KL estimate and the logged statistics are the global batch's (world_mean / world_sum); and a loss
that ran beside the DDP wrapper (the objectives' fast layout) syncs its gradients itself
(allreduce_grads). Every rank must call each of them (they are collectives).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _world() -> int:
    """The number of ranks (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def world_share(n: torch.Tensor) -> torch.Tensor:
    """A loss's divisor over the global batch, as this rank must use it: the count summed over the
    ranks, divided by their number. DDP / FSDP average the ranks' gradients, so `x.sum() /
    world_share(n)` on each rank has the gradient, and the ranks' mean value, of one process's
    `x.sum() / n_total` on the whole batch. One process: n itself."""
    if _world() == 1:
        return n
    t = n.detach().to(torch.float64).clone()
    dist.all_reduce(t)
    return (t / _world()).to(n.dtype if n.is_floating_point() else torch.float32)


def world_sum(x: torch.Tensor) -> torch.Tensor:
    """A detached statistic summed over the ranks (one process: itself)."""
    if _world() == 1:
        return x
    t = x.detach().clone()
    dist.all_reduce(t)
    return t


def world_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a detached statistic that each rank computed on its equal share of the
    global batch (KTO's KL estimate z, which TRL gathers the same way): the global batch's value."""
    return world_sum(x) / _world()


def allreduce_grads(params: list[torch.Tensor]) -> None:
    """Average the gradients of `params` over the ranks in one flat all-reduce: for a loss that ran
    beside DDP's wrapper (the objectives' fast layout calls the decoder and head directly, so DDP's
    reducer never armed), the same sync DDP would have done. A parameter without a gradient on this
    rank counts as zeros, as DDP's find_unused_parameters does."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if _world() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= _world()
    for g, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(v)
