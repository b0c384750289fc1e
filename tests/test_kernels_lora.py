"""The fused LoRA autograd function and the LoRA Linear layer equal the plain composition.

Gradients are compared against autograd over `lora_reference` (the textbook y = xWᵀ + b +
s·drop(x)AᵀBᵀ) with per-dtype tolerances: fp32, bf16; dropout 0 and > 0 (same seed, so the same
mask); trainable or frozen bias/weight; Conv1D (fan_in_fan_out); 2-D and 3-D inputs. No timing here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimtune.compat import enable_activation_checkpointing
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
@pytest.mark.parametrize("native", [True, False], ids=["native", "function"])
def test_fused_equals_reference(dtype, shape, p_drop, train_b, native, monkeypatch):
    from slimtune.kernels import lora as kl

    monkeypatch.setattr(kl, "NATIVE_AUTOGRAD", native)  # both backward implementations
    _compare(dtype, shape, p_drop, train_b=train_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p_drop", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("train_b", [False, True], ids=["bias_frozen", "bias_trained"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "function"])
def test_fused_equals_reference_cuda(dtype, p_drop, train_b, native, monkeypatch):
    from slimtune.kernels import lora as kl

    monkeypatch.setattr(kl, "NATIVE_AUTOGRAD", native)
    _compare(dtype, (3, 64), p_drop, train_b=train_b, device="cuda", d_in=256, d_out=128, r=16)


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
@pytest.mark.parametrize("native", [True, False], ids=["native", "function"])
def test_trainable_base_weight_and_no_bias(p_drop, native, monkeypatch):
    from slimtune.kernels import lora as kl

    monkeypatch.setattr(kl, "NATIVE_AUTOGRAD", native)
    _compare(torch.float32, (3, 4), p_drop, bias=False, train_w=True)


@pytest.mark.parametrize("native", [True, False], ids=["native", "function"])
def test_frozen_input_gets_no_grad_and_weight_grad_is_never_formed(native, monkeypatch):
    from slimtune.kernels import lora as kl

    monkeypatch.setattr(kl, "NATIVE_AUTOGRAD", native)
    x, w, b, a, bm = _tensors(torch.float32, (5,))
    x.requires_grad_(False)
    seen = []

    def pack(t):
        seen.append((t.untyped_storage().data_ptr(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, w, b, a, bm, 0.5)
    y.sum().backward()
    assert w.grad is None and x.grad is None
    assert a.grad is not None and bm.grad is not None
    # Saved: x (for dA), A, B, xA (for dB), W only when dx is needed; never an (out, in) delta.
    # one (N, in) activation stored (x itself, maybe referenced twice), never an (out, in) product
    assert len({ptr for ptr, shape in seen if shape == (5, 24)}) == 1
    assert all(ptr == w.untyped_storage().data_ptr() for ptr, shape in seen if shape in ((20, 24), (24, 20)))


def test_no_grad_path_matches():
    x, w, b, a, bm = _tensors(torch.float32, (2, 3))
    with torch.no_grad():
        torch.testing.assert_close(lora_linear(x, w, b, a, bm, 1.5), lora_reference(x, w, b, a, bm, 1.5))


@pytest.mark.parametrize("grad", [True, False])
def test_autocast_runs_the_fused_path_in_the_autocast_dtype(grad):
    """Under autocast the fused path casts once to the autocast dtype (as autocast does for each
    GEMM): same output dtype and values as the reference under autocast, fp32 adapter gradients."""
    x, w, b, a, bm = _tensors(torch.float32, (3, 5))
    outs, grads = [], []
    for fn in (lora_linear, lora_reference):
        for t in (x, a, bm):
            t.grad = None
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b, a, bm, 1.5)
        outs.append(y)
        if grad:
            y.float().pow(2).sum().backward()
            grads.append([t.grad.clone() for t in (x, a, bm)])
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0].float(), outs[1].float(), **TOL[torch.bfloat16])
    for got, ref in zip(*grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=5e-2 * ref.abs().max().item(), rtol=5e-2)


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


# ---- q/k/v-style sharing: one node for the linears that read the same input ------------------------------
from slimtune.kernels.lora import lora_group_linear  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "x_frozen"])
def test_group_function_equals_reference(dtype, x_grad):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x = mk(2, 5, 24).requires_grad_(x_grad)
    specs = []
    for out, r, s, train_b in [(20, 4, 2.0, False), (8, 2, 0.5, True), (8, 4, 1.0, False)]:
        specs.append((mk(out, 24) * 0.2, (mk(out) * 0.2).requires_grad_(train_b), (mk(r, 24) * 0.2).requires_grad_(),
                      (mk(out, r) * 0.2).requires_grad_(), s))
    leaves = [t for t in [x] + [t for sp in specs for t in sp[:4]] if t.requires_grad]

    def run(f):
        for t in leaves:
            t.grad = None
        ys = f()
        # the third output is unused: its adapter must get no gradient at all (None, not zeros)
        sum((y.float() * torch.linspace(-1, 1, y.shape[-1])).sum() for y in ys[:2]).backward()
        return [y.detach() for y in ys], [t.grad for t in leaves]

    y, grads = run(lambda: lora_group_linear(x, specs))
    y_ref, grads_ref = run(lambda: [lora_reference(x, *sp) for sp in specs])
    tol = TOL[dtype]
    for a, b in zip(y, y_ref):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(grads, grads_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.float(), b.float(), **tol)
    with torch.no_grad():
        for a, b in zip(lora_group_linear(x, specs), y_ref):
            torch.testing.assert_close(a, b, **tol)


def _llama_lora(checkpointing=None):
    from conftest import tiny_llama

    from slimtune import LoraConfig, get_peft_model

    m = tiny_llama()
    if checkpointing is not None:
        enable_activation_checkpointing(m, use_reentrant=checkpointing)
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]))
    pm.train()
    return pm


def _step_grads(pm, ids):
    for p in pm.parameters():
        p.grad = None
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.fixture
def sharing(monkeypatch):
    from slimtune.methods import lora_layers

    monkeypatch.setattr(lora_layers, "SHARE_INPUTS", True)


@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "ckpt", "ckpt_reentrant"])
def test_llama_groups_form_and_change_nothing(checkpointing, sharing):
    from slimtune.methods.lora_layers import Linear

    torch.manual_seed(0)
    pm = _llama_lora(checkpointing)
    ids = torch.randint(0, 100, (2, 7))
    loss1, g1 = _step_grads(pm, ids)  # first step: layers run alone and learn who shares an input
    layers = {n.split(".")[-1]: m for n, m in pm.named_modules() if isinstance(m, Linear) and ".layers.0." in n}
    share = layers["q_proj"].__dict__.get("_share")
    assert share is not None and [m for m in share.members] == [layers["q_proj"], layers["k_proj"], layers["v_proj"]]
    assert layers["gate_proj"].__dict__["_share"].members == [layers["gate_proj"], layers["up_proj"]]
    assert "_share" not in layers["o_proj"].__dict__ and "_share" not in layers["down_proj"].__dict__
    loss2, g2 = _step_grads(pm, ids)  # second step: grouped
    assert share.active
    torch.testing.assert_close(loss2, loss1)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and the grouped no-grad path gives the same logits as the model run alone
        pm.eval()
        grouped = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
        assert not torch.allclose(grouped, base)


def test_follower_on_another_input_computes_alone(sharing):
    from slimtune.methods.lora_layers import Linear

    torch.manual_seed(0)
    mk = lambda: Linear(nn.Linear(12, 10), "default", r=4, lora_alpha=8, lora_dropout=0.0,  # noqa: E731
                        init_lora_weights=False, use_rslora=False)
    q, k = mk(), mk()
    x = torch.randn(3, 12)
    for _ in range(2):  # learn, then group
        q(x), k(x)
    assert q.__dict__["_share"].active
    x2 = torch.randn(3, 12)
    want = lora_reference(x2, k.base_layer.weight, k.base_layer.bias, k.lora_A["default"].weight,
                          k.lora_B["default"].weight, k.scaling["default"])
    q(x)
    torch.testing.assert_close(k(x2), want)  # not the output computed for x
    x.add_(1.0)  # same tensor, changed in place: the version check catches it
    q_out = q(x)
    x.add_(1.0)
    want = lora_reference(x, k.base_layer.weight, k.base_layer.bias, k.lora_A["default"].weight,
                          k.lora_B["default"].weight, k.scaling["default"])
    torch.testing.assert_close(k(x), want)
    assert q_out.shape == (3, 10)


def test_sharing_is_off_by_default():
    from slimtune.methods.lora_layers import SHARE_INPUTS, Linear

    assert SHARE_INPUTS is False  # see lora_layers: learnt groups would break bitwise resume
    mk = lambda: Linear(nn.Linear(12, 10), "default", r=4, lora_alpha=8, lora_dropout=0.0,  # noqa: E731
                        init_lora_weights=True, use_rslora=False)
    q, k = mk(), mk()
    x = torch.randn(3, 12)
    q(x), k(x), q(x), k(x)
    assert "_share" not in q.__dict__ and "_share" not in k.__dict__


def test_fused_ops_fall_back_loudly_on_cpu(caplog):
    from conftest import tiny_llama

    from slimtune.kernels.fused_ops import apply_fused_ops, liger_status

    m = tiny_llama()
    ok, why = liger_status(m)
    assert not ok and "CUDA" in why
    ids = torch.randint(0, 100, (1, 5))
    before = m(input_ids=ids).logits
    with caplog.at_level("WARNING", logger="slimtune.kernels"):
        assert apply_fused_ops(m) == "stock"
    assert "stock PyTorch path" in caplog.text  # says which path and why
    torch.testing.assert_close(m(input_ids=ids).logits, before)  # model untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_ops_on_gpu_match_stock_loss_and_lora_grads():
    pytest.importorskip("liger_kernel")
    from conftest import tiny_llama

    from slimtune import LoraConfig, get_peft_model
    from slimtune.kernels.fused_ops import apply_fused_ops

    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama().cuda(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    want, grads = _step_grads(pm, ids)
    import transformers.models.llama.modeling_llama as family

    saved = dict(vars(family))  # liger swaps RoPE in the family's module: put it back for later tests
    try:
        assert apply_fused_ops(pm) == "liger"
        got, grads2 = _step_grads(pm, ids)
    finally:
        for k, v in saved.items():
            if vars(family).get(k) is not v:
                setattr(family, k, v)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for k in grads:
        torch.testing.assert_close(grads2[k], grads[k], atol=1e-4, rtol=1e-3)
