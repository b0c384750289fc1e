"""Block-level LoRA: a Llama-style SwiGLU MLP whose gate, up and down all carry LoRA runs as one
autograd node (`kernels/lora_swiglu.py`), which keeps two fewer N×F activations per layer.

Found structurally, never by class name: a module whose children `gate_proj`, `up_proj` and
`down_proj` are LoRA Linear layers and whose `act_fn` is SiLU, and whose own forward, checked
once on a 3-token probe, equals down(silu(gate(x)) · up(x)). Any other MLP keeps its forward.
Per call the fused node runs only when it computes exactly what the layers would (one active
adapter on each, not merged or disabled, no dropout mask, no mixed batch, frozen base weights);
under autocast it runs in the autocast dtype, as the layers would; otherwise the block's own forward runs, layer by layer.

Forward hooks on gate_proj / up_proj / down_proj do not fire while the fused node runs (the
block's own hooks do); set FUSE_SWIGLU = False to keep them.
"""
from __future__ import annotations

import logging
import weakref

import torch
import torch.nn as nn

from ..inject import install_block_forward, installed_block_forward, original_forward
from ..kernels.lora_swiglu import lora_swiglu
from .lora_layers import Linear

log = logging.getLogger(__name__)

FUSE_SWIGLU = True  # False: every projection through its own LoRA layer (ablation, forward hooks)
_PROJ = ("gate_proj", "up_proj", "down_proj")
_REJECTED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # probed and not a plain SwiGLU block


def swiglu_forward(block: nn.Module, x, *args, **kwargs):
    """The fused forward installed on a SwiGLU MLP (inject.install_block_forward)."""
    specs = _specs(block, x) if FUSE_SWIGLU and not args and not kwargs else None
    if specs is None:
        return original_forward(block, x, *args, **kwargs)
    return lora_swiglu(x, *specs)


def _specs(block: nn.Module, x: torch.Tensor, dropout_ok: bool = False) -> list | None:
    """(W, b, A, B, s) per projection when the fused node is exact for this call, else None."""
    specs = []
    for name in _PROJ:
        layer = getattr(block, name)
        if type(layer) is not Linear or layer._mixed is not None:
            return None
        fast = layer._fast_args(x)
        if fast is None:
            return None
        w, b, a, bm, s, drop = fast
        if w.requires_grad or (not dropout_ok and drop.training and not isinstance(drop, nn.Identity) and drop.p > 0):
            return None
        specs.append((w, b, a, bm, s))
    return specs


def _is_swiglu_candidate(m: nn.Module) -> bool:
    act = getattr(m, "act_fn", None)
    return (all(type(getattr(m, p, None)) is Linear for p in _PROJ)
            and isinstance(act, nn.Module) and type(act).__name__ in ("SiLU", "SiLUActivation"))


@torch.no_grad()
def _probe(block: nn.Module) -> bool | None:
    """Does the block's own forward equal the fused node? (3 random tokens, the active adapter,
    dropout off). None: cannot tell now (no common active adapter, merged, meta weights)."""
    gate = block.gate_proj
    w = gate.get_base_layer().weight
    if w.device.type == "meta" or not w.is_floating_point():
        return None
    x = torch.randn(1, 3, gate.in_features, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    specs = _specs(block, x, dropout_ok=True)
    if specs is None:
        return None
    was_training = block.training
    block.eval()  # the reference without dropout masks
    try:
        ref = original_forward(block, x)
        got = lora_swiglu(x, *specs)
    except Exception as e:  # a forward that needs more than x: not a plain SwiGLU block
        log.debug("not fusing %s: %s", type(block).__name__, e)
        return False
    finally:
        block.train(was_training)
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    return isinstance(ref, torch.Tensor) and ref.shape == got.shape and bool(
        ((ref.float() - got.float()).abs().max() <= tol * (1 + ref.float().abs().max())).item())


def fuse_swiglu_blocks(model: nn.Module) -> int:
    """Install the fused forward on every SwiGLU MLP of `model` that passes the probe; returns
    how many blocks run fused. Idempotent: call after every injection and adapter switch."""
    n = 0
    for path, m in model.named_modules():
        if installed_block_forward(m) is swiglu_forward:
            n += 1
            continue
        # An instance-level forward is someone else's (e.g. accelerate's offload hooks): leave it.
        if m in _REJECTED or "forward" in m.__dict__ or not _is_swiglu_candidate(m):
            continue
        ok = _probe(m)
        if ok:
            install_block_forward(m, swiglu_forward)
            n += 1
        elif ok is False:
            _REJECTED.add(m)
            log.info("LoRA: %s (%s) looks like a SwiGLU MLP but its forward differs; its projections run "
                     "one by one", path, type(m).__name__)
    return n
