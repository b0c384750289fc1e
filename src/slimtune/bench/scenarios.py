"""Benchmark scenarios: each set-up turns the one shared model into what a row measures (frozen
floor, HF PEFT, slimtune, ablations, chunked loss) and returns (model to call, trainable params,
teardown), so every row runs on the same weights, batch and seed."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from .presets import TARGETS, Preset


# ---- scenarios: each returns (model to call, trainable params, teardown) ----------------------------
def _peft_cfg(p: Preset, **kw):
    from peft import LoraConfig

    return LoraConfig(r=p.r, lora_alpha=p.alpha, target_modules=TARGETS, **kw)


def _slim_cfg(p: Preset, **kw):
    from slimtune import LoraConfig

    return LoraConfig(r=p.r, lora_alpha=p.alpha, target_modules=TARGETS, **kw)


def setup_frozen(model, p):
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model, [], lambda: model.disable_input_require_grads()


def setup_full(model, p):
    model.requires_grad_(True)
    return model, list(model.parameters()), lambda: model.requires_grad_(False)


def _setup_peft(model, p, autocast: bool):
    import peft

    pm = peft.get_peft_model(model, _peft_cfg(p), autocast_adapter_dtype=autocast)
    params = [q for q in pm.parameters() if q.requires_grad]
    return pm, params, lambda: pm.unload()


def setup_peft(model, p):
    return _setup_peft(model, p, True)


def setup_peft_bf16(model, p):
    return _setup_peft(model, p, False)


def setup_slimtune(model, p):
    import slimtune

    sm = slimtune.get_peft_model(model, _slim_cfg(p))
    params = [q for q in sm.parameters() if q.requires_grad]
    return sm, params, lambda: sm.unload()


def _slimtune_with(module, flag: str, value: bool):
    """An ablation: slimtune with one module-level switch flipped for the scenario's lifetime."""
    def setup(model, p):
        default = getattr(module, flag)
        setattr(module, flag, value)
        sm, params, teardown = setup_slimtune(model, p)

        def undo():
            setattr(module, flag, default)
            teardown()
        return sm, params, undo
    return setup


def setup_slimtune_shared(model, p):
    """Ablation: slimtune with q/k/v and gate/up run as one node each (lora_layers.SHARE_INPUTS)."""
    from slimtune.methods import lora_layers

    return _slimtune_with(lora_layers, "SHARE_INPUTS", True)(model, p)


def setup_slimtune_function(model, p):
    """Ablation: every layer through the Python-backward autograd function (_LoraLinearFn)."""
    from slimtune.kernels import lora as kl

    return _slimtune_with(kl, "NATIVE_AUTOGRAD", False)(model, p)


class _ChunkedLoss:
    """Called like the model, but the loss runs through the chunked linear cross-entropy
    (kernels/chunked_ce.py). `held_bytes`: the N×d input gradient that loss computes in forward
    and keeps as a ctx attribute, which saved-tensor hooks do not see; the memory model adds it."""

    def __init__(self, model, p: Preset) -> None:
        from slimtune.kernels.chunked_ce import chunked_causal_lm_loss

        self.model, self.fn = model, chunked_causal_lm_loss(model)
        if self.fn is None:
            raise RuntimeError("chunked cross-entropy does not apply here (needs torch >= 2.13)")
        self.held_bytes = p.batch * p.seq * p.model["hidden_size"] * torch.tensor([], dtype=getattr(torch, p.dtype)).element_size()

    def __call__(self, input_ids, labels):
        return argparse.Namespace(loss=self.fn({"input_ids": input_ids, "labels": labels}))

    def parameters(self):
        return self.model.parameters()


def _chunked(setup: Callable) -> Callable:
    def chunked_setup(model, p):
        m, params, teardown = setup(model, p)
        return _ChunkedLoss(m, p), params, teardown
    return chunked_setup


class _Offloaded:
    """Called like the model, with the tensors autograd saves kept in pinned CPU memory
    (train.activation_offload, resources.activation_offload)."""

    def __init__(self, model, device: str) -> None:
        from slimtune.train.speed import activation_offload

        self.model, self.ctx = model, lambda: activation_offload(torch.device(device))

    def __call__(self, **kw):
        with self.ctx():
            return self.model(**kw)

    def parameters(self):
        return self.model.parameters()


def setup_slimtune_offload(model, p):
    from slimtune.train.speed import activation_offload

    activation_offload(torch.device(p.device))  # raises on a CPU preset, naming why, before any injection
    m, params, teardown = setup_slimtune(model, p)
    return _Offloaded(m, p.device), params, teardown


def setup_slimtune_perlayer(model, p):
    """Ablation: gate/up/down through their own LoRA layers, no fused SwiGLU block (lora_blocks)."""
    from slimtune.methods import lora_blocks

    return _slimtune_with(lora_blocks, "FUSE_SWIGLU", False)(model, p)


def _compiled(setup: Callable, mode: str | None = None) -> Callable:
    """The scenario with every decoder layer under torch.compile (compile_blocks.py); the first
    warm-up step compiles. Teardown returns the layers to eager (and the KV-cache flag)."""
    def compiled_setup(model, p):
        from slimtune.compile_blocks import compile_blocks, uncompile_blocks

        m, params, teardown = setup(model, p)
        compile_blocks(model, mode=mode)

        def undo():
            uncompile_blocks(model)
            teardown()
        return m, params, undo
    return compiled_setup


TRAIN_SETUPS: dict[str, Callable] = {
    "frozen": setup_frozen, "peft": setup_peft, "peft_bf16": setup_peft_bf16,
    "slimtune": setup_slimtune, "slimtune_shared": setup_slimtune_shared,
    "slimtune_function": setup_slimtune_function, "slimtune_perlayer": setup_slimtune_perlayer, "full": setup_full,
    "frozen_chunked_ce": _chunked(setup_frozen), "slimtune_chunked_ce": _chunked(setup_slimtune),
    "frozen_compile": _compiled(setup_frozen), "slimtune_compile": _compiled(setup_slimtune),
    "peft_bf16_compile": _compiled(setup_peft_bf16),
    "frozen_compile_graphs": _compiled(setup_frozen, "reduce-overhead"),  # + CUDA graphs
    "slimtune_compile_graphs": _compiled(setup_slimtune, "reduce-overhead"),
    "slimtune_compile_perlayer": _compiled(setup_slimtune_perlayer),  # no fused SwiGLU node (ablation)
    "slimtune_offload": setup_slimtune_offload,  # GPU: activations in pinned CPU memory
}
from .methods import METHOD_SETUPS  # noqa: E402  (peft_/slimtune_ LoHa, LoKr, VeRA, OFT: bench/methods.py)

TRAIN_SETUPS.update(METHOD_SETUPS)
