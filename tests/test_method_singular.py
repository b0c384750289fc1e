"""Singular-value fine-tuning: only ΔS of frozen SVD bases trains; U, V recomputed on load."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_gpt2, tiny_llama
from properties import check_merge_and_round_trip, perturb_adapter, train_lm_steps

from slimtune import ConfigError, PeftModel, get_peft_model, make_config
from slimtune.inject import adapter_layers
from slimtune.methods.singular import SingularConfig, SingularLinear

CASES = {"llama": (tiny_llama, {}), "gpt2": (tiny_gpt2, {}), "bert": (tiny_bert_cls, {"task_type": "SEQ_CLS"})}


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
    perturb_adapter(pm)
    check_merge_and_round_trip(pm, make, ids, tmp_path, load_atol=1e-5)
    assert all(k.endswith(".svd_delta_s") or "classifier" in k for k in pm.get_adapter_state_dict())
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    assert all(isinstance(l, SingularLinear) for _, l in adapter_layers(loaded))

@pytest.mark.parametrize("case", CASES)
def test_inference_on_many_tokens_folds_the_update(case):
    """No-grad forwards over more tokens than out·in/(in+out) run one GEMM with W + U·diag(ΔS)·Vᵀ;
    the result equals the two-projection path used for few tokens and for training."""
    make, kw = CASES[case]
    pm = get_peft_model(make(), SingularConfig(target_modules="all-linear" if case != "gpt2" else None, **kw))
    perturb_adapter(pm)
    pm.eval()
    ids = torch.randint(0, 128, (4, 40), generator=torch.Generator().manual_seed(0))  # 160 tokens > 32·64/96
    layer = next(l for _, l in adapter_layers(pm))
    with torch.no_grad():
        assert layer._fold_for_inference(torch.zeros(160, layer.weight.shape[-1] if not layer.fan_in_fan_out
                                                     else layer.weight.shape[0]))
        folded = logits(pm, ids)
    with torch.enable_grad():
        two_gemm = logits(pm, ids).detach()
    torch.testing.assert_close(folded, two_gemm, atol=1e-4, rtol=1e-4)


def test_training_changes_only_singular_values(ids):
    pm = get_peft_model(tiny_llama(), SingularConfig(target_modules="all-linear"))
    losses, changed = train_lm_steps(pm, ids, lr=5e-2)
    assert losses[-1] < losses[0]
    assert changed == {k for k, _ in pm.named_parameters() if ".svd_delta_s." in k}

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
