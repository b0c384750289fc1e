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
        if ctx.has_xd:  # gradient of the A path flows through dropout's input separately
            dx = torch.mm(g, weight) if ctx.needs_input_grad[0] else None
            dxd = torch.mm(gb, lora_a).mul_(s).view(ctx.shape) if ctx.needs_input_grad[1] else None
        elif ctx.needs_input_grad[0]:
            # the LoRA part accumulates into the base input gradient in place: no (N, in) temporary
            dx = torch.mm(g, weight).addmm_(gb, lora_a, alpha=s)
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
        # Mixed precision: every op here is one autocast runs in its low-precision dtype (linear,
        # mm, addmm), so cast once and run the fused path with autocast off.
        x, (weight, bias, lora_a, lora_b) = autocast_inputs(x, (weight, bias, lora_a, lora_b))
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout)
    xd = None
    if dropout is not None and type(dropout) is not torch.nn.Identity and dropout.training and dropout.p > 0:
        xd = dropout(x)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (N, in)
    if not torch.is_grad_enabled() or not (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad
                                           or weight.requires_grad or (bias is not None and bias.requires_grad)):
        # Inference: no graph, one extra GEMM pair into the base output in place.
        out = F.linear(x2, weight, bias)
        out.addmm_((x2 if xd is None else xd.reshape(-1, shape[-1])) @ lora_a.t(), lora_b.t(), alpha=scale)
        return out.view(*shape[:-1], out.shape[-1])
    if NATIVE_AUTOGRAD and xd is None:
        # The same three ops, differentiated by autograd's C++ backward: it saves the same tensors
        # (x, A, B, xA, W), forms no frozen-weight gradient and no d×d delta, and the scale stays
        # folded into the in-place addmm_. Measured on an H100 it matched or beat the Python
        # backward of _LoraLinearFn (whose per-layer Python cost shows when the GPU waits on the
        # CPU), see benchmarks/results/README.md. The function remains for the dropout path.
        out = F.linear(x2, weight, bias)
        out.addmm_(F.linear(x2, lora_a), lora_b.t(), alpha=scale)
        return out.view(*shape[:-1], out.shape[-1])
    return _LoraLinearFn.apply(x, xd, weight, bias, lora_a, lora_b, scale)


def autocast_inputs(x, tensors):
    """x and each tensor (None kept) in the autocast dtype of x's device: what autocast would
    hand to linear/mm/addmm. The casts are differentiable, so fp32 adapters get fp32 gradients."""
    dt = torch.get_autocast_dtype(x.device.type)
    return x.to(dt), [None if t is None else t.to(dt) for t in tensors]


NATIVE_AUTOGRAD = True  # False: the Python-backward _LoraLinearFn for every case (ablation / tests)


def lora_reference(x, weight, bias, lora_a, lora_b, scale: float, dropout=None):
    """The plain composition the fused function must equal (used by tests)."""
    xd = x if dropout is None else dropout(x)
    return F.linear(x, weight, bias) + F.linear(F.linear(xd, lora_a), lora_b) * scale


class _LoraGroupFn(torch.autograd.Function):
    """Several LoRA linears that read the same input (q/k/v, gate/up) as one node.

    One GEMM for all A-projections (x·[A₁;A₂;…]ᵀ, N×Σr), and in backward one GEMM for the LoRA
    part of dx and one for every dA, with dx accumulated into a single buffer by addmm. Saves x,
    the A's, B's and the N×Σr projection — the same as the per-layer function, once.
    """

    @staticmethod
    def forward(ctx, x, scales, *flat):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        ws, bs, As, Bs = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        ranks = [a.shape[0] for a in As]
        a_cat = torch.cat(As)  # (R, in)
        xa = x2 @ a_cat.t()  # (N, R)
        outs, off = [], 0
        for w, b, bm, r, s in zip(ws, bs, Bs, ranks, scales):
            out = F.linear(x2, w, b)
            out.addmm_(xa[:, off:off + r], bm.t(), alpha=s)
            outs.append(out.view(*shape[:-1], out.shape[-1]))
            off += r
        need_w = any(ctx.needs_input_grad[2 + 4 * i] for i in range(len(ws)))
        need_a = any(ctx.needs_input_grad[4 + 4 * i] for i in range(len(ws)))
        ctx.save_for_backward(x2 if (need_w or need_a) else None, a_cat, xa, *ws, *Bs)
        ctx.scales, ctx.ranks, ctx.shape = scales, ranks, shape
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, a_cat, xa, *rest = ctx.saved_tensors
        n = len(ctx.ranks)
        ws, Bs = rest[:n], rest[n:]
        nig = ctx.needs_input_grad
        N = xa.shape[0]
        gs = [None if g is None else g.reshape(N, -1) for g in grads]
        # s_i·g_i·B_i for every output, side by side: (N, R); zeros where an output got no gradient.
        parts = []
        for g, bm, r, s in zip(gs, Bs, ctx.ranks, ctx.scales):
            parts.append(xa.new_zeros(N, r) if g is None else torch.mm(g, bm).mul_(s))
        gb = torch.cat(parts, 1) if n > 1 else parts[0]
        dx = None
        if nig[0]:
            dx = gb @ a_cat  # (N, in): LoRA part of every output's dx, one GEMM
            for g, w in zip(gs, ws):
                if g is not None:
                    dx.addmm_(g, w)
            dx = dx.view(ctx.shape)
        d_a = torch.mm(gb.t(), x2) if any(nig[4 + 4 * i] for i in range(n)) else None  # (R, in)
        out: list = [dx, None]
        off = 0
        for i, (g, r, s) in enumerate(zip(gs, ctx.ranks, ctx.scales)):
            dw = db = da = dbm = None
            if g is not None:
                if nig[2 + 4 * i]:
                    dw = g.t() @ x2
                if nig[3 + 4 * i]:
                    db = g.sum(0)
                if nig[5 + 4 * i]:
                    dbm = torch.mm(g.t(), xa[:, off:off + r]).mul_(s)
            if nig[4 + 4 * i] and d_a is not None and g is not None:
                da = d_a[off:off + r]
            out += [dw, db, da, dbm]
            off += r
        return tuple(out)


def lora_group_linear(x, specs):
    """Outputs of several LoRA linears on the same input x; specs: [(weight, bias, A, B, scale), ...].

    No dropout (each layer would need its own mask); equals `[lora_linear(x, *spec) for spec in specs]`.
    """
    if torch.is_autocast_enabled(x.device.type):
        x, ts = autocast_inputs(x, [t for spec in specs for t in spec[:4]])
        specs = [(*ts[4 * i:4 * i + 4], spec[4]) for i, spec in enumerate(specs)]
        with torch.autocast(x.device.type, enabled=False):
            return lora_group_linear(x, specs)
    flat = [t for w, b, a, bm, _ in specs for t in (w, b, a, bm)]
    scales = tuple(float(s[4]) for s in specs)
    if not torch.is_grad_enabled() or not (x.requires_grad or any(t is not None and t.requires_grad for t in flat)):
        with torch.no_grad():
            return list(_LoraGroupFn.forward(_NoCtx(), x, scales, *flat))
    return list(_LoraGroupFn.apply(x, scales, *flat))


class _NoCtx:
    """Stand-in ctx for running a Function's forward outside autograd (inference)."""
    needs_input_grad = (False,) * 4096

    def save_for_backward(self, *a):
        pass

    def set_materialize_grads(self, v):
        pass
