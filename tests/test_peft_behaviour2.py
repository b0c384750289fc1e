"""The last PEFT behaviours of issue 26, checked side by side with the real `peft` 0.21.2.

Each test runs the same steps in both libraries and asserts the same outputs, exception type,
warning or file content.
"""
import warnings

import peft
import pytest
import torch
import torch.nn as nn
from conftest import logits, tiny_llama

import slimtune
from slimtune.inject import adapter_layers

LIBS = {"peft": peft, "slimtune": slimtune}


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def lora(L, **kw):
    return quiet(L.get_peft_model, tiny_llama(), L.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False, **kw)).eval()


class MLP(nn.Module):
    """A custom model: no `.config`, as in PEFT's own custom-model tests."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


# ---- disable_adapter() restores the state from before ---------------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_disable_adapter_keeps_disabled_layers_disabled(lib, ids):
    pm = lora(LIBS[lib])
    with pm.disable_adapter():
        base = logits(pm, ids)
    pm.base_model.disable_adapter_layers()
    with pm.disable_adapter():
        pass
    torch.testing.assert_close(logits(pm, ids), base, rtol=0, atol=0)  # still disabled after the block
    pm.base_model.enable_adapter_layers()
    assert not torch.equal(logits(pm, ids), base)


@pytest.mark.parametrize("lib", LIBS)
def test_disable_adapter_on_half_disabled_model_warns_and_enables_all(lib, ids):
    pm = lora(LIBS[lib])
    enabled = logits(pm, ids)
    layers = [m for m in pm.modules() if hasattr(m, "disable_adapters") and hasattr(m, "merged_adapters")]
    if lib == "peft":
        layers[0].enable_adapters(False)
    else:
        layers[0].disable_adapters = True
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
        with pm.disable_adapter():
            pass
    torch.testing.assert_close(logits(pm, ids), enabled, rtol=0, atol=0)


# ---- model card of a custom model: no base_model -------------------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_model_card_of_custom_model_has_no_base_model(lib, tmp_path):
    from huggingface_hub import ModelCard

    L = LIBS[lib]
    cfg = L.LoraConfig(r=2, target_modules=["lin0"], base_model_name_or_path="my/custom-model")
    pm = quiet(L.get_peft_model, MLP(), cfg)
    pm.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model is None


# ---- deleting a merged adapter -------------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_deleting_a_merged_adapter_raises_value_error_and_deletes_nothing(lib, ids):
    pm = lora(LIBS[lib])
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        pm.delete_adapter("default")
    assert list(pm.peft_config) == ["default"]
    pm.unmerge_adapter()
    pm.delete_adapter("default")
    assert list(pm.peft_config) == []


# ---- PiSSA/OLoRA with rsLoRA and rank/alpha patterns ---------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("lib", LIBS)
def test_pissa_olora_with_rslora_and_patterns_warn(lib, init, pattern):
    L = LIBS[lib]
    with pytest.warns(UserWarning, match="path_initial_model_for_weight_conversion"):
        L.LoraConfig(r=4, init_lora_weights=init, use_rslora=True, **{pattern: {"q_proj": 8}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.LoraConfig(r=4, init_lora_weights=init, use_rslora=False, **{pattern: {"q_proj": 8}})


# ---- save_embedding_layers / ignore_mismatched_sizes ---------------------------------------
def _resized(L, targets):
    m = tiny_llama()
    m.resize_token_embeddings(m.config.vocab_size + 8)
    with torch.no_grad():
        m.get_input_embeddings().weight[-8:].normal_(generator=torch.Generator().manual_seed(1))
    return quiet(L.get_peft_model, m, L.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()


@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "embed_tokens"]])
def test_save_embedding_layers_writes_peft_keys_and_loads_both_ways(targets, tmp_path):
    from safetensors.torch import load_file

    keys = {}
    for lib, L in LIBS.items():
        pm = _resized(L, targets)
        quiet(pm.save_pretrained, tmp_path / lib, save_embedding_layers=True)
        keys[lib] = set(load_file(tmp_path / lib / "adapter_model.safetensors"))
    assert keys["slimtune"] == keys["peft"]
    assert any(k.endswith("embed_tokens.weight") or k.endswith("embed_tokens.base_layer.weight") for k in keys["peft"])
    x = torch.tensor([[1, 130, 133, 5]])
    for src, L in (("peft", slimtune), ("slimtune", peft)):  # each library loads the other's file
        want = logits(_resized(LIBS[src], targets), x)  # (the saving library's random init, rebuilt)
        fresh = tiny_llama()
        fresh.resize_token_embeddings(fresh.config.vocab_size + 8)  # new rows random until the file fills them
        pm = quiet(L.PeftModel.from_pretrained, fresh, tmp_path / src).eval()
        torch.testing.assert_close(logits(pm, x), want)


@pytest.mark.parametrize("lib", LIBS)
def test_save_embedding_layers_auto_and_false(lib, tmp_path):
    from safetensors.torch import load_file

    pm = _resized(LIBS[lib], ["q_proj", "embed_tokens"])
    with pytest.warns(UserWarning, match="embedding layers found in `target_modules`"):
        pm.save_pretrained(tmp_path / "auto")
    assert any("base_layer" in k for k in load_file(tmp_path / "auto" / "adapter_model.safetensors"))
    quiet(pm.save_pretrained, tmp_path / "off", save_embedding_layers=False)
    assert not any("base_layer" in k for k in load_file(tmp_path / "off" / "adapter_model.safetensors"))


@pytest.mark.parametrize("lib", LIBS)
def test_ignore_mismatched_sizes_leaves_other_shapes_out(lib, ids, tmp_path):
    L = LIBS[lib]
    lora(L).save_pretrained(tmp_path)  # r=4
    base = logits(tiny_llama().eval(), ids)
    bigger = L.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])  # B starts at zero: the base model's output
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
        pm = L.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=bigger, ignore_mismatched_sizes=True)
    torch.testing.assert_close(logits(pm.eval(), ids), base)
    with pytest.raises((RuntimeError, ValueError)):
        quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path, config=L.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))


# ---- LoraConfig._register_custom_module ----------------------------------------------------
class MyLinear(nn.Module):
    """A layer type neither library knows: y = x Wᵀ + b with its own parameters."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.in_features, self.out_features = i, o
        self.weight = nn.Parameter(torch.randn(o, i) / i ** 0.5)
        self.bias = nn.Parameter(torch.zeros(o))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.out = MyLinear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.inner(x)))


def _custom_lora_cls(lib):
    """The user's LoRA class for MyLinear, written against each library's LoRA Linear layer."""
    if lib == "peft":
        from peft.tuners.lora.layer import Linear as Base

        class MyLora(Base):
            def __init__(self, base_layer, adapter_name, config=None, **kw):
                super().__init__(base_layer, adapter_name, config=config, **kw)
    else:
        from slimtune.methods.lora_layers import Linear as Base

        class MyLora(Base):
            def __init__(self, base_layer, adapter_name, config=None, **kw):
                super().__init__(base_layer, adapter_name, **kw)
    return MyLora


def _custom(lib):
    L = LIBS[lib]
    cfg = L.LoraConfig(r=2, target_modules=["inner"], init_lora_weights=False)
    cfg._register_custom_module({MyLinear: _custom_lora_cls(lib)})
    return cfg


@pytest.mark.parametrize("lib", LIBS)
def test_unknown_layer_type_needs_a_registered_module(lib):
    L = LIBS[lib]
    with pytest.raises((ValueError, TypeError)):
        quiet(L.get_peft_model, CustomNet(), L.LoraConfig(r=2, target_modules=["inner"]))
    pm = quiet(L.get_peft_model, CustomNet(), _custom(lib))
    assert isinstance(pm.get_base_model().inner, _custom_lora_cls(lib).__mro__[1])


def test_custom_module_files_and_outputs_both_ways(tmp_path):
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    for src, dst in (("peft", "slimtune"), ("slimtune", "peft")):
        pm = quiet(LIBS[src].get_peft_model, CustomNet(), _custom(src)).eval()
        want = pm(x)
        pm.save_pretrained(tmp_path / src)
        cfg = _custom(dst)
        cfg.inference_mode = True
        back = quiet(LIBS[dst].PeftModel.from_pretrained, CustomNet(), tmp_path / src, config=cfg).eval()
        torch.testing.assert_close(back(x), want)
        assert not torch.allclose(want, CustomNet()(x))  # the adapter does something


# ---- low_cpu_mem_usage: adapters on meta, materialised on load -----------------------------
def _meta_count(model):
    return sum(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("lib", LIBS)
def test_inject_low_cpu_mem_usage_creates_meta_then_loads(lib, ids):
    L = LIBS[lib]
    ref = lora(peft)
    want, sd = logits(ref, ids), peft.get_peft_model_state_dict(ref)
    cfg = L.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = quiet(L.inject_adapter_in_model, cfg, tiny_llama(), low_cpu_mem_usage=True)
    assert _meta_count(model) == 2 * 2 * 2  # A and B on q and v of 2 layers
    res = L.set_peft_model_state_dict(model, sd, low_cpu_mem_usage=True)
    assert _meta_count(model) == 0 and not res.unexpected_keys
    torch.testing.assert_close(logits(model.eval(), ids), want)


@pytest.mark.parametrize("lib", LIBS)
def test_from_pretrained_low_cpu_mem_usage_equals_normal_load(lib, ids, tmp_path):
    L = LIBS[lib]
    lora(peft).save_pretrained(tmp_path)
    want = logits(quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path), ids)
    pm = quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert _meta_count(pm) == 0
    torch.testing.assert_close(logits(pm, ids), want)
    empty = quiet(L.get_peft_model, tiny_llama(), L.LoraConfig(r=4, target_modules=["q_proj"]), low_cpu_mem_usage=True)
    assert _meta_count(empty) == 4
    quiet(empty.load_adapter, tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert _meta_count(empty) == 4  # only the loaded adapter leaves meta
    loaded = quiet(L.get_peft_model_state_dict, empty, adapter_name="other")
    assert loaded and not any(t.is_meta for t in loaded.values())


# ---- DoRA on grouped convolutions ------------------------------------------------------------
def test_dora_on_grouped_conv_equals_peft_both_ways(tmp_path):
    from test_peft_configs import GroupedCNN

    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    made = {}
    for lib, L in LIBS.items():
        pm = quiet(L.get_peft_model, GroupedCNN(), L.LoraConfig(r=4, target_modules=["conv"], use_dora=True,
                                                                init_lora_weights=False)).eval()
        pm.save_pretrained(tmp_path / lib)
        made[lib] = pm(x)
        with pytest.raises(NotImplementedError):  # neither library folds B·A into a grouped weight
            quiet(pm.merge_adapter)
    for src, dst in (("peft", slimtune), ("slimtune", peft)):
        back = quiet(dst.PeftModel.from_pretrained, GroupedCNN(), tmp_path / src).eval()
        torch.testing.assert_close(back(x), made[src], atol=1e-5, rtol=1e-5)
    fresh = quiet(slimtune.get_peft_model, GroupedCNN(), slimtune.LoraConfig(r=4, target_modules=["conv"], use_dora=True))
    torch.testing.assert_close(fresh(x), GroupedCNN()(x), atol=1e-5, rtol=1e-5)  # DoRA starts at the base model


# ---- prepare_model_for_gradient_checkpointing ----------------------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_gradient_checkpointing_model_trains_its_adapters(lib, ids):
    L = LIBS[lib]
    m = tiny_llama().train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    pm = quiet(L.get_peft_model, m, L.LoraConfig(r=4, target_modules=["q_proj"]))
    assert pm.get_input_embeddings()(ids).requires_grad  # prepared at wrapping time
    quiet(lambda: pm(input_ids=ids, labels=ids).loss.backward())
    grads = [p.grad for p in pm.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    plain = tiny_llama()
    pm2 = quiet(L.get_peft_model, plain, L.LoraConfig(r=4, target_modules=["q_proj"]))
    assert not pm2.get_input_embeddings()(ids).requires_grad  # not checkpointing: nothing changed
    pm2.prepare_model_for_gradient_checkpointing(plain)
    assert pm2.get_input_embeddings()(ids).requires_grad


# ---- hotswap: fewer modules, larger rank, grouped conv, preparation ------------------------
def _save(L, make, path, seed, **kw):
    torch.manual_seed(seed)
    quiet(L.get_peft_model, make(), L.LoraConfig(init_lora_weights=False, lora_alpha=8, **kw)).save_pretrained(path)


def _swap(lib, pm, path, prepare_rank=None):
    if lib == "peft":
        from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
    else:
        from slimtune.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
    if prepare_rank:
        quiet(prepare_model_for_compiled_hotswap, pm, target_rank=prepare_rank)
    quiet(hotswap_adapter, pm, str(path), adapter_name="default")


@pytest.mark.parametrize("case", ["fewer_modules", "larger_rank"])
@pytest.mark.parametrize("lib", LIBS)
def test_hotswap_fewer_modules_and_larger_rank_as_peft(lib, case, ids, tmp_path):
    L = LIBS[lib]
    _save(peft, tiny_llama, tmp_path / "a", 1, r=2, target_modules=["q_proj", "v_proj"])
    b_targets = ["q_proj"] if case == "fewer_modules" else ["q_proj", "v_proj"]
    _save(peft, tiny_llama, tmp_path / "b", 2, r=2 if case == "fewer_modules" else 6, target_modules=b_targets)
    want = logits(quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path / "b"), ids)
    pm = quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path / "a")
    _swap(lib, pm, tmp_path / "b")
    torch.testing.assert_close(logits(pm.eval(), ids), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lib", LIBS)
def test_hotswap_on_grouped_conv_keeps_each_groups_rank_block(lib, tmp_path):
    from test_peft_configs import GroupedCNN

    L = LIBS[lib]
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    _save(peft, GroupedCNN, tmp_path / "a", 1, r=2, target_modules=["conv"])
    _save(peft, GroupedCNN, tmp_path / "b", 2, r=2, target_modules=["conv"])
    want = quiet(L.PeftModel.from_pretrained, GroupedCNN(), tmp_path / "b")(x)
    pm = quiet(L.PeftModel.from_pretrained, GroupedCNN(), tmp_path / "a")
    _swap(lib, pm, tmp_path / "b", prepare_rank=6)  # padded 2 -> 6: B reads 3 slots per group
    torch.testing.assert_close(pm(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lib", LIBS)
def test_prepare_compiled_hotswap_refuses_compiled_model_and_updates_config(lib, tmp_path):
    L = LIBS[lib]
    prepare = (__import__("peft.utils.hotswap", fromlist=["x"]) if lib == "peft" else
               __import__("slimtune.hotswap", fromlist=["x"])).prepare_model_for_compiled_hotswap
    _save(peft, tiny_llama, tmp_path / "a", 1, r=2, target_modules=["q_proj"], rank_pattern={"q_proj": 4})
    pm = quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path / "a")
    with pytest.raises(ValueError, match="before"):
        prepare(torch.compile(pm), target_rank=8)
    quiet(prepare, pm, target_rank=8, config=pm.peft_config)
    cfg = pm.peft_config["default"]
    assert cfg.r == 8 and cfg.rank_pattern == {"q_proj": 8}
