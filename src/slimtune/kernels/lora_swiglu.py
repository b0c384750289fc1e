"""Fused LoRA SwiGLU block: y = down(silu(gate(x)) · up(x)) with LoRA on all three projections.

Why: run layer by layer, autograd keeps the block's input x (for dA of gate and up), g and u
(for silu and the product), silu(g) (for the product) and h = silu(g)·u (for dA of down). This
function keeps x, g, u and the two thin N×r projections, and recomputes silu(g) and h in
backward (two elementwise ops). That drops two N×F activations per block, the largest tensors a
Llama-style layer saves, so LoRA training keeps less than the frozen model's own floor in the MLP.
gate's and up's A-projections share one GEMM (x·[A_g;A_u]ᵀ), as do their dA and their LoRA dx.

Shapes: x (..., d)   W_g, W_u (F, d)   W_d (d, F)   A_g (r_g, d)  B_g (F, r_g)  (same for up)
        A_d (r_d, F)   B_d (d, r_d)   y (..., d)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_silu_backward_into = torch.ops.aten.silu_backward.grad_input  # the out= overload


def _forward(x2, wg, bg, ag, bmg, sg, wu, bu, au, bmu, su, wd, bd, ad, bmd, sd, keep: bool):
    """The block's forward on x2 (N, d). keep=True returns what backward needs besides y."""
    rg = ag.shape[0]
    xa = x2 @ torch.cat((ag, au)).t()  # (N, r_g + r_u)
    g = F.linear(x2, wg, bg).addmm_(xa[:, :rg], bmg.t(), alpha=sg)  # (N, F)
    u = F.linear(x2, wu, bu).addmm_(xa[:, rg:], bmu.t(), alpha=su)  # (N, F)
    h = F.silu(g) * u if keep else F.silu(g, inplace=True).mul_(u)  # inference frees g at once
    ha = h @ ad.t()  # (N, r_d)
    y = F.linear(h, wd, bd).addmm_(ha, bmd.t(), alpha=sd)  # (N, d)
    return y, (g, u, xa, ha)


class _LoraSwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scales, wg, bg, ag, bmg, wu, bu, au, bmu, wd, bd, ad, bmd):
        sg, su, sd = scales
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d)
        y, (g, u, xa, ha) = _forward(x2, wg, bg, ag, bmg, sg, wu, bu, au, bmu, su, wd, bd, ad, bmd, sd, keep=True)
        ctx.save_for_backward(x2, g, u, xa, ha, wg, ag, bmg, wu, au, bmu, wd, ad, bmd)
        ctx.scales, ctx.shape = scales, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, xa, ha, wg, ag, bmg, wu, au, bmu, wd, ad, bmd = ctx.saved_tensors
        sg, su, sd = ctx.scales
        nig = ctx.needs_input_grad
        rg = ag.shape[0]
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, d)
        # Three fresh (N, F) buffers, each reused once its value is spent: act, h -> du, dh -> dg.
        act = F.silu(g)  # recomputed: (N, F)
        h = act * u
        gbd = torch.mm(dy2, bmd).mul_(sd)  # (N, r_d)
        d_bmd = torch.mm(dy2.t(), ha).mul_(sd) if nig[13] else None  # (d, r_d)
        d_ad = torch.mm(gbd.t(), h) if nig[12] else None  # (r_d, F)
        dbd = dy2.sum(0) if nig[11] else None
        dh = torch.mm(dy2, wd).addmm_(gbd, ad)  # (N, F)
        du = torch.mul(dh, act, out=h)
        dg = _silu_backward_into(dh.mul_(u), g, grad_input=dh)  # (N, F), in dh's buffer
        d_bmg = torch.mm(dg.t(), xa[:, :rg]).mul_(sg) if nig[5] else None  # (F, r_g)
        d_bmu = torch.mm(du.t(), xa[:, rg:]).mul_(su) if nig[9] else None
        gb = torch.cat((torch.mm(dg, bmg).mul_(sg), torch.mm(du, bmu).mul_(su)), 1)  # (N, r_g + r_u)
        d_acat = torch.mm(gb.t(), x2) if (nig[4] or nig[8]) else None  # (r_g + r_u, d)
        dx = None
        if nig[0]:
            # [A_g; A_u] concatenated again: saving the forward's copy would keep a non-parameter tensor
            dx = torch.mm(dg, wg).addmm_(du, wu).addmm_(gb, torch.cat((ag, au)))  # (N, d)
            dx = dx.view(ctx.shape)
        dbg = dg.sum(0) if nig[3] else None
        dbu = du.sum(0) if nig[7] else None
        d_ag = d_acat[:rg] if nig[4] else None
        d_au = d_acat[rg:] if nig[8] else None
        return dx, None, None, dbg, d_ag, d_bmg, None, dbu, d_au, d_bmu, None, dbd, d_ad, d_bmd


def lora_swiglu(x, gate, up, down):
    """SwiGLU block with one LoRA adapter per projection; each spec is (W (out,in), bias, A, B, scale).

    Base weights must be frozen (the function forms no base-weight gradient); biases may train.
    Equals down(silu(gate(x)) * up(x)) with each projection `lora_reference`.
    """
    if torch.is_autocast_enabled(x.device.type):  # cast once (as autocast would for each GEMM), then run
        from .lora import autocast_inputs

        x, ts = autocast_inputs(x, [t for spec in (gate, up, down) for t in spec[:4]])
        with torch.autocast(x.device.type, enabled=False):
            return lora_swiglu(x, (*ts[0:4], gate[4]), (*ts[4:8], up[4]), (*ts[8:12], down[4]))
    (wg, bg, ag, bmg, sg), (wu, bu, au, bmu, su), (wd, bd, ad, bmd, sd) = gate, up, down
    if wg.requires_grad or wu.requires_grad or wd.requires_grad:
        raise ValueError("lora_swiglu: base weights must be frozen")
    flat = (wg, bg, ag, bmg, wu, bu, au, bmu, wd, bd, ad, bmd)
    if not torch.is_grad_enabled() or not (x.requires_grad or any(t is not None and t.requires_grad for t in flat)):
        shape = x.shape
        y, _ = _forward(x.reshape(-1, shape[-1]), wg, bg, ag, bmg, sg, wu, bu, au, bmu, su, wd, bd, ad, bmd, sd,
                        keep=False)
        return y.view(*shape[:-1], y.shape[-1])
    return _LoraSwiGLUFn.apply(x, (float(sg), float(su), float(sd)), *flat)


def swiglu_reference(x, gate, up, down):
    """The plain composition `lora_swiglu` must equal (tests)."""
    from .lora import lora_reference

    return lora_reference(F.silu(lora_reference(x, *gate)) * lora_reference(x, *up), *down)
