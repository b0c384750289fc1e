"""Several named adapters on one model: add, switch, delete, merge, weighted merge, mixed batches."""
import pytest
import torch
from conftest import TinyCNN, TinyEmbedMLP, logits, randomize_lora, tiny_gpt2, tiny_llama

from slimtune import BASE_ADAPTER, LoraConfig, PeftModel, UnknownAdapterError, get_peft_model
from slimtune.inject import adapter_layers


def two_adapters(make=tiny_llama, **kw):
    cfg = dict(r=4, target_modules="all-linear", **kw)
    pm = get_peft_model(make(), LoraConfig(**cfg))
    pm.add_adapter("other", LoraConfig(**{**cfg, "r": 2}))
    randomize_lora(pm, seed=3)
    return pm


def test_add_set_list_delete(ids):
    pm = two_adapters()
    assert pm.list_adapters() == ["default", "other"]
    assert pm.active_adapter == "default"
    out_default = logits(pm, ids)
    pm.set_adapter("other")
    out_other = logits(pm, ids)
    assert not torch.allclose(out_default, out_other)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    pm.delete_adapter("other")
    assert pm.list_adapters() == ["default"] and pm.active_adapter == "default"
    torch.testing.assert_close(logits(pm, ids), out_default)


def test_unknown_adapter_lists_known():
    pm = two_adapters()
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nope'; known adapters: default, other"):
        pm.set_adapter("nope")
    with pytest.raises(UnknownAdapterError, match="known adapters"):
        pm.delete_adapter("nope")


def test_duplicate_name_rejected():
    pm = two_adapters()
    with pytest.raises(ValueError, match="already exists"):
        pm.add_adapter("other", LoraConfig(r=2))


def test_switch_while_merged_is_an_error():
    pm = two_adapters()
    pm.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        pm.set_adapter("other")


def test_safe_merge_refuses_nan(ids):
    pm = two_adapters()
    layer = next(l for _, l in adapter_layers(pm))
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    w = layer.get_base_layer().weight.clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, w)


def test_save_load_several_adapters(tmp_path, ids):
    pm = two_adapters()
    ref = {a: (pm.set_adapter(a), logits(pm, ids))[1] for a in ["default", "other"]}
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "other" / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    for a in ref:
        loaded.set_adapter(a)
        torch.testing.assert_close(logits(loaded, ids), ref[a])


@pytest.mark.parametrize("make,kw", [(tiny_llama, {}), (tiny_gpt2, {})])
def test_mixed_batch_equals_each_alone(make, kw, ids):
    pm = two_adapters(make)
    names = ["other", BASE_ADAPTER, "default"]
    with torch.no_grad():
        mixed = logits(pm, {"input_ids": ids, "adapter_names": names})
        for i, name in enumerate(names):
            if name == BASE_ADAPTER:
                with pm.disable_adapter():
                    alone = logits(pm, ids[i:i + 1])
            else:
                pm.set_adapter(name)
                alone = logits(pm, ids[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_mixed_batch_conv_and_embedding(images, ids):
    for make, x in [(TinyCNN, images), (TinyEmbedMLP, ids)]:
        targets = ["conv", "conv1d", "fc"] if make is TinyCNN else ["emb", "proj"]
        pm = get_peft_model(make(), LoraConfig(r=2, target_modules=targets))
        pm.add_adapter("b", LoraConfig(r=3, target_modules=targets))
        randomize_lora(pm)
        with torch.no_grad():
            mixed = pm(x, adapter_names=["b", "default", BASE_ADAPTER])
            pm.set_adapter("b")
            torch.testing.assert_close(mixed[:1], pm(x[:1]), atol=1e-5, rtol=1e-5)
            pm.set_adapter("default")
            torch.testing.assert_close(mixed[1:2], pm(x[1:2]), atol=1e-5, rtol=1e-5)
            with pm.disable_adapter():
                torch.testing.assert_close(mixed[2:], pm(x[2:]), atol=1e-5, rtol=1e-5)


def test_mixed_batch_generate(ids):
    pm = two_adapters()
    pm.eval()
    out = pm.generate(input_ids=ids[:2, :4], adapter_names=["other", "default"], max_new_tokens=3, do_sample=False)
    pm.set_adapter("other")
    alone = pm.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:1], alone)


def test_weighted_adapter_cat_is_exact_sum(ids):
    pm = two_adapters()
    pm.add_weighted_adapter(["default", "other"], [0.7, 0.3], "mix", combination_type="cat")
    layer = next(l for _, l in adapter_layers(pm))
    want = 0.7 * layer.get_delta_weight("default") + 0.3 * layer.get_delta_weight("other")
    torch.testing.assert_close(layer.get_delta_weight("mix"), want, atol=1e-6, rtol=1e-5)
    assert layer.r["mix"] == 6


def test_weighted_adapter_svd_and_linear(ids):
    pm = two_adapters()
    pm.add_weighted_adapter(["default", "other"], [1.0, 1.0], "svd", combination_type="svd", svd_rank=6)
    layer = next(l for _, l in adapter_layers(pm))
    want = layer.get_delta_weight("default") + layer.get_delta_weight("other")
    torch.testing.assert_close(layer.get_delta_weight("svd"), want, atol=1e-5, rtol=1e-4)  # rank 6 is exact
    with pytest.raises(ValueError, match="one rank"):
        pm.add_weighted_adapter(["default", "other"], [1.0, 1.0], "lin", combination_type="linear")
    pm.add_adapter("third", LoraConfig(r=4, target_modules="all-linear"))
    pm.add_weighted_adapter(["default", "third"], [0.5, 0.5], "lin", combination_type="linear")
    pm.set_adapter("lin")
    logits(pm, ids)


def test_unload_returns_base(ids):
    base_out = logits(tiny_llama(), ids)
    pm = two_adapters()
    pm.merge_adapter()
    plain = pm.unload()
    torch.testing.assert_close(logits(plain, ids), base_out, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_saves_with_plain_transformers(tmp_path, ids):
    from transformers import AutoModelForCausalLM

    pm = two_adapters()
    ref = logits(pm, ids)
    plain = pm.merge_and_unload()
    plain.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(back, ids), ref, atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_routes_every_adapter_layer_and_saved_module():
    """mixed_batch finds its layers with a walk that skips the adapters' own submodules: the same
    layers and modules_to_save wrappers as full walks, and it sets and clears each one."""
    from slimtune.inject import outer_adapter_modules, save_wrappers

    pm = two_adapters(modules_to_save=["lm_head"])
    full = [m for _, m in adapter_layers(pm.base_model.model)] + [m for _, m in save_wrappers(pm.base_model.model)]
    assert len(full) > 1 and any(not hasattr(m, "lora_A") for m in full)
    assert {id(m) for m in outer_adapter_modules(pm.base_model.model)} == {id(m) for m in full}
    with pm.base_model.mixed_batch(["other", BASE_ADAPTER]):
        assert all(m._mixed is not None for m in full)
    assert all(m._mixed is None for m in full)
