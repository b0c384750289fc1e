"""The fused LoRA autograd function and the LoRA Linear layer equal the plain composition.

Gradients are compared against autograd over `lora_reference` (the textbook y = xWᵀ + b +
s·drop(x)AᵀBᵀ) with per-dtype tolerances: fp32, bf16; dropout 0 and > 0 (same seed, so the same
mask); trainable or frozen bias/weight; Conv1D (fan_in_fan_out); 2-D and 3-D inputs. No timing here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimtune.kernels.lora import lora_linear, lora_reference

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _tensors(dtype, shape, d_in=24, d_out=20, r=4, bias=True, train_w=False, train_b=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x = mk(*shape, d_in).requires_grad_(True)
    w = (mk(d_out, d_in) * 0.2).requires_grad_(train_w)
    b = (mk(d_out) * 0.2).requires_grad_(train_b) if bias else None
    a = (mk(r, d_in) * 0.2).requires_grad_(True)
    bm = (mk(d_out, r) * 0.2).requires_grad_(True)
    return x, w, b, a, bm


def _grads(fn, x, w, b, a, bm, scale, dropout, seed=123):
    leaves = [t for t in (x, w, b, a, bm) if t is not None]
    for t in leaves:
        t.grad = None
    torch.manual_seed(seed)
    y = fn(x, w, b, a, bm, scale, dropout)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y.shape, generator=g).to(device=y.device, dtype=y.dtype)
    y.backward(gy)
    return y.detach(), [None if t.grad is None else t.grad.clone() for t in leaves if t.requires_grad]


def _compare(dtype, shape, p_drop, **kw):
    x, w, b, a, bm = _tensors(dtype, shape, **kw)
    if x.is_cuda and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False
    drop = nn.Dropout(p_drop) if p_drop > 0 else nn.Identity()
    drop.train()
    y_ref, g_ref = _grads(lora_reference, x, w, b, a, bm, 2.0, drop)
    y, g = _grads(lora_linear, x, w, b, a, bm, 2.0, drop)
    tol = TOL[dtype]
    if x.is_cuda and dtype == torch.bfloat16:  # bigger sums, other GEMM kernels: bound by the output's scale
        tol = dict(atol=2e-2 * y_ref.float().abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    assert len(g) == len(g_ref)
    for got, ref in zip(g, g_ref):
        assert got is not None and got.dtype == ref.dtype
        if x.is_cuda and dtype == torch.bfloat16:
            tol = dict(atol=2e-2 * ref.float().abs().max().item(), rtol=2e-2)
        torch.testing.assert_close(got.float(), ref.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(6,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("p_drop", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("train_b", [False, True], ids=["bias_frozen", "bias_trained"])
def test_fused_equals_reference(dtype, shape, p_drop, train_b):
    _compare(dtype, shape, p_drop, train_b=train_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p_drop", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("train_b", [False, True], ids=["bias_frozen", "bias_trained"])
def test_fused_equals_reference_cuda(dtype, p_drop, train_b):
    _compare(dtype, (3, 64), p_drop, train_b=train_b, device="cuda", d_in=256, d_out=128, r=16)


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_trainable_base_weight_and_no_bias(p_drop):
    _compare(torch.float32, (3, 4), p_drop, bias=False, train_w=True)


def test_frozen_input_gets_no_grad_and_weight_grad_is_never_formed():
    x, w, b, a, bm = _tensors(torch.float32, (5,))
    x.requires_grad_(False)
    seen = []

    def pack(t):
        seen.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, w, b, a, bm, 0.5)
    y.sum().backward()
    assert w.grad is None and x.grad is None
    assert a.grad is not None and bm.grad is not None
    # Saved: x (for dA), A, B, xA (for dB), W only when dx is needed; never an (out, in) delta.
    assert sum(1 for s in seen if tuple(s) == (5, 24)) == 1


def test_no_grad_path_matches():
    x, w, b, a, bm = _tensors(torch.float32, (2, 3))
    with torch.no_grad():
        torch.testing.assert_close(lora_linear(x, w, b, a, bm, 1.5), lora_reference(x, w, b, a, bm, 1.5))


def test_autocast_path_runs_the_reference():
    x, w, b, a, bm = _tensors(torch.float32, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bm, 1.0)
        y_ref = lora_reference(x, w, b, a, bm, 1.0)
    torch.testing.assert_close(y, y_ref)
    y.float().sum().backward()
    assert a.grad is not None


# ---- the layer ------------------------------------------------------------------------------------------
def _layer_vs_plain(base, fan_in_fan_out, dtype, shape, p_drop, train_bias):
    from slimtune.methods.lora_layers import Linear

    base = base.to(dtype)
    layer = Linear(base, "default", r=4, lora_alpha=8, lora_dropout=p_drop, init_lora_weights=False,
                   use_rslora=False)
    layer.train()
    base.weight.requires_grad_(False)
    if base.bias is not None:
        base.bias.requires_grad_(train_bias)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == dtype and b.dtype == dtype
    w = base.weight.t() if fan_in_fan_out else base.weight
    x = torch.randn(*shape, layer.in_features).to(dtype).requires_grad_(True)
    leaves = [x, a, b] + ([base.bias] if train_bias and base.bias is not None else [])

    def run(f):
        for t in leaves:
            t.grad = None
        torch.manual_seed(5)
        y = f()
        y.backward(torch.ones_like(y) * 0.1 + y.detach() * 0.01)
        return y.detach(), [t.grad.clone() for t in leaves]

    y, g = run(lambda: layer(x))
    y_ref, g_ref = run(lambda: lora_reference(x, w, base.bias, a, b, layer.scaling["default"],
                                              layer.lora_dropout["default"]))
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, **tol)
    for got, ref in zip(g, g_ref):
        torch.testing.assert_close(got.float(), ref.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p_drop", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("train_bias", [False, True], ids=["bias_frozen", "bias_trained"])
def test_linear_layer(dtype, p_drop, train_bias):
    torch.manual_seed(0)
    _layer_vs_plain(nn.Linear(12, 10), False, dtype, (2, 3), p_drop, train_bias)


@pytest.mark.parametrize("shape", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("p_drop", [0.0, 0.25], ids=["nodrop", "drop"])
def test_conv1d_fan_in_fan_out(shape, p_drop):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(10, 12)  # nf=out 10, nx=in 12; weight stored (in, out)
    nn.init.normal_(conv.bias)
    _layer_vs_plain(conv, True, torch.float32, shape, p_drop, True)


def test_mixed_batch_rows_equal_single_adapter_outputs():
    from slimtune.methods.lora_layers import Linear

    torch.manual_seed(0)
    layer = Linear(nn.Linear(12, 10), "a", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                   use_rslora=False)
    layer.update_layer("b", r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False, use_rslora=True)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        want = []
        for i, name in enumerate(["b", "__base__", "a"]):
            if name == "__base__":
                layer.disable_adapters = True
            else:
                layer.set_adapter(name)
            want.append(layer(x[i:i + 1]))
            layer.disable_adapters = False
        layer._mixed = (["b", "__base__", "a"], torch.tensor([0, 1, 2]))
        got = layer(x)
        layer._mixed = None
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)
