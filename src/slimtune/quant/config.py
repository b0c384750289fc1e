"""The BitsAndBytesConfig for the job's `model.quantize` keys, and what quantizing saved.

    model: {name: smollm2-135m, quantize: nf4, double_quant: true, compute_dtype: auto}

nf4 / fp4: 4-bit weights (bnb.nn.Linear4bit), NF4 being QLoRA's data type; int8: LLM.int8()
(bnb.nn.Linear8bitLt). The output head and the task heads stay unquantized (a trained head
needs a dense weight).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import backend as qb

QUANTIZE = ("nf4", "fp4", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bnb_config(quantize: str, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
               skip_modules: list[str] | None = None):
    """transformers' BitsAndBytesConfig for one of QUANTIZE; raises QuantizationError naming the fix
    when bitsandbytes is missing or cannot run here."""
    if quantize not in QUANTIZE:
        raise qb.QuantizationError(f"quantize={quantize!r}: use one of {', '.join(QUANTIZE)} (or none)")
    qb.require_bitsandbytes(f"quantize: {quantize}")
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)


@dataclass
class QuantizedSize:
    """Bytes of a quantized model: the quantized linears (packed weights + their scales) against
    the same linears dense in bf16 and in the dtype they were loaded in, and the whole model."""

    layers: int
    quant_bytes: int  # the quantized linears as held (weights, absmax, codes, biases)
    bf16_bytes: int  # the same linears dense in bf16
    dense_bytes: int  # the same linears dense in their original dtype
    model_bytes: int  # every parameter and buffer of the model, quantized linears as held
    kind: str

    @property
    def model_dense_bytes(self) -> int:
        return self.model_bytes - self.quant_bytes + self.dense_bytes

    def line(self) -> str:
        mib = 2 ** 20
        return (f"quantization: {self.kind}, {self.layers} linears {self.dense_bytes / mib:.1f} MiB -> "
                f"{self.quant_bytes / mib:.1f} MiB ({self.quant_bytes / self.bf16_bytes:.3f}x their bf16 bytes); "
                f"model weights {self.model_dense_bytes / mib:.1f} -> {self.model_bytes / mib:.1f} MiB "
                f"(saved {(self.dense_bytes - self.quant_bytes) / mib:.1f} MiB)")


def quantized_size(model: nn.Module) -> QuantizedSize | None:
    """QuantizedSize of `model`, or None when it holds no quantized linear."""
    layers = list(qb.quantized_linears(model))
    if not layers:
        return None
    seen: set[int] = set()
    quant = bf16 = dense = 0
    kinds: set[str] = set()
    for _, m in layers:
        quant += qb.layer_bytes(m)
        n = m.in_features * m.out_features
        b = m.bias.numel() if m.bias is not None else 0
        item = torch.tensor([], dtype=qb.storage_dtype(m)).element_size()
        bf16 += 2 * (n + b)
        dense += item * (n + b)
        seen.update(id(p) for p in m.parameters())
        k = qb.kind(m)
        if k == "8bit":
            kinds.add("int8")
        else:
            qs = m.weight.quant_state
            kinds.add(f"{qs.quant_type}{' + double quant' if qs.nested else ''}, compute "
                      f"{str(qb.compute_dtype(m)).replace('torch.', '')}")
    rest = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if id(t) not in seen)
    return QuantizedSize(len(layers), quant, bf16, dense, rest + quant, "/".join(sorted(kinds)))


def load_kwargs(quantize: str, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                skip_modules: list[str] | None = None) -> dict:
    """from_pretrained keyword arguments that quantize on load: the BitsAndBytesConfig, and on a GPU
    the device map that places (and so quantizes) the weights there, QLoRA's usual recipe."""
    kw: dict = {"quantization_config": bnb_config(quantize, double_quant, compute_dtype, skip_modules)}
    if torch.cuda.is_available():
        kw["device_map"] = {"": torch.cuda.current_device()}
    return kw


def run_quantization(adapter_dir: str) -> dict | None:
    """The `model:` block of the run an adapter folder belongs to (RUN/best, RUN/adapter, a
    checkpoint's adapter), when that run quantized its base; else None."""
    from pathlib import Path

    import yaml

    p = Path(adapter_dir).resolve()
    for parent in (p.parent, p.parent.parent, p.parent.parent.parent):
        cfg = parent / "config.yaml"
        if cfg.is_file():
            try:
                model = (yaml.safe_load(cfg.read_text()) or {}).get("model")
            except yaml.YAMLError:
                return None
            if isinstance(model, dict) and model.get("quantize", "none") != "none":
                return model
            return None
    return None


def merge_quantization(adapter_dir: str, quantize: str | None, double_quant: bool | None,
                       compute_dtype: str | None) -> tuple[dict | None, str | None]:
    """(from_pretrained kwargs or None, a line saying what was chosen) for merging an adapter:
    explicit flags win, else the adapter's run (its config.yaml `model:` block), else no quantization."""
    run = run_quantization(adapter_dir) or {}
    q = quantize or run.get("quantize", "none")
    if q == "none":
        return None, None
    dq = double_quant if double_quant is not None else bool(run.get("double_quant", True))
    cd = compute_dtype or (run.get("compute_dtype") if run.get("compute_dtype", "auto") != "auto" else "fp32")
    src = "as its run trained" if quantize is None else "as asked"
    note = (f"base quantized {q}{' + double quant' if dq and q != 'int8' else ''} (compute {cd}) {src}; "
            "the merge dequantizes it exactly: dequantize(W_q) + ΔW")
    return load_kwargs(q, dq, DTYPES[cd]), note


def detach_from_checkpoint(model: nn.Module) -> int:
    """Copy the unquantized tensors (embeddings, norms, head) out of the memory-mapped checkpoint.

    transformers loads safetensors zero-copy: those tensors stay views of the mapped file, which keeps
    the whole mapping alive, and quantizing on load has read every page of it, so the process holds
    the full dense checkpoint resident next to the quantized model (measured on SmolLM2-135M: 522 MiB
    of file pages after an NF4 load, 116 MiB after this). Returns the bytes copied."""
    skip = {id(p) for _, m in qb.quantized_linears(model) for p in m.parameters()}
    n = 0
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) not in skip and t.device.type == "cpu":
                t.data = t.data.clone()
                n += t.numel() * t.element_size()
    return n
