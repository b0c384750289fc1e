"""VeRA: shared frozen projections and two trained vectors per layer; checked against the real `peft`
package both ways (with and without the projections in the file)."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_gpt2, tiny_llama
from properties import check_merge_and_round_trip, train_lm_steps
from test_method_loha import job_trains

from slimtune import ConfigError, PeftModel, VeraConfig, get_peft_model, make_config
from slimtune.inject import adapter_layers
from slimtune.methods.vera import VeraLinear

CASES = {"llama": (tiny_llama, {}), "gpt2": (tiny_gpt2, {}), "bert": (tiny_bert_cls, {"task_type": "SEQ_CLS"})}


def test_defaults_count_shared_projections_and_identity(ids):
    cfg = make_config("vera", r=4, target_modules=["q_proj", "down_proj"])
    assert isinstance(cfg, VeraConfig) and (cfg.d_initial, cfg.projection_prng_key) == (0.1, 0)
    pm = get_peft_model(tiny_llama(), cfg)
    m = pm.base_model.model.config
    h, i = m.hidden_size, m.intermediate_size
    assert pm.get_nb_trainable_parameters()[0] == m.num_hidden_layers * 2 * (h + 4)  # λ_b (out) + λ_d (r) per layer
    a, b = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    assert tuple(a.shape) == (4, i) and tuple(b.shape) == (h, 4) and not a.requires_grad  # largest in / out
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))
    with pytest.raises(ConfigError, match="bias"):
        VeraConfig(bias="all")
    with pytest.raises(ValueError, match="projection_prng_key"):
        pm.add_adapter("other", VeraConfig(r=4, target_modules=["q_proj"], projection_prng_key=1))


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_round_trip(case, ids, tmp_path):
    make, kw = CASES[case]
    pm = get_peft_model(make(), VeraConfig(r=8, init_weights=False, target_modules="all-linear", **kw))
    check_merge_and_round_trip(pm, make, ids, tmp_path)


def test_training_changes_only_vectors_and_disable_is_base(ids):
    pm = get_peft_model(tiny_llama(), VeraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    proj = pm.base_model.vera_A["default"].clone()
    losses, changed = train_lm_steps(pm, ids, lr=5e-2)
    assert losses[-1] < losses[0]
    assert changed == {k for k, _ in pm.named_parameters() if ".vera_lambda_" in k}
    assert torch.equal(pm.base_model.vera_A["default"], proj)  # the shared projection is frozen
    with torch.no_grad(), pm.disable_adapter():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))


def test_two_adapters_switch_delete_and_mixed_batch_refused(ids, tmp_path):
    pm = get_peft_model(tiny_llama(), VeraConfig(r=8, init_weights=False))
    pm.add_adapter("other", VeraConfig(r=4, init_weights=False, target_modules=["k_proj"]))
    with torch.no_grad():
        a = logits(pm, ids)
        pm.set_adapter("other")
        b = logits(pm, ids)
    assert not torch.allclose(a, b) and tuple(pm.base_model.vera_A["other"].shape) == (4, 32)
    pm.save_pretrained(tmp_path)
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        torch.testing.assert_close(logits(back, ids), b)
    with pytest.raises(ValueError, match="mixed-adapter batches are not supported for vera"):
        with pm.base_model.mixed_batch(["default", "other", "default"]):
            pass
    pm.delete_adapter("other")
    assert "other" not in pm.base_model.vera_A


def test_trains_from_the_job(tmp_path):
    saved = job_trains(tmp_path, {"name": "vera", "r": 16})
    assert saved["peft_type"] == "VERA" and saved["r"] == 16


# ---- compatibility with HF PEFT, both directions ---------------------------------------------
peft = pytest.importorskip("peft")

PEFT_CASES = {
    "llama": (tiny_llama, dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama_no_projection": (tiny_llama, dict(r=8, target_modules=["q_proj", "up_proj"], save_projection=False,
                                             projection_prng_key=7)),
    "gpt2": (tiny_gpt2, dict(r=4)),
    "bert": (tiny_bert_cls, dict(task_type="SEQ_CLS", r=4)),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_saved_loads_in_slimtune(case, ids, tmp_path):
    make, kw = PEFT_CASES[case]
    with pytest.warns(UserWarning) if not kw.get("save_projection", True) else _nothing():
        pp = peft.get_peft_model(make(), peft.VeraConfig(init_weights=False, **kw))
    with torch.no_grad():
        ref = logits(pp, ids)
    pp.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path)
    assert all(isinstance(l, VeraLinear) for _, l in adapter_layers(ours))
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_slimtune_saved_loads_in_peft(case, ids, tmp_path):
    make, kw = PEFT_CASES[case]
    pm = get_peft_model(make(), VeraConfig(init_weights=False, **kw))
    with torch.no_grad():
        ref = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, ids), ref, atol=1e-5, rtol=1e-5)
        theirs.merge_adapter()
        torch.testing.assert_close(logits(theirs, ids), ref, atol=1e-5, rtol=1e-5)


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_gradients_match_peft(ids, tmp_path):
    from test_method_loha import grads_match_peft

    grads_match_peft(peft.VeraConfig(r=8, init_weights=False, target_modules=["q_proj", "down_proj"]),
                     VeraLinear, ids, tmp_path)


@pytest.mark.parametrize("make", ["llama", "gpt2"])
def test_no_grad_folded_weight_equals_projections(make):
    """No-grad calls with many tokens run one GEMM with W + ΔW (cheaper there): the same outputs as
    the training form's two rank-r projections, on Linear and on GPT-2's Conv1D."""
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[make]
    targets = ["q_proj", "v_proj", "down_proj"] if make == "llama" else ["c_attn", "c_proj"]
    torch.manual_seed(4)
    x = torch.randint(0, 50, (8, 16))  # 128 tokens: past out·in/(in + out) for every targeted layer
    pm = get_peft_model(model(), VeraConfig(r=8, init_weights=False, target_modules=targets)).eval()
    with torch.no_grad():
        folded = logits(pm, x)
    projected = logits(pm, x).detach()
    torch.testing.assert_close(folded, projected, atol=1e-5, rtol=1e-5)
