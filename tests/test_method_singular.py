"""Singular-value fine-tuning: only ΔS of frozen SVD bases trains; U, V recomputed on load."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_gpt2, tiny_llama

from slimtune import ConfigError, PeftModel, get_peft_model, make_config
from slimtune.inject import AdapterLayer, ModulesToSaveWrapper, adapter_layers
from slimtune.methods.singular import SingularConfig, SingularLinear

CASES = {"llama": (tiny_llama, {}), "gpt2": (tiny_gpt2, {}), "bert": (tiny_bert_cls, {"task_type": "SEQ_CLS"})}


def randomize(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in pm.get_adapter_state_dict().values():
            v.add_(0.3 * torch.randn(v.shape, generator=g))


def test_config_count_and_identity(ids):
    assert isinstance(make_config("singular", top_k=3), SingularConfig)
    with pytest.raises(ConfigError, match="top_k"):
        SingularConfig(top_k=0)
    base = tiny_llama()
    pm = get_peft_model(base, make_config("singular", target_modules="all-linear"))
    layers = [l for _, l in adapter_layers(pm)]
    assert pm.get_nb_trainable_parameters()[0] == sum(min(l.weight.shape) for l in layers)
    pm3 = get_peft_model(tiny_llama(), make_config("singular", target_modules="all-linear", top_k=3))
    assert pm3.get_nb_trainable_parameters()[0] == 3 * len(layers)
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))
    # the bases reconstruct W: W == U diag(S) Vh, so a ΔS of -S zeroes the layer's weight
    lay = layers[0]
    b = lay.svd_basis["default"]
    s = torch.linalg.svdvals(lay.weight.float())
    torch.testing.assert_close((b.u * s) @ b.vh, lay.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_merge_and_roundtrip(case, ids, tmp_path):
    make, kw = CASES[case]
    pm = get_peft_model(make(), SingularConfig(top_k=4, **kw))
    randomize(pm)
    with torch.no_grad():
        ref = logits(pm, ids)
        assert (ref - logits(make(), ids)).abs().max() > 1e-3
        pm.merge_adapter()
        torch.testing.assert_close(logits(pm, ids), ref, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
        torch.testing.assert_close(logits(pm, ids), ref, atol=1e-5, rtol=1e-5)
    pm.save_pretrained(tmp_path)
    sd = pm.get_adapter_state_dict()
    assert all(k.endswith(".svd_delta_s") or "classifier" in k for k in sd)
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    assert all(isinstance(l, SingularLinear) for _, l in adapter_layers(loaded))
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids), ref, atol=1e-5, rtol=1e-5)
        plain = loaded.merge_and_unload()
        assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in plain.modules())
        torch.testing.assert_close(logits(plain, ids), ref, atol=1e-5, rtol=1e-5)


def test_training_changes_only_singular_values(ids):
    pm = get_peft_model(tiny_llama(), SingularConfig(target_modules="all-linear"))
    before = {k: p.detach().clone() for k, p in pm.named_parameters()}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(6):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, p in pm.named_parameters():
        assert (not torch.equal(before[k], p)) == (".svd_delta_s." in k), k


# ---- every module-swap method of issue 4 holds several named adapters -------------------------
@pytest.mark.parametrize("name, kw", [("ia3", {}), ("sparse", dict(density=0.1)), ("heads", dict(heads=[1])),
                                      ("singular", dict(top_k=4)), ("dora", dict(r=4))])
def test_two_adapters_switch_save_merge_delete(name, kw, ids, tmp_path):
    def rnd(pm, adapter, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for v in pm.get_adapter_state_dict(adapter).values():
                if v.is_floating_point():
                    v.add_(0.3 * torch.randn(v.shape, generator=g))

    pm = get_peft_model(tiny_llama(), make_config(name, **kw))
    pm.add_adapter("b", make_config(name, **kw))
    rnd(pm, "default", 0)
    rnd(pm, "b", 1)
    with torch.no_grad():
        a = logits(pm, ids)
        pm.set_adapter("b")
        b = logits(pm, ids)
        assert (a - b).abs().max() > 1e-3
        trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
        assert trainable and all(n.endswith(".b") or ".b." in n for n in trainable)
        pm.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
        loaded.load_adapter(tmp_path / "b", "b")
        torch.testing.assert_close(logits(loaded, ids), a)
        loaded.set_adapter("b")
        torch.testing.assert_close(logits(loaded, ids), b)
        pm.merge_adapter()
        torch.testing.assert_close(logits(pm, ids), b, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
        pm.delete_adapter("b")
        torch.testing.assert_close(logits(pm, ids), a)
        with pm.disable_adapter():
            torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))
