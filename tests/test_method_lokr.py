"""LoKr: PEFT-compatible Kronecker-product deltas; checked against the real `peft` package both ways."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_llama
from properties import check_merge_and_round_trip, train_lm_steps
from test_method_loha import _CNN, job_trains, pics  # noqa: F401  (the conv model and its input fixture)

from slimtune import ConfigError, LoKrConfig, PeftModel, get_peft_model, make_config
from slimtune.inject import adapter_layers
from slimtune.methods.lokr import LoKrLayer, factorization


def _shapes(pm, path_end):
    layer = next(l for n, l in adapter_layers(pm) if n.endswith(path_end))
    return {a: tuple(getattr(layer, a)["default"].shape) for a in layer.adapter_layer_names if "default" in getattr(layer, a)}


def test_defaults_shapes_and_identity(ids):
    cfg = make_config("lokr")
    assert isinstance(cfg, LoKrConfig) and (cfg.r, cfg.alpha, cfg.decompose_factor) == (8, 8, -1)
    pm = get_peft_model(tiny_llama(), cfg)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    # q_proj 32×32 = (4·8)×(4·8): r=8 ≥ 8/2, so W2 is a full (8, 8) matrix
    assert _shapes(pm, "0.self_attn.q_proj") == {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))
    small = get_peft_model(tiny_llama(), LoKrConfig(r=1, decompose_both=True, target_modules=["down_proj"]))
    # down_proj 32×64: out (4, 8), in (8, 8); r=1 < 8/2 on both sides, so both factors are rank-1 products
    assert _shapes(small, "0.mlp.down_proj") == {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 8),
                                                "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}
    with pytest.raises(ConfigError, match="init_weights"):
        LoKrConfig(init_weights="gaussian")


def test_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as theirs

    for dim in list(range(1, 200)) + [576, 1536, 4096, 11008]:
        for f in (-1, 2, 3, 4, 8, 16):
            assert factorization(dim, f) == theirs(dim, f), (dim, f)


@pytest.mark.parametrize("kw", [dict(init_weights=False, target_modules="all-linear"),
                                dict(init_weights=False, r=1, decompose_both=True, decompose_factor=4)])
def test_merge_unmerge_and_round_trip(kw, ids, tmp_path):
    pm = get_peft_model(tiny_llama(), LoKrConfig(**kw))
    check_merge_and_round_trip(pm, tiny_llama, ids, tmp_path)


def test_training_changes_only_factors_and_disable_is_base(ids):
    pm = get_peft_model(tiny_llama(), LoKrConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    losses, changed = train_lm_steps(pm, ids, lr=2e-2)
    assert losses[-1] < losses[0]
    expected = {f"{path}.{attr}.default" for path, layer in adapter_layers(pm)
                for attr in layer.adapter_layer_names if "default" in getattr(layer, attr)}
    assert changed == expected
    with torch.no_grad(), pm.disable_adapter():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))


def test_mixed_batch_refused(ids):
    pm = get_peft_model(tiny_llama(), LoKrConfig())
    pm.add_adapter("other", LoKrConfig())
    with pytest.raises(ValueError, match="mixed-adapter batches are not supported for lokr"):
        with pm.base_model.mixed_batch(["default", "other", "default"]):
            pass


def test_conv_layers_merge_and_round_trip(pics, tmp_path):  # noqa: F811
    for r, effective in ((8, False), (1, False), (1, True)):
        cfg = LoKrConfig(r=r, target_modules=["conv", "point", "conv1d"], init_weights=False,
                         use_effective_conv2d=effective)
        pm = get_peft_model(_CNN(), cfg)
        check_merge_and_round_trip(pm, _CNN, pics, tmp_path / f"{r}{effective}")


# ---- compatibility with HF PEFT, both directions ---------------------------------------------
peft = pytest.importorskip("peft")

PEFT_CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
                               alpha_pattern={"v_proj": 3})),
    "llama_both": (tiny_llama, dict(r=1, decompose_both=True, decompose_factor=4, target_modules="all-linear")),
    "bert": (tiny_bert_cls, dict(task_type="SEQ_CLS", r=2)),
    "cnn": (_CNN, dict(r=1, target_modules=["conv", "point", "conv1d"], use_effective_conv2d=True)),
    "cnn_flat": (_CNN, dict(r=1, target_modules=["conv", "point", "conv1d"])),
    "cnn_full": (_CNN, dict(r=8, target_modules=["conv", "point", "conv1d"])),
}


def _inputs(case, ids, pics):
    return pics if case.startswith("cnn") else ids


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_saved_loads_in_slimtune(case, ids, pics, tmp_path):  # noqa: F811
    make, kw = PEFT_CASES[case]
    x = _inputs(case, ids, pics)
    pp = peft.get_peft_model(make(), peft.LoKrConfig(init_weights=False, **kw))
    with torch.no_grad():
        ref = logits(pp, x)
    pp.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path)
    assert all(isinstance(l, LoKrLayer) for _, l in adapter_layers(ours))
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_slimtune_saved_loads_in_peft(case, ids, pics, tmp_path):  # noqa: F811
    make, kw = PEFT_CASES[case]
    x = _inputs(case, ids, pics)
    pm = get_peft_model(make(), LoKrConfig(init_weights=False, **kw))
    with torch.no_grad():
        ref = logits(pm, x)
    pm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, x), ref, atol=1e-5, rtol=1e-5)
        theirs.merge_adapter()
        torch.testing.assert_close(logits(theirs, x), ref, atol=1e-5, rtol=1e-5)


def test_lycoris_init_starts_at_base(ids):
    pm = get_peft_model(tiny_llama(), LoKrConfig(r=1, init_weights="lycoris"))
    pp = peft.get_peft_model(tiny_llama(), peft.LoKrConfig(r=1, init_weights="lycoris"))
    q = pp.base_model.model.model.layers[0].self_attn.q_proj
    theirs = {a: tuple(getattr(q, a)["default"].shape) for a in LoKrLayer.adapter_layer_names if "default" in getattr(q, a)}
    assert _shapes(pm, "0.self_attn.q_proj") == theirs
    zero = {a for a, v in theirs.items() if not getattr(q, a)["default"].any()}
    layer = next(l for n, l in adapter_layers(pm) if n.endswith("0.self_attn.q_proj"))
    assert {a for a in theirs if not getattr(layer, a)["default"].any()} == zero == {"lokr_w2_b"}
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))


def test_trains_from_the_job(tmp_path):
    saved = job_trains(tmp_path, {"name": "lokr", "r": 2, "decompose_both": True})
    assert saved["peft_type"] == "LOKR" and saved["decompose_both"] is True


@pytest.mark.parametrize("kw", [dict(r=1, decompose_both=True), dict(r=16, alpha=32)])  # W2 low-rank / full
def test_gradients_match_peft(kw, ids, tmp_path):
    """Training on a Linear runs the factored W1·X·W2ᵀ (ΔW never built): PEFT's loss and gradients."""
    from test_method_loha import grads_match_peft

    grads_match_peft(peft.LoKrConfig(init_weights=False, target_modules="all-linear", **kw), LoKrLayer, ids, tmp_path)
