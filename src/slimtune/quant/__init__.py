"""Quantized bases (QLoRA): bitsandbytes 4-bit (NF4, FP4) and 8-bit layers under slimtune's adapters.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    model = slimtune.prepare_model_for_kbit_training(model)     # PEFT's name and meaning
    model = slimtune.get_peft_model(model, LoraConfig(...))     # LoRA / DoRA / (IA)³ on Linear4bit
    merged = model.merge_and_unload()                           # dequantize(W_q) + ΔW, a plain model
    small, cost = slimtune.quant.merge_and_requantize(model, probe)   # or re-quantized, cost printed

The layers are in `methods/lora_quant.py`, their fused autograd node in `kernels/lora_quant.py`.
"""
from .backend import QuantizationError, dequantize, is_quantized_model, kind, quantized_linears, require_bitsandbytes
from .config import QUANTIZE, bnb_config, quantized_size
from .merge import RequantizeCost, dequantize_model, merge_and_requantize
from .prepare import check_method, guard_cpu_repack, on_inject, prepare_model_for_kbit_training
from ..methods import lora_quant as _layers  # noqa: F401  (registers the quantized layer variants)

__all__ = ["QuantizationError", "dequantize", "is_quantized_model", "kind", "quantized_linears",
           "require_bitsandbytes", "QUANTIZE", "bnb_config", "quantized_size", "RequantizeCost", "dequantize_model",
           "merge_and_requantize", "check_method", "guard_cpu_repack", "on_inject", "prepare_model_for_kbit_training"]
