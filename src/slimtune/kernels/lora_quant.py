"""Fused LoRA over a quantized base layer: y = base(x) + s·(drop(x)·Aᵀ)·Bᵀ as one autograd node.

The base matmul is the quantized layer's own (bitsandbytes' kernel, run without a graph); the
adapter path and the backward are ours, with the fast-path ideas of `kernels/lora.py`: saved are
only the (dropped-out) input, A, B and the N×r projection (never a dense copy of the weight), the
scale is folded into `addmm_`, and the LoRA part of dx accumulates in place into the base part,
which comes from the dequantized weight exactly as bitsandbytes' own backward computes it:

    dx = (g · deq(W)) + s·(g·B)·A        dA = s·(g·B)ᵀ·drop(x)        dB = s·gᵀ·(drop(x)·Aᵀ)

Shapes: x (..., in)   A (r, in)   B (out, r)   y (..., out)
`dx_base(g)` is passed in: g (N, out) -> g·deq(W) (N, in), in g's dtype.
"""
from __future__ import annotations

from typing import Callable

import torch


class _QuantLoraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, lora_a, lora_b, scale: float, base: Callable, dx_base: Callable):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        xd2 = x2 if xd is None else xd.reshape(-1, shape[-1])
        out = base(x2)  # (N, out): the quantized kernel; grad mode is off inside forward
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        xa = xd2 @ lora_a.t()  # (N, r)
        out.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(xd2 if ctx.needs_input_grad[2] else None, lora_a, lora_b, xa)
        ctx.scale, ctx.shape, ctx.has_xd, ctx.dx_base = scale, shape, xd is not None, dx_base
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xd2, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gb = g @ lora_b  # (N, r)
        dx = dxd = da = dbm = None
        if ctx.needs_input_grad[0]:
            dx = ctx.dx_base(g)  # (N, in): through the dequantized weight
            if not ctx.has_xd:
                dx.addmm_(gb, lora_a, alpha=s)  # the LoRA part, in place: no second (N, in) buffer
            dx = dx.view(ctx.shape)
        if ctx.has_xd and ctx.needs_input_grad[1]:
            dxd = torch.mm(gb, lora_a).mul_(s).view(ctx.shape)
        if ctx.needs_input_grad[2]:
            da = torch.mm(gb.t(), xd2).mul_(s)  # (r, in)
        if ctx.needs_input_grad[3]:
            dbm = torch.mm(g.t(), xa).mul_(s)  # (out, r)
        return dx, dxd, da, dbm, None, None, None


def quant_lora_linear(x, base: Callable, dx_base: Callable, lora_a, lora_b, scale: float, dropout=None):
    """Quantized base layer `base` (called on (N, in)) plus one LoRA adapter; `dx_base(g)` = g·deq(W)."""
    if torch.is_autocast_enabled(x.device.type):
        # As kernels/lora.py: cast once to the autocast dtype, run with autocast off (the base layer
        # casts to its own compute dtype, as it does under autocast).
        dt = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return quant_lora_linear(x.to(dt), base, dx_base, lora_a.to(dt), lora_b.to(dt), scale, dropout)
    xd = None
    if dropout is not None and type(dropout) is not torch.nn.Identity and dropout.training and dropout.p > 0:
        xd = dropout(x)
    if not torch.is_grad_enabled() or not (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad):
        # Inference: no graph, the LoRA GEMM pair added into the base output in place.
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out = base(x2)
        out = out.to(x.dtype) if out.dtype != x.dtype else out
        out.addmm_((x2 if xd is None else xd.reshape(-1, shape[-1])) @ lora_a.t(), lora_b.t(), alpha=scale)
        return out.view(*shape[:-1], out.shape[-1])
    return _QuantLoraFn.apply(x, xd, lora_a, lora_b, scale, base, dx_base)
