"""Getting a quantized base ready to train under: PEFT's `prepare_model_for_kbit_training`, the guard
against bitsandbytes' CPU repack, and the methods a quantized base cannot take.

The repack (bitsandbytes 0.50 on CPUs with AVX512-BF16): a `Linear4bit` in eval() mode whose input
needs no gradient rewrites its weight in place into a bf16 inference layout, and from then on its
matmul takes a kernel with no autograd, so LoRA gradients through it are silently wrong (and
layers whose width is not a multiple of 32 crash). `from_pretrained` returns models in eval mode
and the job evaluates before it trains, so that is the default path. `guard_cpu_repack` turns the
repack off on every `Linear4bit` (and undoes one that already happened, with a warning: the repack
rounded the block scales to bf16). slimtune calls it whenever it meets a quantized base: here,
when an adapter is injected (`on_inject`), and when the job loads a model.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

from .backend import QuantizationError, is_quantized_model, kind, quantized_linears

log = logging.getLogger("slimtune.quant")

# Methods that train or rewrite the base weights themselves: a 4-bit / 8-bit weight has no
# gradient and cannot take an exact in-place update, and dequantizing it to train would upcast the
# whole base. Each entry: (why, what to do instead).
REFUSED: dict[str, str] = {
    "full": "full fine-tuning trains every weight, and a 4-bit/8-bit weight has no gradient",
    "layerwise": "layer-wise training trains whole blocks' weights in place, and 4-bit/8-bit weights have no gradient",
    "sparse": "sparse fine-tuning adds its delta into the weights themselves, which a 4-bit/8-bit weight cannot "
              "hold exactly",
    "heads": "head tuning trains slices of the attention weights in place, which 4-bit/8-bit weights cannot take",
    "singular": "singular-value tuning needs each weight's dense SVD factors, which would upcast the whole base",
    # issue 26's methods: their layers compute with the dense base weight (no 4-/8-bit variant yet)
    **{m: f"{m}'s layers compute with the dense base weight, which a 4-bit/8-bit layer does not hold (no quantized "
          f"{m} layer yet)" for m in ("loha", "lokr", "vera", "oft")},
}
FIX = ("use lora (QLoRA), dora or ia3 on the quantized base, or load the model without quantization "
       "(drop quantization_config / model.quantize)")


def guard_cpu_repack(model: nn.Module) -> int:
    """Keep every `Linear4bit` of `model` on its autograd-safe layout; returns how many layers
    held one. A layer an earlier eval pass already repacked is converted back (its block scales
    stay rounded to bf16, as the repack left them; a warning says so)."""
    n = 0
    restored = 0
    for _, m in quantized_linears(model):
        if kind(m) != "4bit":
            continue
        n += 1
        m.support_avx512bf16_for_cpu = False
        qs = getattr(m.weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)
            m.quant_state = m.weight.quant_state
            restored += 1
    if restored:
        warnings.warn(f"{restored} Linear4bit layer(s) had been repacked by bitsandbytes' CPU inference path (an "
                      "eval() forward without gradients on an AVX512-BF16 CPU) and were converted back so training "
                      "gets correct gradients; that repack rounded their block scales to bf16, so the weights now "
                      "differ slightly from the checkpoint. For the exact weights, reload the model and call "
                      "prepare_model_for_kbit_training (or get_peft_model) before any eval forward.", stacklevel=2)
    return n


def refuse_method(method: str) -> None:
    """Raise if `method` cannot train on a quantized base (the job asks before loading the model)."""
    if method in REFUSED:
        raise QuantizationError(f"{method} cannot train on a quantized base: {REFUSED[method]}; {FIX}")


def check_method(method: str, model: nn.Module) -> None:
    """Refuse, before anything changes, a method that cannot work on `model` if it is quantized."""
    if method in REFUSED and is_quantized_model(model):
        refuse_method(method)


def on_inject(model: nn.Module, method: str) -> None:
    """What every tuner runs before injecting into a model (tuner.Tuner.__init__): on a quantized
    base, refuse the methods that cannot work and guard against the CPU repack. Free for a plain
    model (no bitsandbytes import)."""
    if not is_quantized_model(model):
        return
    check_method(method, model)
    guard_cpu_repack(model)


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """PEFT's function, same name, arguments and meaning: freeze every parameter; cast the
    parameters that are not quantized (norms, embeddings, head) from fp16/bf16 to fp32; on a
    quantized model with gradient checkpointing, make the input embeddings' output require grad
    (for reentrant checkpointing) and turn checkpointing on. Plus slimtune's guard against the
    bitsandbytes CPU repack (see the module docstring).

    On a model with no quantized layer the fp32 cast is every weight: that is PEFT's behaviour,
    kept, but said in a warning with the size, never silently."""
    kwargs = dict(gradient_checkpointing_kwargs or {})
    quantized = is_quantized_model(model) or bool(getattr(model, "is_loaded_in_4bit", False)
                                                   or getattr(model, "is_loaded_in_8bit", False))
    for p in model.parameters():
        p.requires_grad_(False)
    cast = 0
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
            cast += p.numel()
            p.data = p.data.to(torch.float32)
    if cast and not quantized:
        warnings.warn(f"prepare_model_for_kbit_training: this model has no quantized layers, so casting its "
                      f"fp16/bf16 parameters to fp32 upcast the whole base ({cast / 1e6:.1f}M parameters, "
                      f"+{cast * 2 / 2**20:.0f} MiB); load it with a quantization_config for QLoRA", stacklevel=2)
    elif cast:
        log.info("prepare_model_for_kbit_training: %.1fM non-quantized parameters cast to fp32", cast / 1e6)
    if auto_clear_cache and cast and torch.cuda.is_available():
        torch.cuda.empty_cache()
    guard_cpu_repack(model)
    if quantized and use_gradient_checkpointing:
        kwargs.setdefault("use_reentrant", True)  # PEFT's meaning: reentrant unless told otherwise
        if kwargs["use_reentrant"]:  # reentrant checkpointing needs an input that requires grad
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        if hasattr(model, "activation_checkpointing_enable"):  # transformers' current name (compat.py)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
