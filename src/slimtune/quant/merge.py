"""Merging adapters trained on a quantized base: exactly (dense), or re-quantized with its cost measured.

    merge_and_unload()              every linear = dequantize(W_q) + ΔW (never re-quantized), a plain model
    merge_and_requantize(m, probe)  the merged linears quantized again like their base, and what that
                                    costs: max / mean |output difference| vs the unmerged model on `probe`

PEFT merges into a 4-bit base by re-quantizing in place, silently lossy (its users' top complaint);
here the lossy step only happens when asked for, and is measured when it does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import backend as qb

log = logging.getLogger("slimtune.quant")


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _strip_quantization(model: nn.Module) -> None:
    """The markers transformers keeps on a quantized model (its quantizer, config.quantization_config,
    is_loaded_in_4bit/8bit), removed through the quantizer's own method, so save_pretrained writes
    a plain checkpoint."""
    hq = getattr(model, "hf_quantizer", None)
    if hq is not None and hasattr(hq, "remove_quantization_config"):
        hq.remove_quantization_config(model)
    else:
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                delattr(model, attr)
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "_is_quantized", False):
        cfg._is_quantized = False


def merged_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the plain model: the compute dtype its 4-bit layers share (bnb_4bit_compute_dtype);
    for 8-bit layers, which compute in their input's dtype, the dtype most of the model's other
    (unquantized) weights are in."""
    from ..methods.lora_quant import DequantizedLinear

    dts = {qb.compute_dtype(m) for _, m in qb.quantized_linears(model) if qb.kind(m) == "4bit"}
    dense = [m for m in model.modules() if isinstance(m, DequantizedLinear)]
    dts |= {m.weight.dtype for m in dense if m.quant_kind == "4bit"}
    if len(dts) == 1:
        return dts.pop()
    skip = {id(p) for m in dense for p in m.parameters()}
    skip |= {id(p) for _, m in qb.quantized_linears(model) for p in m.parameters()}
    count: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in skip:
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else None


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Every bitsandbytes linear and every merged dense copy of one replaced by a plain nn.Linear,
    transformers' quantization markers removed, the whole model in one dtype (the layers' compute
    dtype unless `dtype` says otherwise), so it runs, saves and loads as a plain model. A model with
    no quantized layer comes back untouched (without importing bitsandbytes)."""
    from ..methods.lora_quant import DequantizedLinear

    if qb.bnb_module() is None:
        return model
    quant = list(qb.quantized_linears(model))
    dense = [(n, m) for n, m in model.named_modules() if isinstance(m, DequantizedLinear)]
    if not quant and not dense and not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        return model
    dtype = dtype or merged_dtype(model) or torch.float32
    from ..inject import replace_module

    for path, m in quant:
        replace_module(model, path, _plain_linear(qb.dequantize(m, dtype), None if m.bias is None else m.bias.detach().to(dtype)))
    for path, m in dense:
        replace_module(model, path, _plain_linear(m.weight.detach().to(dtype), None if m.bias is None else m.bias.detach().to(dtype)))
    _strip_quantization(model)
    model.to(dtype)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "dtype"):
        cfg.dtype = dtype
    log.info("merge: %d quantized linears dequantized exactly (%d with a merged adapter); plain model in %s",
             len(quant) + len(dense), len(dense), dtype)
    return model


@dataclass
class RequantizeCost:
    """What re-quantizing the merged model costs, measured on a probe batch: output differences
    (logits, or the first output tensor) against the unmerged quantized model."""

    max_abs: float
    mean_abs: float
    exact_max_abs: float  # the exact (dense) merge against the same reference: rounding only
    layers: int
    kinds: str
    probe_shape: tuple

    def __str__(self) -> str:
        return (f"re-quantizing {self.layers} merged linears ({self.kinds}) costs: max |Δ| {self.max_abs:.4g}, mean |Δ| "
                f"{self.mean_abs:.4g} on the probe's outputs {tuple(self.probe_shape)} vs the unmerged model "
                f"(the exact dense merge: max |Δ| {self.exact_max_abs:.2g})")


def _output(model: nn.Module, probe) -> torch.Tensor:
    out = model(**probe) if isinstance(probe, dict) else model(probe)
    if isinstance(out, torch.Tensor):
        return out.float()
    t = getattr(out, "logits", None)
    return (t if t is not None else out[0]).float()


@torch.no_grad()
def merge_and_requantize(peft_model: nn.Module, probe, adapter_names: list[str] | None = None,
                         log_fn=print) -> tuple[nn.Module, RequantizeCost]:
    """Merge the adapters into their quantized base and quantize the merged linears again like it
    (same quant type, block size, double quant, compute dtype); the other quantized layers stay as
    they are. Returns (the model, its measured cost), and prints the cost.

    `probe`: a batch the model takes (a dict of tensors, or input_ids), e.g. a few training rows."""
    from ..inject import adapter_layers, replace_module, unwrap
    from ..methods.lora_quant import QuantBase

    tuner = peft_model.base_model
    root = tuner.model
    was_training = peft_model.training
    peft_model.eval()
    ref = _output(peft_model, probe)
    tuner.merge_adapter(adapter_names)
    exact = _output(peft_model, probe)
    keep = (adapter_names or tuner.active_adapters)[0]
    kinds: set[str] = set()
    n = 0
    for path, layer in list(adapter_layers(root)):
        if not isinstance(layer, QuantBase) or not layer.merged:
            continue
        quant, dense = layer.quantized_base(), layer.get_base_layer()
        replace_module(root, path, qb.requantize(dense.weight, dense.bias, like=quant))
        kinds.add("int8" if qb.kind(quant) == "8bit" else quant.weight.quant_state.quant_type)
        n += 1
    model = unwrap(root, keep_adapter=keep)
    from .prepare import guard_cpu_repack

    guard_cpu_repack(model)
    got = _output(model, probe)
    diff = (got - ref).abs()
    cost = RequantizeCost(float(diff.max()), float(diff.mean()), float((exact - ref).abs().max()), n,
                          "/".join(sorted(kinds)) or "none", tuple(ref.shape))
    model.train(was_training)
    if log_fn is not None:
        log_fn(str(cost))
    return model, cost
