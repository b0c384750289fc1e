"""Fused LoRA linear: y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ as one autograd function.

Why: autograd over the composed ops saves extra activations and runs more kernels than the
math needs. This function saves only what backward uses — the (dropped-out) input, A, B and the
N×r projection — never forms a frozen-weight gradient or a d×d delta, and folds the scale into
the GEMM (`addmm_(..., alpha=s)`). Adapters stay in the model's dtype.

Shapes: x (..., in)   W (out, in)   A (r, in)   B (out, r)   y (..., out)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_a, lora_b, scale: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        xd2 = x2 if xd is None else xd.reshape(-1, shape[-1])
        out = F.linear(x2, weight, bias)  # (N, out)
        xa = xd2 @ lora_a.t()  # (N, r)
        out.addmm_(xa, lora_b.t(), alpha=scale)
        # x itself is only needed for a trainable base weight; A's gradient needs the A-path input.
        ctx.save_for_backward(
            x2 if ctx.needs_input_grad[2] else None,
            xd2 if ctx.needs_input_grad[4] else None,
            weight, lora_a, lora_b, xa,
        )
        ctx.scale, ctx.shape, ctx.has_xd = scale, shape, xd is not None
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, xd2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gb = g @ lora_b  # (N, r)
        dx = dxd = dw = db = da = dbm = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            lora_dx = gb @ lora_a  # (N, in), scaled below
            if ctx.has_xd:  # gradient of the A path flows through dropout's input separately
                dx = (g @ weight) if ctx.needs_input_grad[0] else None
                dxd = lora_dx.mul_(s).view(ctx.shape) if ctx.needs_input_grad[1] else None
            else:
                dx = torch.addmm(lora_dx, g, weight, alpha=1.0, beta=s) if ctx.needs_input_grad[0] else None
            dx = dx.view(ctx.shape) if dx is not None else None
        if ctx.needs_input_grad[2]:
            dw = g.t() @ x2
        if ctx.needs_input_grad[3]:
            db = g.sum(0)
        if ctx.needs_input_grad[4]:
            da = torch.mm(gb.t(), xd2).mul_(s)  # (r, in)
        if ctx.needs_input_grad[5]:
            dbm = torch.mm(g.t(), xa).mul_(s)  # (out, r)
        return dx, dxd, dw, db, da, dbm, None


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float, dropout=None):
    """Base linear plus one LoRA adapter. `weight` is (out, in) (pass Conv1D's weight transposed).

    `dropout` is a module applied to the A path only (None or Identity for none).
    """
    if torch.is_autocast_enabled(x.device.type):
        # Mixed precision: let autocast pick each op's dtype on the plain composition.
        return lora_reference(x, weight, bias, lora_a, lora_b, scale, dropout)
    xd = None
    if dropout is not None and not isinstance(dropout, torch.nn.Identity) and dropout.training and dropout.p > 0:
        xd = dropout(x)
    if not torch.is_grad_enabled() or not (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad
                                           or weight.requires_grad or (bias is not None and bias.requires_grad)):
        # Inference: no graph, one extra GEMM pair into the base output in place.
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out = F.linear(x2, weight, bias)
        out.addmm_((x2 if xd is None else xd.reshape(-1, shape[-1])) @ lora_a.t(), lora_b.t(), alpha=scale)
        return out.view(*shape[:-1], out.shape[-1])
    return _LoraLinearFn.apply(x, xd, weight, bias, lora_a, lora_b, scale)


def lora_reference(x, weight, bias, lora_a, lora_b, scale: float, dropout=None):
    """The plain composition the fused function must equal (used by tests)."""
    xd = x if dropout is None else dropout(x)
    return F.linear(x, weight, bias) + F.linear(F.linear(xd, lora_a), lora_b) * scale
