"""LoRA mixed-adapter batches (the server's decode path): every row equals that row run alone with
its adapter, whatever the batch's make-up (repeated adapters, base rows, adapters a layer lacks,
ranks that differ, any row order), and the serving plan reads the stacked weights without copying
them when the batch uses most adapters of the layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtune.methods.lora_layers import BASE_ADAPTER, Linear

# adapters of the layer: name -> (r, alpha, rslora); "gone" is an adapter some other layer holds
ADAPTERS = {"a": (4, 8, False), "b": (2, 4, True), "c": (8, 8, False)}
NAMES = [*ADAPTERS, BASE_ADAPTER, "gone"]


def _layer(seed: int = 0, d_in: int = 12, d_out: int = 10) -> Linear:
    torch.manual_seed(seed)
    layer = None
    for name, (r, alpha, rs) in ADAPTERS.items():
        kw = dict(r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False, use_rslora=rs)
        if layer is None:
            layer = Linear(nn.Linear(d_in, d_out), name, **kw)
        else:
            layer.update_layer(name, **kw)
    return layer


def _alone(layer: Linear, name: str, x: torch.Tensor) -> torch.Tensor:
    """The row through the layer with only its adapter active (or none)."""
    if name in layer.scaling:
        layer.set_adapter(name)
        return layer(x)
    layer.disable_adapters = True
    try:
        return layer(x)
    finally:
        layer.disable_adapters = False


def _mixed(layer: Linear, names: list[str], x: torch.Tensor) -> torch.Tensor:
    uniq = list(dict.fromkeys(names))
    layer._mixed = (uniq, torch.tensor([uniq.index(n) for n in names]))
    try:
        return layer(x)
    finally:
        layer._mixed = None


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=9), t=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_mixed_rows_equal_each_row_alone(names, t, seed):
    """t = 0: 2-D input (B, in), the decode shape of a model that flattens; else (B, t, in)."""
    layer = _layer()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(names), *((t,) if t else ()), 12, generator=g)
    with torch.no_grad():
        got = _mixed(layer, names, x)
        want = torch.cat([_alone(layer, n, x[i:i + 1]) for i, n in enumerate(names)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_steps_reuse_the_plan_and_follow_a_new_batch():
    """The plan is worked out once per batch (kept across steps), and a new batch gets its own."""
    layer = _layer()
    x = torch.randn(4, 1, 12)
    uniq = ["c", "a", BASE_ADAPTER]
    layer._mixed = (uniq, torch.tensor([0, 1, 1, 2]))
    with torch.no_grad():
        first = layer(x)
        plan = layer._mixed_last[2]
        again = layer(x)
        assert layer._mixed_last[2] is plan
        layer._mixed = (["b"], torch.tensor([0, 0, 0, 0]))
        other = layer(x)
        layer._mixed = None
        layer.set_adapter("b")
        torch.testing.assert_close(other, layer(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, again)
    assert "_mixed_cache" not in layer.__dict__ and "_mixed_last" not in layer.__dict__  # a plain call frees the plans


def test_which_weights_a_batch_reads():
    """Rows on consecutive slots in order: a slice of the stack (no copy, no reordering); most of
    the stack in use (any order, shared adapters): the stack in place, rows scattered to its slots;
    few adapters: those gathered (once per batch); base rows: skipped."""
    layer = _layer()
    stack_a = layer._all_stacks(torch.float32)[1]

    def plan(names):
        uniq = list(dict.fromkeys(names))
        layer._mixed = (uniq, torch.tensor([uniq.index(n) for n in names]))
        try:
            return layer._mixed_plan(torch.float32)[:5]  # the bmm path's part; the kernel's: test_lora_rows.py
        finally:
            layer._mixed = None

    a_u, _, sel, pos, m = plan(["a", "b", "c"])  # slots 1, 2, 3 in order
    assert a_u.data_ptr() == stack_a[1].data_ptr() and a_u.shape[0] == 3 and sel is None and pos is None
    a_u, _, sel, pos, m = plan(["b", "c"])  # slots 2, 3: a slice
    assert a_u.data_ptr() == stack_a[2].data_ptr() and a_u.shape[0] == 2 and pos is None
    a_u, _, sel, pos, m = plan(["c", "a", "b"])  # one each, other order: the stack, rows to their slots
    assert a_u.data_ptr() == stack_a[1].data_ptr() and sel is None and pos.tolist() == [2, 0, 1]
    a_u, _, sel, pos, m = plan(["c", "a", "b", "a"])  # "a" twice: the stack, 2 rows per slot
    assert a_u.data_ptr() == stack_a[1].data_ptr() and m == 2 and sel is None
    assert (pos // m).tolist() == [2, 0, 1, 0]  # group of each row, in the stack's slot order a, b, c
    a_u, _, sel, pos, m = plan([BASE_ADAPTER, "b", BASE_ADAPTER])  # 1 of 3 adapters: gathered, base rows skipped
    assert a_u.data_ptr() != stack_a.data_ptr() and a_u.shape[0] == 1 and sel.tolist() == [1] and m == 1
    torch.testing.assert_close(a_u, stack_a[[2]])
    a_u, _, sel, pos, m = plan(["c"])  # one row, one adapter: its weights gathered, no reordering
    assert a_u.shape[0] == 1 and sel is None and pos is None
    torch.testing.assert_close(a_u, stack_a[[3]])


def test_layers_share_the_row_plan_and_keep_theirs_across_batches():
    """A batch's layers with the same adapters share one row plan (worked out once per batch); a
    layer finds its plan again when the same rows come back in a new batch (after a prefill)."""
    from slimtune.methods.lora_mixed import MixedRows

    one, two = _layer(0), _layer(1)
    x = torch.randn(3, 1, 12)
    with torch.no_grad():
        decode = MixedRows(["c", "a"], torch.tensor([0, 1, 0]))
        one._mixed = two._mixed = decode
        one(x), two(x)
        assert len(decode.plans) == 1
        plan = one._mixed_last[2]
        one._mixed = MixedRows(["b"], torch.tensor([0]))  # a prefill of another row
        one(x[:1])
        one._mixed = MixedRows(["c", "a"], torch.tensor([0, 1, 0]))  # the decode batch again
        got = one(x)
        assert one._mixed_last[2] is plan
        one._mixed = two._mixed = None
    want = torch.cat([_alone(one, n, x[i:i + 1]) for i, n in enumerate(["c", "a", "c"])])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_base_rows_only_skip_the_adapters():
    layer = _layer()
    x = torch.randn(3, 2, 12)
    with torch.no_grad():
        got = _mixed(layer, [BASE_ADAPTER, "gone", BASE_ADAPTER], x)
        want = layer.base_layer(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("names", [["a", BASE_ADAPTER, "c", "a"], ["b", "gone"]])
def test_gradients_reach_each_rows_adapter(names):
    """Training on a mixed batch: the loss of each row trains its own adapter only."""
    layer = _layer()
    x = torch.randn(len(names), 3, 12)
    out = _mixed(layer, names, x)
    out.pow(2).sum().backward()
    for n in ADAPTERS:
        grad = layer.lora_B[n].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (n in names)
    with torch.no_grad():
        want = torch.cat([_alone(layer, n, x[i:i + 1]) for i, n in enumerate(names)])
    torch.testing.assert_close(out.detach(), want, atol=1e-5, rtol=1e-5)


def test_bf16_weights_are_opt_in_and_round_only_the_lora_term():
    """`mixed_batch(weights_dtype=torch.bfloat16)` (the server's --mixed-adapter-dtype bfloat16):
    a bf16 stack, half the bytes; the base part stays exact and each row's LoRA term is within
    bf16 rounding of the fp32 one. Without it the stack keeps x's dtype."""
    layer = _layer()
    names = ["c", BASE_ADAPTER, "a", "b", "a"]
    x = torch.randn(len(names), 2, 12)
    with torch.no_grad():
        exact = _mixed(layer, names, x)
        assert layer._mixed_last[2][0].dtype == torch.float32
        layer._mixed_dtype = torch.bfloat16
        half = _mixed(layer, names, x)
        a_u = layer._mixed_last[2][0]
        del layer._mixed_dtype
        base = layer.base_layer(x)
    assert a_u.dtype == torch.bfloat16 and half.dtype == torch.float32
    assert torch.equal(half[1], exact[1])  # the base row: untouched
    delta, delta_half = exact - base, half - base
    assert not torch.equal(delta_half, delta)  # it is a real change, never silently the same path
    torch.testing.assert_close(delta_half, delta, atol=2e-2 * float(delta.abs().max()), rtol=2e-2)


def test_bf16_stacks_are_storage_widened_before_the_prefill_gemms():
    """A bf16 stack under an fp32 model computes in fp32, as the decode kernel does: a prefill (several
    tokens a row) equals the fp32 product with each adapter's A and s·B rounded to bf16, to fp32
    accuracy. Activations rounded to bf16 (torch's bf16 bmm) would miss by ~1e-2."""
    layer = _layer()
    names = ["c", BASE_ADAPTER, "a", "b", "a", "gone"]
    x = torch.randn(len(names), 3, 12)
    with torch.no_grad():
        layer._mixed_dtype = torch.bfloat16
        got = _mixed(layer, names, x)
        del layer._mixed_dtype
        want = layer.base_layer(x)
        for i, n in enumerate(names):
            if n in layer.scaling:
                a = layer.lora_A[n].weight.t().bfloat16().float()
                b = (layer.lora_B[n].weight * layer.scaling[n]).t().bfloat16().float()
                want[i] += x[i] @ a @ b
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_stack_follows_weights_changed_in_place_and_new_adapters():
    """The stack of every adapter is kept across batches, and rebuilt when an adapter's weights
    change in place (an optimizer step, a reload into the same tensors) or an adapter is added."""
    layer = _layer()
    x = torch.randn(3, 1, 12)
    rows = ["a", "c", BASE_ADAPTER]
    with torch.no_grad():
        _mixed(layer, rows, x)
        kept = layer._all_stacks(torch.float32)
        _mixed(layer, rows, x)
        assert layer._all_stacks(torch.float32) is kept  # nothing changed: the same stack
        layer.lora_B["c"].weight.mul_(3.0)  # in place: same pointer, new version
        got = _mixed(layer, rows, x)
        want = torch.cat([_alone(layer, n, x[i:i + 1]) for i, n in enumerate(rows)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        layer.update_layer("d", r=3, lora_alpha=6, lora_dropout=0.0, init_lora_weights=False, use_rslora=False)
        got = _mixed(layer, ["d", "a"], x[:2])
        want = torch.cat([_alone(layer, n, x[i:i + 1]) for i, n in enumerate(["d", "a"])])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_batch_epoch_trusts_the_stack_until_it_changes():
    """tuner.mixed_batch(weights_epoch=E) (the server passes its registry's generation): while E is
    the one a layer's stack was checked under, the stack is reused with no per-tensor check, so a
    change the caller did not announce is not seen; a new E, or no epoch at all, checks and rebuilds."""
    from slimtune.methods.lora_mixed import MixedRows

    layer = _layer()
    x = torch.randn(3, 1, 12)
    rows = ["a", "c", BASE_ADAPTER]

    def run(epoch):
        uniq = list(dict.fromkeys(rows))
        layer._mixed = MixedRows(uniq, torch.tensor([uniq.index(n) for n in rows]), epoch)
        try:
            return layer(x)
        finally:
            layer._mixed = None

    def alone():
        return torch.cat([_alone(layer, n, x[i:i + 1]) for i, n in enumerate(rows)])

    with torch.no_grad():
        first = run(7)
        torch.testing.assert_close(first, alone(), atol=1e-5, rtol=1e-5)
        layer.lora_B["c"].weight.mul_(3.0)  # unannounced: the epoch stays 7
        assert torch.equal(run(7), first)  # trusted, not re-checked
        torch.testing.assert_close(run(8), alone(), atol=1e-5, rtol=1e-5)  # a new epoch: rebuilt
        layer.lora_B["a"].weight.mul_(2.0)
        torch.testing.assert_close(run(None), alone(), atol=1e-5, rtol=1e-5)  # no epoch: always checked
        assert not torch.allclose(run(None), first)
        # an adapter removed and added again under its name (an unload and a reload): its stack goes
        # with it, whatever the epoch
        layer.delete_adapter("c")
        layer.update_layer("c", r=8, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, use_rslora=False)
        torch.testing.assert_close(run(8), alone(), atol=1e-5, rtol=1e-5)
        # under one epoch, another stack dtype or the kernel switched (its rank padding) is another stack
        stacks = layer._all_stacks(torch.float32)
        layer._mixed = MixedRows(["a"], torch.tensor([0]), 8)
        try:
            assert layer._all_stacks(torch.float32) is stacks
            assert layer._all_stacks(torch.bfloat16)[1].dtype == torch.bfloat16
        finally:
            layer._mixed = None
