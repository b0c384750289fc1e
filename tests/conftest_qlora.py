"""Quantized tiny models for the QLoRA tests: a random-init Llama saved once, loaded through
transformers' own bitsandbytes integration (`from_pretrained(quantization_config=...)`), exactly as a
PEFT user loads a 4-bit / 8-bit base. Widths are multiples of 32 so bitsandbytes' CPU repack
(quant/prepare.py) can run on every layer when a test forces it."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 128


def save_tiny_llama(path: Path, hidden: int = 64) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("qlora_llama"))


def bnb(quant: str = "nf4", double_quant: bool = True, compute=torch.float32):
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute)


def load(path: Path, quant: str | None = "nf4", guard: bool = True, **kw):
    """The model as from_pretrained returns it (eval mode); quant None: the full-precision model.

    guard (default): bitsandbytes' CPU repack turned off at load, as slimtune's own loaders do
    (job, eval, merge; quant/prepare.py), so a reference forward on this model (ours, or peft's on
    the same base) multiplies by the checkpoint's weights on every CPU. Without it, on an
    AVX512-BF16 CPU the first eval forward without gradients repacks every Linear4bit into a bf16
    inference layout (rounded block scales, another kernel): a different model. guard=False is
    the raw transformers load, for the tests of that hazard."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if quant is None:  # (a checkpoint saved quantized still loads quantized: guarded below too)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb(quant, **kw))
    if guard:
        from slimtune.quant import guard_cpu_repack

        guard_cpu_repack(model)
    return model


def dense_twin(path: Path, qmodel):
    """The full-precision model with every quantized linear replaced by its exact dequantized weight:
    what the quantized model must compute, as plain torch."""
    from slimtune.quant import dequantize, quantized_linears

    ref = load(path, None)
    sd = ref.state_dict()
    for name, layer in quantized_linears(qmodel):
        sd[name.replace(".base_layer", "") + ".weight"] = dequantize(layer)  # also when adapters wrap it
    ref.load_state_dict(sd)
    return ref


def batch(seed: int = 0, b: int = 2, t: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def force_cpu_repack(model) -> int:
    """Set every Linear4bit as bitsandbytes does on an AVX512-BF16 CPU (support_avx512bf16_for_cpu =
    True): on this CPU too, an eval() forward without gradients then repacks the weight."""
    from slimtune.quant import quantized_linears

    n = 0
    for _, m in quantized_linears(model):
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = True
            n += 1
    return n


def is_repacked(model) -> list[bool]:
    from slimtune.quant import quantized_linears

    return [bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for _, m in quantized_linears(model)
            if hasattr(m.weight, "quant_state")]
