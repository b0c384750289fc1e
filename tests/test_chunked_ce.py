"""Chunked linear cross-entropy (kernels/chunked_ce.py): same loss and gradients as the model's own
loss, applied only where that holds (the job's use of it: train/lm.py, tests/test_job_speed.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama

from slimtune import LoraConfig, PromptTuningConfig, get_peft_model
from slimtune.kernels import chunked_ce

pytestmark = pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="needs torch >= 2.13")


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt whose tokens carry no loss
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # right padding
    labels[2, 7:] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _loss_and_grads(pm, fn, batch):
    pm.zero_grad()
    loss = fn(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rows", [4, 256])  # several chunks, and one
def test_equals_model_loss_and_gradients(monkeypatch, rows):
    monkeypatch.setattr(chunked_ce, "CHUNK_ROWS", rows)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    pm.train()
    fn = chunked_ce.chunked_causal_lm_loss(pm)
    assert fn is not None
    b = _batch()
    l1, g1 = _loss_and_grads(pm, fn, b)
    l0, g0 = _loss_and_grads(pm, lambda x: pm(**x).loss, b)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    assert g1.keys() == g0.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("case", ["prompt_tuning", "adapted_head", "unknown_family"])
def test_not_applied_where_it_would_differ(case):
    if case == "prompt_tuning":
        pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
        why = "hooks"
    elif case == "adapted_head":
        pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
        why = "not a plain Linear"
    else:
        pm = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
        why = "gpt2"
    ok, reason = chunked_ce.chunked_ce_status(pm)
    assert not ok and why in reason
    assert chunked_ce.chunked_causal_lm_loss(pm) is None


def test_saves_no_logits():
    """The stock loss keeps the (tokens × vocab) log-softmax for backward; the chunked one keeps none."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    pm.train()
    b = _batch()
    n_tok, vocab = b["input_ids"].numel(), 128
    sizes: list[tuple] = []

    def pack(t):
        sizes.append(tuple(t.shape))
        return t

    for fn in (lambda x: pm(**x).loss, chunked_ce.chunked_causal_lm_loss(pm)):
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(b)
        loss.backward()
        has_logits = any(s and s[-1] == vocab and (len(s) == 2 and s[0] >= n_tok or len(s) == 3) for s in sizes)
        assert has_logits == (fn.__name__ == "<lambda>")
