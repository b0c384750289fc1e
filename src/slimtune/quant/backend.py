"""bitsandbytes, seen from slimtune: which layers are quantized, their exact dequantized weight, and
a fresh quantized copy of a dense weight.

Nothing here imports bitsandbytes until a model actually holds one of its layers: such a layer can
only exist once `bitsandbytes` is in `sys.modules`, so `bnb_module()` looks there and a plain
model never pays the import (about a second) or needs the package.

    kind(m)            "4bit" (bnb.nn.Linear4bit: NF4 / FP4) | "8bit" (bnb.nn.Linear8bitLt) | None
    dequantize(m, dt)  the weight the kernel multiplies by, (out, in), in `dt`
    requantize(w, m)   a new layer of m's kind and settings holding the dense weight w
"""
from __future__ import annotations

import sys
from typing import Iterator

import torch
import torch.nn as nn

from ..config import ConfigError

INSTALL_HINT = "pip install 'slimtune[quant]' (bitsandbytes>=0.50,<0.51)"


class QuantizationError(ConfigError):
    """A quantized base that cannot be used as asked; the message names the reason and the fix."""


def bnb_module():
    """The imported bitsandbytes package, or None when nothing has imported it (so no model can
    hold one of its layers)."""
    return sys.modules.get("bitsandbytes")


def require_bitsandbytes(what: str = "a 4-bit or 8-bit base"):
    """Import bitsandbytes for `what`, or raise one QuantizationError naming the fix: the package is
    missing, fails to import on this platform, or has no native library for it."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise QuantizationError(f"{what} needs the bitsandbytes package, which is not installed ({e}); "
                                f"{INSTALL_HINT}") from None
    except Exception as e:  # noqa: BLE001 - a broken build raises anything on import
        raise QuantizationError(f"{what}: bitsandbytes is installed but does not import on this platform "
                                f"({type(e).__name__}: {str(e)[:200]}); reinstall a build for this machine "
                                f"({INSTALL_HINT}) or train without quantization") from None
    try:
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except ImportError:  # another layout of the package: its own errors will speak
        return bnb
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        raise QuantizationError(f"{what}: bitsandbytes {bnb.__version__} has no native library for this platform "
                                f"({str(getattr(lib, 'error_msg', ''))[:200].strip()}); install a build that "
                                f"supports it ({INSTALL_HINT}) or train without quantization")
    return bnb


def kind(m: nn.Module) -> str | None:
    """"4bit", "8bit" or None: dispatch by type, as everywhere in slimtune."""
    bnb = bnb_module()
    if bnb is None:
        return None
    if isinstance(m, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(m, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of every bitsandbytes linear in `model`."""
    if bnb_module() is None:
        return
    for name, m in model.named_modules():
        if kind(m) is not None:
            yield name, m


def is_quantized_model(model: nn.Module) -> bool:
    return next(quantized_linears(model), None) is not None


def compute_dtype(m: nn.Module) -> torch.dtype:
    """The dtype the layer's matmul runs in. 4-bit: `bnb_4bit_compute_dtype` (bitsandbytes takes
    the input's dtype when none was given), else the dtype the weight was quantized from. 8-bit:
    bitsandbytes computes in the input's dtype; the bias's dtype is the best record of it, else fp32."""
    if kind(m) == "4bit":
        cd = getattr(m, "compute_dtype", None)
        return cd if cd is not None else m.weight.quant_state.dtype
    b = getattr(m, "bias", None)
    return b.dtype if b is not None else torch.float32


def storage_dtype(m: nn.Module) -> torch.dtype:
    """The dtype the weight had before quantization (what a dense copy of the model would use)."""
    if kind(m) == "4bit":
        return m.weight.quant_state.dtype
    return compute_dtype(m)


def _int8_parts(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 (out, in), SCB (out,)): after the first forward bitsandbytes moves them to m.state."""
    st = m.state
    cb = st.CB if st.CB is not None else m.weight.data
    scb = st.SCB if st.SCB is not None else m.weight.SCB
    if scb is None:
        raise QuantizationError("this Linear8bitLt holds no quantized weight yet (its weight is not int8); "
                                "move the model to its device first (model.to('cpu') or 'cuda') so bitsandbytes quantizes it")
    return cb, scb


def dequantize(m: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The exact weight the bitsandbytes kernel uses, (out, in), in `dtype`.

    4-bit: bitsandbytes' own dequantize op, the one its matmul runs, in `dtype`; nested absmax (double
    quant) expanded as its matmul does. 8-bit: CB·(SCB/127),
    the formula of its training matmul. Raises if the CPU repack (prepare.guard_cpu_repack) has
    rewritten the layout: call the guard first."""
    k = kind(m)
    if k is None:
        return m.weight.to(dtype)
    if k == "8bit":
        if m.weight.dtype != torch.int8:  # has_fp16_weights=True: a float weight, quantized per call
            return m.weight.to(dtype)
        cb, scb = _int8_parts(m)
        return cb.to(torch.float32).mul_(scb.unsqueeze(1).to(torch.float32).mul(1.0 / 127.0)).to(dtype)
    import bitsandbytes.functional as bf

    w = m.weight
    qs = w.quant_state
    if qs is None:
        raise QuantizationError("this Linear4bit is not quantized yet; move it to its device (.to('cpu') or "
                                ".to('cuda')) so bitsandbytes quantizes it")
    if getattr(qs, "packing_format_for_cpu", False):
        raise QuantizationError("this Linear4bit's weight was repacked to bitsandbytes' AVX512-BF16 inference "
                                "layout; call slimtune.quant.guard_cpu_repack(model) first")
    absmax = qs.absmax
    if qs.nested:
        absmax = bf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    # The op bitsandbytes' own matmul calls (gemm_4bit: dequantize_4bit(..., compute dtype) + linear),
    # with the dtype asked for: in the compute dtype this is the very weight the kernel multiplies by.
    op_dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    out = torch.ops.bitsandbytes.dequantize_4bit.default(w.data, absmax.float(), qs.blocksize, qs.quant_type,
                                                         qs.shape, op_dtype)
    return out if out.dtype == dtype else out.to(dtype)


def requantize(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Module:
    """A new bitsandbytes layer with the kind and settings of `like` (quant type, block size,
    double quant, compute dtype, storage; or 8-bit threshold) holding the dense `weight` (out, in).
    This is the lossy step: the caller measures what it costs."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    dev = weight.device
    k = kind(like)
    if k == "4bit":
        qs = like.weight.quant_state
        new = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=like.compute_dtype,
                                compress_statistics=bool(qs.nested), quant_type=qs.quant_type,
                                quant_storage=like.weight.quant_storage, device="meta")
        new.weight = bnb.nn.Params4bit(weight.detach().to("cpu", storage_dtype(like)).contiguous(), requires_grad=False,
                                       blocksize=qs.blocksize, compress_statistics=bool(qs.nested),
                                       quant_type=qs.quant_type, quant_storage=like.weight.quant_storage, module=new)
        new.support_avx512bf16_for_cpu = False  # the eval-time repack breaks training (prepare.py)
    elif k == "8bit":
        st = like.state
        new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                  threshold=st.threshold, device="meta")
        new.weight = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float16).contiguous(), requires_grad=False,
                                       has_fp16_weights=False)
    else:
        raise TypeError(f"requantize: {type(like).__name__} is not a bitsandbytes linear")
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone().to("cpu"), requires_grad=False)
    return new.to(dev)  # quantization happens here (bitsandbytes quantizes on .to(device))


def param_count(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight (bnb Params4bit) holds two per byte of
    its storage, so it counts its unpacked size, as PEFT's print_trainable_parameters does."""
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def layer_bytes(m: nn.Module) -> int:
    """Bytes a bitsandbytes linear holds: packed weight + its quantization state (absmax, nested
    absmax, code) + bias."""
    n = m.weight.numel() * m.weight.element_size()
    if kind(m) == "4bit" and m.weight.quant_state is not None:
        qs = m.weight.quant_state
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            n += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        if qs.nested:
            n += sum(t.numel() * t.element_size() for t in (qs.state2.absmax, qs.state2.code))
    elif kind(m) == "8bit":
        _, scb = _int8_parts(m)
        n += scb.numel() * scb.element_size()
    b = getattr(m, "bias", None)
    return n + (b.numel() * b.element_size() if b is not None else 0)
