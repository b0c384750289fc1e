"""Behaviour PEFT users rely on, checked side by side with the real `peft` (issue 17, items 1-11).

Each test runs the same steps in both libraries (or moves a file between them) and asserts the
same outputs, the same exception type, or the same warning.
"""
import warnings

import peft
import pytest
import torch
from conftest import VOCAB, logits, randomize_lora, tiny_bert_cls, tiny_llama

import slimtune
from slimtune.inject import adapter_layers

LIBS = {"peft": peft, "slimtune": slimtune}


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def tiny_gemma(seed: int = 0, tied: bool = False):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return GemmaForCausalLM(cfg).eval()


def perturb(pm, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))


# ---- 1. a second adapter on other modules stays inactive ---------------------------------------
@pytest.mark.parametrize("how", ["add_adapter", "load_adapter"])
@pytest.mark.parametrize("lib", LIBS)
def test_second_adapter_on_other_modules_is_inactive(lib, how, ids, tmp_path):
    L = LIBS[lib]
    pm = quiet(L.get_peft_model, tiny_llama(), L.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.eval()
    before = logits(pm, ids)
    other = L.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False)
    if how == "add_adapter":
        quiet(pm.add_adapter, "other", other)
    else:
        src = quiet(L.get_peft_model, tiny_llama(), other)
        src.save_pretrained(tmp_path)
        quiet(pm.load_adapter, tmp_path, adapter_name="other")
    assert pm.active_adapter == "default"
    torch.testing.assert_close(logits(pm, ids), before, rtol=0, atol=0)
    pm.set_adapter("other")
    assert (logits(pm, ids) - before).abs().max() > 1e-3


# ---- 2. PiSSA reloads onto the original base; conversion to plain LoRA ----------------------------
def test_pissa_adapter_reloads_onto_original_base_as_peft(ids, tmp_path):
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    theirs = quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(**cfg))
    perturb(theirs)  # "training"
    ref = logits(theirs.eval(), ids)
    theirs.save_pretrained(tmp_path)
    ours = slimtune.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(ours, ids), ref, atol=1e-5, rtol=1e-4)
    ours.save_pretrained(tmp_path / "again")  # and back: ours re-saved loads in peft the same way
    back = quiet(peft.PeftModel.from_pretrained, tiny_llama(), tmp_path / "again")
    torch.testing.assert_close(logits(back.eval(), ids), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_to_plain_lora_applies_to_original_base(init, ids, tmp_path):
    pm = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=init))
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids), atol=1e-4, rtol=1e-4)
    pm.save_pretrained(tmp_path / "init")
    perturb(pm)
    ref = logits(pm, ids)
    pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    import json
    disk = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert disk["r"] == 8 and disk["lora_alpha"] == 16 and disk["init_lora_weights"] is True
    for L in LIBS.values():  # a plain LoRA on the *original* base, in both libraries
        loaded = quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path / "lora")
        torch.testing.assert_close(logits(loaded.eval(), ids), ref, atol=1e-4, rtol=1e-4)


def test_peft_converted_pissa_loads_in_slimtune(ids, tmp_path):
    theirs = quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial folder
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    perturb(theirs)
    ref = logits(theirs.eval(), ids)
    quiet(theirs.save_pretrained, tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours = slimtune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    torch.testing.assert_close(logits(ours, ids), ref, atol=1e-4, rtol=1e-4)


# ---- 3. scaled embeddings (Gemma's embed_scale) ----------------------------------------------------
def test_lora_on_scaled_embedding_merges_exactly_and_matches_peft(ids, tmp_path):
    theirs = quiet(peft.get_peft_model, tiny_gemma(), peft.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                                      init_lora_weights=False))
    ref = logits(theirs.eval(), ids)
    theirs.save_pretrained(tmp_path)
    ours = slimtune.PeftModel.from_pretrained(tiny_gemma(), tmp_path)
    torch.testing.assert_close(logits(ours, ids), ref, atol=1e-5, rtol=1e-5)
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, ids), ref, atol=1e-4, rtol=1e-4)


# ---- 4. an embedding tied to the LM head ------------------------------------------------------------
def test_lora_on_tied_embedding_merges_without_changing_the_head(ids, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.warns(UserWarning, match="shares its weight"):
        pm = slimtune.get_peft_model(tiny_gemma(tied=True), slimtune.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                                                init_lora_weights=False))
    ref = logits(pm, ids)
    with pytest.warns(UserWarning, match="own copy"):
        pm.merge_adapter()
    torch.testing.assert_close(logits(pm, ids), ref, atol=1e-4, rtol=1e-4)
    pm.unmerge_adapter()
    merged = pm.merge_and_unload()
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    torch.testing.assert_close(logits(merged, ids), ref, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(again, ids), ref, atol=1e-4, rtol=1e-4)


def test_peft_warns_on_tied_layer_too():  # the same situation, PEFT's warning (it merges into both)
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        peft.get_peft_model(tiny_gemma(tied=True), peft.LoraConfig(r=4, target_modules=["embed_tokens"]))


# ---- 5. what several adapters cannot share ----------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_second_adapter_with_bias_is_refused(lib):
    L = LIBS[lib]
    pm = quiet(L.get_peft_model, tiny_llama(), L.LoraConfig(r=4, target_modules=["q_proj"], bias="all"))
    with pytest.raises(ValueError, match="bias"):
        quiet(pm.add_adapter, "other", L.LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"))
    quiet(pm.add_adapter, "plain", L.LoraConfig(r=4, target_modules=["q_proj"]))  # bias="none" is fine


@pytest.mark.parametrize("lib", LIBS)
def test_two_active_adapters_sharing_a_saved_module_are_refused(lib):
    L = LIBS[lib]
    kw = dict(r=4, target_modules=["query"], modules_to_save=["classifier"])
    pm = quiet(L.get_peft_model, tiny_bert_cls(), L.LoraConfig(**kw))
    quiet(pm.add_adapter, "other", L.LoraConfig(**kw))
    with pytest.raises(ValueError):
        (pm.base_model if lib == "peft" else pm).set_adapter(["default", "other"])


class WithHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 2)})

    def forward(self, x):
        return self.heads["a"](self.proj(x))


@pytest.mark.parametrize("lib", LIBS)
def test_modules_to_save_on_a_container_or_adapter_layer_is_refused(lib):
    L = LIBS[lib]
    with pytest.raises(TypeError):
        quiet(L.get_peft_model, WithHeads(), L.LoraConfig(r=4, target_modules=["proj"], modules_to_save=["heads"]))
    pm = quiet(L.get_peft_model, tiny_llama(), L.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError):
        quiet(pm.add_adapter, "other", L.LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["q_proj"]))


# ---- 6. disable_adapter() freezes the adapter -------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_disable_adapter_freezes_adapter_parameters(lib):
    L = LIBS[lib]
    pm = quiet(L.get_peft_model, tiny_bert_cls(), L.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    with pm.disable_adapter():
        assert not any(p.requires_grad for p in pm.parameters())
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == trainable


# ---- 7. attributes of a modules_to_save wrapper are the active copy's ---------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_modules_to_save_attribute_is_the_active_copy(lib):
    L = LIBS[lib]
    pm = quiet(L.get_peft_model, tiny_bert_cls(), L.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    w = pm.base_model.model.classifier
    assert w.weight is w.modules_to_save["default"].weight
    assert w.weight.requires_grad and not w.original_module.weight.requires_grad
    with pm.disable_adapter():
        assert w.weight is w.original_module.weight


# ---- 8. add_weighted_adapter --------------------------------------------------------------------------
def _two_adapters(lib, tmp_path, ranks=(4, 4), rank_pattern=None):
    """The same two random adapters in both libraries (made by peft, loaded by each)."""
    if not (tmp_path / "a").exists():
        for i, (name, r) in enumerate(zip("ab", ranks)):
            torch.manual_seed(10 + i)
            src = quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                rank_pattern=rank_pattern or {}))
            src.save_pretrained(tmp_path / name)
    L = LIBS[lib]
    pm = quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path / "a", adapter_name="a")
    quiet(pm.load_adapter, tmp_path / "b", adapter_name="b")
    return pm


DETERMINISTIC = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_weighted_adapter_equals_peft(kind, ids, tmp_path):
    outs = {}
    for lib in LIBS:
        pm = _two_adapters(lib, tmp_path)
        quiet(pm.add_weighted_adapter, ["a", "b"], [0.7, -0.4], "mix", combination_type=kind, density=0.5)
        pm.set_adapter("mix")
        outs[lib] = logits(pm.eval(), ids)
    torch.testing.assert_close(outs["slimtune"], outs["peft"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_merge_ops_equal_peft_merge_utils(op, method):
    """The combinations themselves, against PEFT's functions (the dare ones with the same random draws;
    whole adapters draw in another order, since the two libraries initialise new layers differently)."""
    from peft.utils import merge_utils

    from slimtune.methods.merge_ops import combine

    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(6, 5, generator=g) for _ in range(3)]
    w = torch.tensor([0.5, -1.2, 0.8])
    ref_fn = {"linear": lambda: merge_utils.task_arithmetic(ts, w),
              "ties": lambda: merge_utils.ties(ts, w, 0.4, method),
              "dare_linear": lambda: merge_utils.dare_linear(ts, w, 0.4),
              "dare_ties": lambda: merge_utils.dare_ties(ts, w, 0.4, method),
              "magnitude_prune": lambda: merge_utils.magnitude_prune(ts, w, 0.4)}[op]
    torch.manual_seed(7)
    ref = ref_fn()
    torch.manual_seed(7)
    torch.testing.assert_close(combine(op, ts, w, 0.4, method), ref)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_weighted_dare_runs_and_density_one_is_plain(kind, ids, tmp_path):
    pm = _two_adapters("slimtune", tmp_path)
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=kind, density=0.5)
    plain = {"dare_linear": "linear", "dare_ties": "ties", "dare_linear_svd": "svd", "dare_ties_svd": "ties_svd"}[kind]
    with pytest.warns(UserWarning, match="nothing is pruned"):
        pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "d1", combination_type=kind, density=1.0)
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ref", combination_type=plain, density=1.0)
    outs = {}
    for n in ("mix", "d1", "ref"):
        pm.set_adapter(n)
        outs[n] = logits(pm, ids)
    torch.testing.assert_close(outs["d1"], outs["ref"], atol=1e-5, rtol=1e-4)
    assert (outs["mix"] - outs["ref"]).abs().max() > 1e-4  # half the entries dropped: another adapter


def test_weighted_cat_with_rank_pattern_equals_peft(ids, tmp_path):
    outs = {}
    for lib in LIBS:
        pm = _two_adapters(lib, tmp_path, ranks=(2, 4), rank_pattern={"q_proj": 6})
        quiet(pm.add_weighted_adapter, ["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
        pm.set_adapter("mix")
        outs[lib] = logits(pm.eval(), ids)
    torch.testing.assert_close(outs["slimtune"], outs["peft"], atol=1e-5, rtol=1e-4)


def test_negative_weight_subtracts_an_adapter(ids, tmp_path):
    pm = _two_adapters("slimtune", tmp_path)
    pm.add_weighted_adapter(["a"], [-1.0], "neg", combination_type="cat")
    layer = next(layer for _, layer in adapter_layers(pm) if "neg" in layer.scaling)
    torch.testing.assert_close(layer.get_delta_weight("neg"), -layer.get_delta_weight("a"))


def test_weighted_adapter_keeps_the_trained_head(ids):
    """Deliberately unlike PEFT (which gives the new adapter an untrained copy): the combination of
    one adapter with a trained head runs with that head."""
    pm = slimtune.get_peft_model(tiny_bert_cls(), slimtune.LoraConfig(r=4, target_modules=["query"],
                                                                      modules_to_save=["classifier"]))
    randomize_lora(pm)
    w = pm.base_model.model.classifier
    with torch.no_grad():
        w.modules_to_save["default"].weight.add_(1.0)
    ref = logits(pm, ids)
    pm.add_weighted_adapter(["default"], [1.0], "copy", combination_type="linear")
    pm.set_adapter("copy")
    torch.testing.assert_close(logits(pm, ids), ref, atol=1e-5, rtol=1e-5)
    pm.add_adapter("other", slimtune.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="modules_to_save"):  # two trained heads: no rule to combine them
        pm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "both", combination_type="linear")


def test_ia3_weighted_adapter_equals_peft(ids):
    outs = {}
    for lib, L in LIBS.items():
        torch.manual_seed(0)
        pm = quiet(L.get_peft_model, tiny_llama(), L.IA3Config(target_modules=["k_proj", "down_proj"],
                                                               feedforward_modules=["down_proj"], init_ia3_weights=False))
        torch.manual_seed(1)
        quiet(pm.add_adapter, "b", L.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                               init_ia3_weights=False))
        quiet(pm.add_weighted_adapter, ["default", "b"], [0.3, 0.9], "mix")
        pm.set_adapter("mix")
        outs[lib] = logits(pm.eval(), ids)
    torch.testing.assert_close(outs["slimtune"], outs["peft"], atol=1e-5, rtol=1e-4)


# ---- 9. no adapter left, none active ------------------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_deleting_the_last_adapter_leaves_none_active(lib):
    L = LIBS[lib]
    pm = quiet(L.get_peft_model, tiny_llama(), L.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.delete_adapter("default")
    assert pm.active_adapters == [] and pm.base_model.active_adapters == []


# ---- 10. load results, and keys PEFT tolerates --------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_load_adapter_returns_missing_and_unexpected_keys(lib, tmp_path):
    L = LIBS[lib]
    quiet(L.get_peft_model, tiny_llama(), L.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    pm = quiet(L.get_peft_model, tiny_llama(), L.LoraConfig(r=4, target_modules=["q_proj"]))
    res = quiet(pm.load_adapter, tmp_path, adapter_name="other")
    assert res.missing_keys == [] and res.unexpected_keys == []


def test_non_strict_load_reports_instead_of_raising(tmp_path):
    slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    pm = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(slimtune.CheckpointError, match="no place"):
        pm.load_adapter(tmp_path, adapter_name="default")  # into the existing adapter, other targets
    res = pm.load_adapter(tmp_path, adapter_name="default", strict=False)
    assert any("v_proj" in k for k in res.unexpected_keys) and any("k_proj" in k for k in res.missing_keys)


def test_peft_file_with_bias_all_and_saved_head_loads(ids, tmp_path):
    theirs = quiet(peft.get_peft_model, tiny_bert_cls(), peft.LoraConfig(r=4, target_modules=["query", "value"], bias="all",
                                                                         modules_to_save=["classifier"], init_lora_weights=False))
    perturb(theirs)
    ref = logits(theirs.eval(), ids)
    theirs.save_pretrained(tmp_path)
    ours = slimtune.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    torch.testing.assert_close(logits(ours, ids), ref, atol=1e-5, rtol=1e-5)


# ---- 11. merging twice warns; from_pretrained keeps the config it is given ------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_merging_twice_warns(lib):
    L = LIBS[lib]
    pm = quiet(L.get_peft_model, tiny_llama(), L.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        pm.merge_adapter()
    pm.unmerge_adapter()
    with pytest.warns(UserWarning, match="Already unmerged"):
        pm.unmerge_adapter()


@pytest.mark.parametrize("lib", LIBS)
def test_from_pretrained_keeps_the_given_config(lib, tmp_path):
    L = LIBS[lib]
    quiet(L.get_peft_model, tiny_llama(), L.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    c = L.LoraConfig(r=4, target_modules=["q_proj"])
    pm = quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path, config=c)
    assert pm.peft_config["default"] is c and c.inference_mode
