"""Fused RMSNorm / RoPE / SwiGLU / chunked linear-cross-entropy from liger-kernel, GPU only.

    from slimtune.kernels.fused_ops import apply_fused_ops
    path = apply_fused_ops(model)   # "liger" or "stock"; logs which and why

These cut the *frozen* model's own cost (elementwise norm/activation kernels, and the logits
tensor: the fused linear-cross-entropy never materialises the (tokens × vocab) logits, it runs
the head and the loss chunk by chunk), so a LoRA step can end up below the stock frozen floor.

liger-kernel is Triton, so it runs on CUDA tensors only; it is an optional dependency
(`pip install 'slimtune[gpu]'`). Where it cannot apply — CPU model, package missing, a model type
liger does not know — the model is left as it is and a warning says so: no silent fallback.
Patching is per model instance, except RoPE, which liger swaps in the model family's module
(every model of that family in the process).
"""
from __future__ import annotations

import logging

import torch.nn as nn

log = logging.getLogger("slimtune.kernels")


def liger_status(model: nn.Module) -> tuple[bool, str]:
    """(can apply, reason) for liger-kernel on this model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    p = next(inner.parameters(), None)
    if p is None or p.device.type != "cuda":
        return False, "model is not on a CUDA device (liger-kernel is Triton/GPU-only)"
    try:
        import liger_kernel
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        return False, f"liger-kernel is not installed ({e}); pip install 'slimtune[gpu]'"
    mt = getattr(getattr(inner, "config", None), "model_type", None)
    if mt not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False, f"liger-kernel {getattr(liger_kernel, '__version__', '?')} has no kernels for model type {mt!r}"
    return True, f"liger-kernel for model type {mt!r}"


def apply_fused_ops(model: nn.Module, rope: bool = True, rms_norm: bool = True, swiglu: bool = True,
                    fused_linear_cross_entropy: bool = True) -> str:
    """Swap liger-kernel's fused ops into `model` (a transformers model or a PeftModel around one).

    Returns "liger" when applied, "stock" when not (with a warning naming the reason). Call it
    before or after get_peft_model: LoRA layers stay in place (liger's SwiGLU calls the
    gate/up/down modules, so adapted projections keep their adapters).
    """
    ok, why = liger_status(model)
    if not ok:
        log.warning("fused ops: stock PyTorch path — %s", why)
        return "stock"
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=inner, rope=rope, rms_norm=rms_norm, swiglu=swiglu,
                                    fused_linear_cross_entropy=fused_linear_cross_entropy, cross_entropy=False)
    log.info("fused ops: %s (rope=%s rms_norm=%s swiglu=%s fused_linear_cross_entropy=%s)", why, rope, rms_norm,
             swiglu, fused_linear_cross_entropy)
    return "liger"
