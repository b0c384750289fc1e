"""Training-time speed and memory options (train.*): gradient checkpointing, per-block
torch.compile, activation offload. Each either applies or raises a JobConfigError naming the fix."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..compat import enable_activation_checkpointing
from ..compile_blocks import compile_blocks
from .config import JobConfigError, TrainConfig


def enable_gradient_checkpointing(base: nn.Module, log: Callable[[str], None]) -> None:
    """Recompute each block's activations in backward (non-reentrant), as transformers offers it."""
    if not enable_activation_checkpointing(base, use_reentrant=False):
        log(f"gradient_checkpointing: {type(base).__name__} does not support it; running without")
        return
    if hasattr(base, "enable_input_require_grads"):  # frozen embeddings: let grads reach the blocks
        base.enable_input_require_grads()
    if hasattr(base.config, "use_cache"):
        base.config.use_cache = False


def compile_for_training(model: nn.Module, t: TrainConfig, cuda: bool, log: Callable[[str], None]) -> None:
    """train.compile: every transformer block under torch.compile; on a GPU without it, a tip."""
    if not t.compile:
        if cuda:
            log("tip: train.compile: true (or reduce-overhead) made LoRA steps 1.5-1.7x faster on an H100 in "
                "slimtune's benchmark (0.85B and 6.7B Llama); the first steps pay the compile")
        return
    mode = None if t.compile in (True, "default") else t.compile
    try:
        n = len(compile_blocks(model, mode=mode))
    except ValueError as e:
        raise JobConfigError(f"train.compile: {e}; set train.compile: false") from None
    log(f"compile: {n} blocks under torch.compile ({mode or 'default'} mode); the first steps include compiling")


def activation_offload(device: torch.device):
    """A context in which autograd keeps the tensors it saves for backward in pinned CPU memory
    (torch.autograd.graph.save_on_cpu) and copies them back for backward: GPU memory for
    activations drops to about one layer's worth, at the price of PCIe copies each step. Long
    sequences are where it pays. Raises on a CPU device, where there is nothing to offload."""
    if device.type != "cuda":
        raise JobConfigError(f"train.activation_offload: the model is on {device.type}, not a CUDA GPU, so there "
                             "is no device memory to offload to the CPU; set train.activation_offload: false")
    return torch.autograd.graph.save_on_cpu(pin_memory=True)


def offload_factory(t: TrainConfig, device: torch.device) -> Callable | None:
    """train.activation_offload: a factory of the per-forward context (checked now), or None."""
    if not t.activation_offload:
        return None
    activation_offload(device)
    return lambda: activation_offload(device)
