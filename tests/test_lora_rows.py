"""The mixed-LoRA kernel (kernels/lora_rows.py): it adds exactly what the torch ops add, for every
rank it is compiled for, fp32 and bf16 stacks, base rows and repeated adapters, built for this CPU
and for AVX2 (x86-64-v3) on the same machine; at decode steps, and at prefills (T tokens a row) in
AVX-512 builds, which an AVX2 build refuses; a model's steps through it equal the same steps through
torch's bmm; it is never used where it would be wrong (a prefill the build has no path for,
gradients, other dtypes), and each way of switching it says what it did."""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn as nn

from slimtune.kernels import lora_rows
from slimtune.train.resources import cpu_flags
from slimtune.methods.lora_layers import BASE_ADAPTER, Linear
from slimtune.methods.lora_mixed import MixedRows

X86 = platform.machine() in ("x86_64", "AMD64")
AVX2 = X86 and {"avx2", "fma"} <= cpu_flags()


@pytest.fixture
def kernel_state():
    """Each test here switches the kernel itself; leave it as found."""
    saved = (lora_rows._OP, lora_rows._PREFILL, dict(lora_rows._STATE))
    yield
    lora_rows._OP, lora_rows._PREFILL = saved[:2]
    lora_rows._STATE.clear()
    lora_rows._STATE.update(saved[2])


def _reference(x, a, b, slots):
    """out[n] = (x[n] · A[slot n]) · B[slot n] in fp64 from the stack's own values (slot 0 adds 0)."""
    a64, b64 = a.double(), b.double()
    y = torch.einsum("ni,nir->nr", x.double(), a64[slots])
    y = torch.einsum("nr,nro->no", y, b64[slots])
    return y * (slots > 0).double()[:, None]


@pytest.mark.parametrize("arch", ["native", pytest.param("x86-64-v3", marks=pytest.mark.skipif(
    not AVX2, reason="the AVX2 build needs an x86-64 CPU with AVX2 and FMA"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", lora_rows.RANKS)
def test_kernel_adds_each_rows_term(r, dtype, arch):
    """Rows on distinct adapters, repeated ones and base rows (slot 0); widths past and off the
    kernel's 64-output blocks and 4-feature steps (141 = 2 x 64 + 13, 37 = 9 x 4 + 1). On an AVX-512
    CPU the native build runs the AVX-512 loops at ranks 16-64 and the portable ones at rank 8, the
    x86-64-v3 build the portable ones at every rank."""
    mod = lora_rows.build(arch)
    g = torch.Generator().manual_seed(r)
    d_in, d_out, s = 37, 141, 5
    a = torch.randn(s + 1, d_in, r, generator=g).to(dtype)
    b = torch.randn(s + 1, r, d_out, generator=g).to(dtype)
    a[0], b[0] = 0, 0
    slots = torch.tensor([3, 0, 1, 3, 5, 2, 0, 4])
    x = torch.randn(len(slots), d_in, generator=g)
    base = torch.randn(len(slots), d_out, generator=g)
    out = base.clone()
    mod.add_rows(x, a, b, slots, out)
    want = base.double() + _reference(x, a, b, slots)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(out[slots == 0], base[slots == 0])  # base rows untouched


AVX512 = X86 and "avx512f" in cpu_flags()


def _prefill_build():
    """The native build when it has the prefill path (compiled where -march=native has AVX-512), else skip."""
    mod = lora_rows.build()
    if not mod.prefill_ranks():
        pytest.skip("the prefill path is in AVX-512 builds only (other builds refuse it: tested below)")
    return mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [16, 32, 64])
@pytest.mark.parametrize("T", [2, 13, 40])
def test_kernel_prefill_adds_each_rows_term(T, r, dtype):
    """A prefill: T tokens a row, each row's tokens through its own adapter. T = 2 (the 2-token
    blocks only), 13 (a block of 8 / 4 / 2 tokens, then 4 / 2 for B, and one-token tails), 40 (three
    chunks of a row over the threads, the last one short); the same rows, widths and slots as the
    decode test."""
    mod = _prefill_build()
    assert mod.prefill_ranks() == [16, 32, 64]
    g = torch.Generator().manual_seed(T * r)
    d_in, d_out, s = 37, 141, 5
    a = torch.randn(s + 1, d_in, r, generator=g).to(dtype)
    b = torch.randn(s + 1, r, d_out, generator=g).to(dtype)
    a[0], b[0] = 0, 0
    slots = torch.tensor([3, 0, 1, 3, 5, 2, 0, 4])
    x = torch.randn(len(slots), T, d_in, generator=g)
    base = torch.randn(len(slots), T, d_out, generator=g)
    out = base.clone()
    mod.add_rows(x, a, b, slots, out)
    want = base.double() + torch.einsum("nti,nir,nro->nto", x.double(), a.double()[slots], b.double()[slots])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(out[slots == 0], base[slots == 0])  # base rows untouched


@pytest.mark.parametrize("arch", ["native", pytest.param("x86-64-v3", marks=pytest.mark.skipif(
    not AVX2, reason="the AVX2 build needs an x86-64 CPU with AVX2 and FMA"))])
def test_kernel_prefill_only_where_built(arch):
    """A build says which ranks' prefills it runs; a prefill of any other rank (rank 8 everywhere, every
    rank in a build without AVX-512) is refused with the way out, never computed by slow loops."""
    mod = lora_rows.build(arch)
    ranks = mod.prefill_ranks()
    assert ranks in ([], [16, 32, 64])  # all three or none: the build has AVX-512 or not
    if arch == "x86-64-v3" or not AVX512:
        assert ranks == []  # no AVX-512 in the instruction set the build was made for
    for r in lora_rows.RANKS:
        if r in ranks:
            continue
        a, b = torch.zeros(3, 8, r), torch.zeros(3, r, 4)
        with pytest.raises(RuntimeError, match=f"no prefill path .T > 1. for rank {r} in this build"):
            mod.add_rows(torch.zeros(2, 3, 8), a, b, torch.tensor([1, 2]), torch.zeros(2, 3, 4))


def test_kernel_refuses_what_it_cannot_read():
    mod = lora_rows.build()
    a, b = torch.zeros(3, 8, 16), torch.zeros(3, 16, 4)
    x, out = torch.zeros(2, 8), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="slot 3 outside the stack of 3"):
        mod.add_rows(x, a, b, torch.tensor([1, 3]), out)
    with pytest.raises(RuntimeError, match="rank 12 is not 8, 16, 32 or 64"):
        mod.add_rows(x, torch.zeros(3, 8, 12), torch.zeros(3, 12, 4), torch.tensor([1, 2]), out)
    with pytest.raises(RuntimeError, match="x and out must be fp32"):
        mod.add_rows(x.double(), a, b, torch.tensor([1, 2]), out)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        mod.add_rows(torch.zeros(2, 9), a, b, torch.tensor([1, 2]), out)
    with pytest.raises(RuntimeError, match="shapes do not match"):  # (N, T, in) with an (N, out) out
        mod.add_rows(torch.zeros(2, 3, 8), a, b, torch.tensor([1, 2]), out)


def test_padded_rank():
    assert [lora_rows.padded_rank(r) for r in (1, 8, 9, 16, 24, 64, 65, 128)] == [8, 8, 16, 16, 32, 64, 65, 128]


# a layer of three adapters whose ranks (2, 4, 8) pad to 8 in the kernel's stack
ADAPTERS = {"a": (4, 8, False), "b": (2, 4, True), "c": (8, 8, False)}


def _layer(seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    layer = None
    for name, (r, alpha, rs) in ADAPTERS.items():
        kw = dict(r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False, use_rslora=rs)
        if layer is None:
            layer = Linear(nn.Linear(20, 18), name, **kw)
        else:
            layer.update_layer(name, **kw)
    return layer


def _mixed(layer, names, x, dtype=None):
    uniq = list(dict.fromkeys(names))
    layer._mixed = (uniq, torch.tensor([uniq.index(n) for n in names]))
    layer.__dict__["_mixed_dtype"] = dtype
    try:
        return layer(x)
    finally:
        layer._mixed = None
        layer.__dict__.pop("_mixed_dtype", None)


def _counting(monkeypatch):
    calls = []
    op = lora_rows._OP

    def counted(*args):
        calls.append(args[0].shape)
        return op(*args)

    monkeypatch.setattr(lora_rows, "_OP", counted)
    return calls


NAMES = ["c", BASE_ADAPTER, "a", "b", "a", "c"]


@pytest.mark.parametrize("rows", [NAMES, ["b"], [BASE_ADAPTER, "a"], ["a", "b", "c"]])
def test_decode_step_through_the_kernel_equals_torch_ops(kernel_state, monkeypatch, rows):
    """One token a row: the kernel (stack padded to rank 8) against the bmm path, same layer."""
    layer = _layer()
    x = torch.randn(len(rows), 1, 20)
    with torch.no_grad():
        lora_rows.enable("off")
        want = _mixed(layer, rows, x)
        lora_rows.enable("on")
        calls = _counting(monkeypatch)
        got = _mixed(layer, rows, x)
    assert calls == [torch.Size([len(rows), 20])]  # one call for the layer
    assert layer._all_stacks(torch.float32)[1].shape[-1] == 8  # ranks 2, 4, 8 in a rank-8 stack
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_batchs_later_decode_steps_call_the_kernel_straight(kernel_state, monkeypatch):
    """The first decode step of a mixed batch checks and plans; its later steps (the same batch, one
    token a row) call the kernel straight with the model's own (N, 1, in) tensors. Every step equals
    the torch ops; a prefill in between takes the bmm path (a rank-8 stack: no build runs its
    prefills); the batch's end drops the shortcut."""
    layer = _layer()
    uniq = list(dict.fromkeys(NAMES))
    batch = MixedRows(uniq, torch.tensor([uniq.index(n) for n in NAMES]))
    xs = [torch.randn(len(NAMES), 1, 20) for _ in range(3)]
    with torch.no_grad():
        lora_rows.enable("off")
        want = [_mixed(layer, NAMES, x) for x in xs]
        lora_rows.enable("on")
        calls = _counting(monkeypatch)
        layer._mixed = batch
        got = [layer(x) for x in xs]
        assert layer.__dict__["_mixed_hot"][0] is batch
        layer(torch.randn(len(NAMES), 3, 20))  # a prefill: not the kernel's
        layer._mixed = None
        layer(xs[0])  # no mixed batch now
    assert "_mixed_hot" not in layer.__dict__
    assert calls == [torch.Size([len(NAMES), 20])] + [torch.Size([len(NAMES), 1, 20])] * 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_kernel_only_where_it_is_right(kernel_state, monkeypatch):
    """A prefill the build has no path for (rank 8), gradients to keep, a bf16 model: the torch ops,
    same result."""
    layer = _layer()
    lora_rows.enable("on")
    calls = _counting(monkeypatch)
    x = torch.randn(len(NAMES), 3, 20)
    with torch.no_grad():
        prefill = _mixed(layer, NAMES, x)
    layer.requires_grad_(False)  # a frozen layer under autograd (the input's gradient): the serving path,
    xg = torch.randn(len(NAMES), 1, 20, requires_grad=True)  # whose in-place kernel autograd could not see
    _mixed(layer, NAMES, xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with torch.no_grad():
        _mixed(_layer().to(torch.bfloat16), NAMES, x[:, :1].bfloat16())
    assert calls == []
    lora_rows.enable("off")
    with torch.no_grad():
        torch.testing.assert_close(_mixed(layer, NAMES, x), prefill)


def _layer16(seed: int = 0) -> Linear:
    """Two adapters of ranks 12 and 16 (a rank-16 stack: one with a prefill path) and one of rank 4."""
    torch.manual_seed(seed)
    kw = dict(lora_dropout=0.0, init_lora_weights=False)
    layer = Linear(nn.Linear(40, 70), "a", r=12, lora_alpha=24, use_rslora=False, **kw)
    layer.update_layer("b", r=16, lora_alpha=16, use_rslora=True, **kw)
    layer.update_layer("c", r=4, lora_alpha=8, use_rslora=False, **kw)
    return layer


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("built", [True, False])
def test_prefill_through_the_kernel_where_the_build_has_it(kernel_state, monkeypatch, built, dtype):
    """A rank-16 stack's prefill (T = 11 tokens a row): one kernel call with the model's (N, T, in)
    tensor where the build runs that rank's prefills, torch's bmm where it does not (forced: an AVX2
    build's empty `prefill_ranks`); the same numbers either way, fp32 or bf16 stacks. The decode
    shortcut is kept for decode steps only."""
    if built:
        _prefill_build()
    layer = _layer16()
    rows = ["b", BASE_ADAPTER, "a", "c", "b", "a"]
    x = torch.randn(len(rows), 11, 40)
    with torch.no_grad():
        lora_rows.enable("off")
        want = _mixed(layer, rows, x, dtype)
        lora_rows.enable("on")
        if not built:
            monkeypatch.setattr(lora_rows, "_PREFILL", ())
        calls = _counting(monkeypatch)
        got = _mixed(layer, rows, x, dtype)
    assert calls == ([torch.Size([len(rows), 11, 40])] if built else [])
    assert "_mixed_hot" not in layer.__dict__
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_stacks_through_the_kernel(kernel_state):
    """--mixed-adapter-dtype bfloat16: the kernel widens the bf16 stack to fp32 in registers (x stays
    fp32), the torch path widens it before its bmm: the same numbers to fp32 accuracy, and the fp32
    stack's up to the stack's rounding."""
    layer = _layer()
    x = torch.randn(len(NAMES), 1, 20)
    with torch.no_grad():
        lora_rows.enable("off")
        exact = _mixed(layer, NAMES, x)
        bmm16 = _mixed(layer, NAMES, x, torch.bfloat16)
        lora_rows.enable("on")
        kern16 = _mixed(layer, NAMES, x, torch.bfloat16)
    torch.testing.assert_close(kern16, bmm16, rtol=1e-5, atol=1e-5)
    err = (kern16 - exact).abs().max()
    assert 0 < err <= 0.02 * exact.abs().max()


@pytest.mark.parametrize("rank16", [False, True])
def test_a_model_decodes_the_same_through_the_kernel(kernel_state, monkeypatch, rank16):
    """A tiny Llama with three adapters on q/v: a mixed prefill, then decode steps, greedy; the
    tokens and the last logits through the kernel equal those through torch's bmm. With a rank-16
    adapter the stacks are rank 16, whose prefill takes the kernel too where the build has the path."""
    from transformers import DynamicCache

    from conftest import randomize_lora, tiny_llama
    from slimtune import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_llama(), LoraConfig(r=16 if rank16 else 4, lora_alpha=8,
                                                 target_modules=["q_proj", "v_proj"]), "a")
    pm.add_adapter("b", LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("c", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    randomize_lora(pm, std=0.3)
    tuner, hf = pm.base_model, pm.base_model.model
    rows = ["b", BASE_ADAPTER, "a", "c", "a"]
    ids = torch.randint(0, 128, (len(rows), 6), generator=torch.Generator().manual_seed(0))

    def decode():
        toks, cache = ids, DynamicCache(config=hf.config)
        out = []
        with torch.no_grad(), tuner.mixed_batch(rows):
            for _ in range(4):
                logits = hf(input_ids=toks, past_key_values=cache, use_cache=True).logits[:, -1]
                toks = logits.argmax(-1, keepdim=True)
                out.append(toks)
        return torch.cat(out, 1), logits

    lora_rows.enable("off")
    want_ids, want = decode()
    lora_rows.enable("on")
    calls = _counting(monkeypatch)
    got_ids, got = decode()
    prefill = rank16 and 16 in lora_rows.prefill_ranks()
    # 3 decode steps x 2 blocks x (q, v), and the prefill's 2 x 2 where its rank has the path (else bmm)
    assert len(calls) == 3 * 2 * 2 + (2 * 2 if prefill else 0)
    assert sum(len(c) == 3 and c[1] > 1 for c in calls) == (4 if prefill else 0)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_enable_says_which_path(kernel_state, monkeypatch):
    assert "torch bmm (--lora-kernel off)" in lora_rows.enable("off") and not lora_rows.active()
    line = lora_rows.enable("on")
    assert "the lora_rows kernel (-march=native" in line and lora_rows.active()
    assert lora_rows.state()["mode"] == "on"

    def broken(arch="native"):
        raise lora_rows.KernelUnavailable("the mixed-LoRA decode kernel did not build (no gcc): it needs gcc")

    monkeypatch.setattr(lora_rows, "build", broken)
    line = lora_rows.enable("auto")  # said, not silent: the server prints this line at start-up
    assert line.startswith("mixed LoRA decode: torch bmm, because the mixed-LoRA decode kernel did not build")
    assert not lora_rows.active() and "did not build" in lora_rows.state()["why"]
    lora_rows._OP = lambda *a: None  # as if on before: a failed "on" turns it off
    with pytest.raises(lora_rows.KernelUnavailable, match="did not build"):
        lora_rows.enable("on")
    assert not lora_rows.active() and lora_rows.state()["mode"] == "off"
    with pytest.raises(ValueError, match="use one of auto, on, off"):
        lora_rows.enable("fast")


def test_a_failed_build_names_the_fix(kernel_state, monkeypatch):
    """What a machine without a compiler sees: the loader's error, and what to install or pass."""
    import torch.utils.cpp_extension as ext

    def no_compiler(*a, **k):
        raise RuntimeError("Error building extension 'x'\nlora_rows.cpp:1:10: fatal error: Python.h: No such file"
                           "\nninja: build stopped: subcommand failed.")

    monkeypatch.setattr(ext, "load", no_compiler)
    monkeypatch.setattr(lora_rows, "_BUILT", {})
    with pytest.raises(lora_rows.KernelUnavailable) as e:
        lora_rows.build()
    assert "fatal error: Python.h: No such file" in str(e.value) and "subcommand failed" not in str(e.value)
    assert "python3-dev" in str(e.value) and "pip install ninja" in str(e.value)
    assert "--lora-kernel off" in str(e.value)


def test_a_killed_builds_lock_does_not_hang_the_next(monkeypatch, tmp_path):
    """torch's builder waits forever on a `lock` a killed build left; one older than any build goes."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.write_text("")
    lora_rows._drop_stale_lock(tmp_path)
    assert lock.exists()  # a fresh lock: a build under way, left alone
    old = time.time() - lora_rows.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    lora_rows._drop_stale_lock(tmp_path)
    assert not lock.exists()
    lora_rows._drop_stale_lock(tmp_path)  # none: nothing to do


def test_other_stack_dtypes_keep_the_torch_ops(kernel_state):
    """An fp16 stack (mixed_batch(weights_dtype=torch.float16)) is not the kernel's: the bmm path runs."""
    layer = _layer()
    x = torch.randn(len(NAMES), 1, 20)
    lora_rows.enable("on")
    with torch.no_grad():
        got = _mixed(layer, NAMES, x, torch.float16)
        lora_rows.enable("off")
        want = _mixed(layer, NAMES, x, torch.float16)
    torch.testing.assert_close(got, want)
