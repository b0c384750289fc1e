"""DoRA (LoraConfig(use_dora=True)): PEFT's layout (lora_magnitude_vector), checked against peft both ways."""
import json

import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_gpt2, tiny_llama
from properties import check_merge_and_round_trip, train_lm_steps

from slimtune import LoraConfig, PeftModel, get_peft_model, make_config
from slimtune.inject import adapter_layers
from slimtune.methods.dora import DoraConfig, DoraLinear

CASES = {"llama": (tiny_llama, {}), "gpt2": (tiny_gpt2, {}), "bert": (tiny_bert_cls, {"task_type": "SEQ_CLS"})}


def perturb(sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in sd.values():
            v.add_(0.1 * torch.randn(v.shape, generator=g))


def test_make_config_count_and_init_identity(ids):
    cfg = make_config("dora", r=4)
    assert isinstance(cfg, DoraConfig) and cfg.use_dora
    base = tiny_llama()
    pm = get_peft_model(base, cfg)
    lin = [l for _, l in adapter_layers(pm)]
    assert lin and all(isinstance(l, DoraLinear) for l in lin)
    expect = sum(4 * (l.in_features + l.out_features) + l.out_features for l in lin)  # A, B, magnitude
    assert pm.get_nb_trainable_parameters()[0] == expect
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))  # runs as PEFT's (test_peft_behaviour2), unmergeable
    with pytest.raises(NotImplementedError, match="grouped convolution"):
        get_peft_model(grouped, LoraConfig(r=2, target_modules=["0"], use_dora=True)).merge_adapter()


@pytest.mark.parametrize("case", CASES)
def test_merge_and_roundtrip(case, ids, tmp_path):
    make, kw = CASES[case]
    pm = get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, use_dora=True, **kw))
    perturb(pm.get_adapter_state_dict())
    check_merge_and_round_trip(pm, make, ids, tmp_path)

def test_saved_as_peft_lora(tmp_path):
    pm = get_peft_model(tiny_llama(), make_config("dora", r=2))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    keys = list(pm.get_adapter_state_dict())
    assert any(k.endswith("q_proj.lora_magnitude_vector") for k in keys)


def test_training_changes_only_adapter_and_lowers_loss(ids):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
    losses, changed = train_lm_steps(pm, ids)
    assert losses[-1] < losses[0]
    assert changed == {k for k, _ in pm.named_parameters()
                       if any(s in k for s in (".lora_A.", ".lora_B.", ".lora_magnitude_vector."))}


peft = pytest.importorskip("peft")


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_loads_in_slimtune(case, ids, tmp_path):
    make, kw = CASES[case]
    pp = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.1, **kw))
    perturb(dict((n, p) for n, p in pp.named_parameters() if p.requires_grad), seed=1)
    pp.eval()
    with torch.no_grad():
        ref = logits(pp, ids)
    pp.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_slimtune_saved_loads_in_peft(case, ids, tmp_path):
    make, kw = CASES[case]
    pm = get_peft_model(make(), make_config("dora", r=4, lora_alpha=8, **kw))
    perturb(pm.get_adapter_state_dict(), seed=2)
    with torch.no_grad():
        ref = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, ids), ref, atol=1e-6, rtol=1e-5)


def test_no_grad_forwards_reuse_the_weight_norm(ids):
    """Serving computes ‖W + s·B·A‖ once per weight state; a changed adapter recomputes it."""
    from slimtune.methods.dora import DoraLinear

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
    perturb = lambda seed: [p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))  # noqa: E731
                            for n, p in pm.named_parameters() if "lora_B" in n]
    perturb(0)
    pm.eval()
    layer = next(l for _, l in adapter_layers(pm) if isinstance(l, DoraLinear))
    calls = []
    real = layer._weight_norm
    layer._weight_norm = lambda *a: calls.append(1) or real(*a)
    with torch.no_grad():
        first = logits(pm, ids)
        again = logits(pm, ids)
    assert len(calls) == 1 and torch.equal(first, again)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # an in-place update bumps the version: the cached norm is dropped
        changed = logits(pm, ids)
    assert len(calls) == 2 and not torch.equal(changed, first)
    with torch.enable_grad():
        torch.testing.assert_close(logits(pm, ids).detach(), changed)  # the no-cache path agrees
