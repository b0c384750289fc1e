"""The fused LoRA SwiGLU block (kernels/lora_swiglu.py, methods/lora_blocks.py).

Kernel: output and every gradient equal autograd over the plain composition, per dtype. Model:
a Llama MLP with LoRA on gate/up/down runs as one node, gives the layer-by-layer logits and
gradients, saves fewer activation bytes, and steps aside whenever it would not be exact (dropout,
merged, disabled, several active adapters, mixed batch, a block whose forward differs).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
from conftest import randomize_lora, tiny_llama

from slimtune import BASE_ADAPTER, LoraConfig, get_peft_model
from slimtune.kernels.lora_swiglu import lora_swiglu, swiglu_reference
from slimtune.inject import installed_block_forward
from slimtune.methods import lora_blocks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _specs(dtype, device, d=24, f=40, r=(4, 3, 5), train_bias=False, frozen_up=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(*s, grad=False):
        return (torch.randn(*s, generator=g) * 0.3).to(device=device, dtype=dtype).requires_grad_(grad)

    specs = []
    for (o, i), rank, name in zip(((f, d), (f, d), (d, f)), r, ("gate", "up", "down")):
        train = not (frozen_up and name == "up")
        specs.append((mk(o, i), mk(o, grad=train_bias), mk(rank, i, grad=train), mk(o, rank, grad=train),
                      1.5 + rank / 4))
    return specs


def _run(fn, x, specs):
    leaves = [x] + [t for s in specs for t in s[:4] if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    y = fn(x, *specs)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    y.backward(gy)
    return y.detach(), [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "train_bias", "frozen_up", "2d"])
def test_kernel_equals_reference(device, dtype, case):
    specs = _specs(dtype, device, train_bias=case == "train_bias", frozen_up=case == "frozen_up")
    shape = (10, 24) if case == "2d" else (2, 5, 24)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device, dtype).requires_grad_(True)
    y_ref, g_ref = _run(swiglu_reference, x, specs)
    y, g = _run(lora_swiglu, x, specs)
    scale = lambda t: dict(atol=TOL[dtype]["atol"] * (1 + t.float().abs().max().item()), rtol=TOL[dtype]["rtol"])  # noqa: E731
    torch.testing.assert_close(y.float(), y_ref.float(), **scale(y_ref))
    assert len(g) == len(g_ref)
    for got, ref in zip(g, g_ref):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got.float(), ref.float(), **scale(ref))


def test_kernel_under_autocast_runs_in_the_autocast_dtype():
    specs = _specs(torch.float32, "cpu")
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, g_ref = _run(swiglu_reference, x, specs)
        y, g = _run(lora_swiglu, x, specs)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2 * y_ref.float().abs().max().item(), rtol=3e-2)
    for got, ref in zip(g, g_ref):
        assert got.dtype == torch.float32  # fp32 leaves get fp32 gradients through the casts
        torch.testing.assert_close(got, ref, atol=5e-2 * ref.abs().max().item(), rtol=5e-2)


def test_kernel_no_grad_path_equals_reference():
    specs = _specs(torch.float32, "cpu")
    x = torch.randn(3, 4, 24)
    with torch.no_grad():
        torch.testing.assert_close(lora_swiglu(x, *specs), swiglu_reference(x, *specs), atol=1e-5, rtol=1e-5)


def test_kernel_refuses_trainable_base_weight():
    specs = _specs(torch.float32, "cpu")
    specs[0][0].requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        lora_swiglu(torch.randn(2, 24), *specs)


# ---- in a model ------------------------------------------------------------------------------------
def _fused_blocks(model) -> int:
    return sum(installed_block_forward(m) is lora_blocks.swiglu_forward for m in model.modules())


def _model(**kw):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", **kw))
    randomize_lora(pm)
    return pm


def _logits_grads(pm, ids, fuse: bool, monkeypatch):
    monkeypatch.setattr(lora_blocks, "FUSE_SWIGLU", fuse)
    pm.zero_grad()
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


def test_llama_mlp_fused_equals_layer_by_layer(ids, monkeypatch):
    pm = _model()
    assert _fused_blocks(pm) == 2  # both tiny-Llama layers
    pm.train()
    calls = []
    real = lora_blocks.lora_swiglu
    monkeypatch.setattr(lora_blocks, "lora_swiglu", lambda *a: calls.append(1) or real(*a))
    l1, g1 = _logits_grads(pm, ids, True, monkeypatch)
    assert len(calls) == 2
    l0, g0 = _logits_grads(pm, ids, False, monkeypatch)
    assert len(calls) == 2  # switched off: the layers ran one by one
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
    assert g1.keys() == g0.keys() and any("mlp.gate_proj" in k for k in g1)
    for k in g1:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-4)


def _saved_bytes(pm, ids) -> int:
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in pm.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(seen.values())


def test_fused_block_saves_fewer_activations(ids, monkeypatch):
    """Two N×F tensors per layer (silu(g) and h) are recomputed instead of kept."""
    pm = _model()
    pm.train()
    fused = _saved_bytes(pm, ids)
    monkeypatch.setattr(lora_blocks, "FUSE_SWIGLU", False)
    per_layer = _saved_bytes(pm, ids)
    n_tokens, f, layers = ids.numel(), 64, 2
    assert per_layer - fused >= 2 * n_tokens * f * 4 * layers  # fp32


def test_llama_mlp_fused_under_autocast(ids, monkeypatch):
    pm = _model()
    pm.train()
    calls = []
    real = lora_blocks.lora_swiglu
    monkeypatch.setattr(lora_blocks, "lora_swiglu", lambda *a: calls.append(1) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l1, g1 = _logits_grads(pm, ids, True, monkeypatch)
        l0, g0 = _logits_grads(pm, ids, False, monkeypatch)
    assert len(calls) == 2
    torch.testing.assert_close(l1.float(), l0.float(), atol=5e-2, rtol=5e-2)
    for k in g1:
        torch.testing.assert_close(g1[k], g0[k], atol=5e-2 * g0[k].abs().max().item(), rtol=5e-2)


@pytest.mark.parametrize("state", ["dropout", "merged", "disabled", "two_active", "mixed"])
def test_steps_aside_when_not_exact(ids, state, monkeypatch):
    calls = []
    real = lora_blocks.lora_swiglu
    monkeypatch.setattr(lora_blocks, "lora_swiglu", lambda *a: calls.append(1) or real(*a))
    pm = _model(lora_dropout=0.1 if state == "dropout" else 0.0)
    if state in ("two_active", "mixed"):
        pm.add_adapter("b", LoraConfig(r=2, target_modules="all-linear"))
        randomize_lora(pm, seed=1)
    pm.train(state == "dropout")
    calls.clear()  # injection probed each block once
    with torch.no_grad():
        if state == "merged":
            ref = pm(input_ids=ids).logits
            pm.merge_adapter()
            calls.clear()
            out = pm(input_ids=ids).logits
        elif state == "disabled":
            with pm.disable_adapter():
                out = pm(input_ids=ids).logits
        elif state == "two_active":
            pm.base_model.set_adapter(["default", "b"])
            out = pm(input_ids=ids).logits
        elif state == "mixed":
            names = ["default", "b", BASE_ADAPTER][: ids.shape[0]]
            out = pm(input_ids=ids, adapter_names=names).logits
        else:
            out = pm(input_ids=ids).logits
    assert calls == [], f"fused node ran while {state}"
    if state == "merged":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # and the same state with fusion switched off gives the same numbers (the block's own forward)
    monkeypatch.setattr(lora_blocks, "FUSE_SWIGLU", False)
    with torch.no_grad():
        if state == "disabled":
            with pm.disable_adapter():
                again = pm(input_ids=ids).logits
        elif state == "mixed":
            again = pm(input_ids=ids, adapter_names=names).logits
        elif state == "dropout":
            return  # a new dropout mask: nothing to compare
        else:
            again = pm(input_ids=ids).logits
    torch.testing.assert_close(out, again)


class _NotSwiGLU(nn.Module):
    """Same child names as a Llama MLP, other math: must not be fused."""

    def __init__(self, d=16, f=24):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


def test_block_with_other_math_is_not_fused():
    model = nn.Sequential(_NotSwiGLU())
    x = torch.randn(2, 3, 16)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]))
    randomize_lora(pm)
    assert _fused_blocks(pm) == 0
    layers = {n: m for n, m in pm.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))}
    g, u, d = (layers[k] for k in sorted(layers, key=lambda n: ("gate" not in n, "up" not in n)))
    with torch.no_grad():
        torch.testing.assert_close(pm(x), d(torch.nn.functional.silu(g(x)) + u(x)))


def test_unload_restores_forward_and_model_pickles(ids):
    from transformers.models.llama.modeling_llama import LlamaMLP

    pm = _model()
    assert _fused_blocks(pm) == 2
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    copied = copy.deepcopy(pm)
    loaded = pickle.loads(pickle.dumps(pm))  # a whole-model pickle (torch.save(model)) carries the fused forward
    with torch.no_grad():
        torch.testing.assert_close(copied(input_ids=ids).logits, ref)
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref)
    assert _fused_blocks(copied) == 2 and _fused_blocks(loaded) == 2
    merged = pm.merge_and_unload()
    assert _fused_blocks(merged) == 0 and all("forward" not in m.__dict__ for m in merged.modules())
    assert all(type(layer.mlp) is LlamaMLP for layer in merged.model.layers)  # the class is back
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-4)


def test_foreign_instance_forward_is_left_alone(ids):
    """A block whose forward was already replaced on the instance (accelerate's hooks) keeps it."""
    m = tiny_llama()
    mlp = m.model.layers[0].mlp
    mlp.forward = type(mlp).forward.__get__(mlp)
    pm = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear"))
    assert _fused_blocks(pm) == 1


def test_undecided_block_is_fused_once_an_adapter_is_active():
    """A block whose projections hold no active adapter cannot be probed; set_adapter fuses it."""
    from slimtune.inject import adapter_layers, remove_block_forwards

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    remove_block_forwards(pm)
    for _, layer in adapter_layers(pm):
        layer.active_adapters = []
    assert lora_blocks.fuse_swiglu_blocks(pm) == 0 and _fused_blocks(pm) == 0
    pm.set_adapter("default")
    assert _fused_blocks(pm) == 2
