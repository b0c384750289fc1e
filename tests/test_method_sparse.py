"""Sparse subnetwork fine-tuning: fixed positions by magnitude / Fisher / random; only the delta is saved."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_gpt2, tiny_llama
from properties import perturb_adapter, train_lm_steps

from slimtune import ConfigError, PeftModel, get_peft_model, make_config
from slimtune.inject import AdapterLayer, ModulesToSaveWrapper, adapter_layers
from slimtune.methods.sparse import SparseConfig, fisher_scores

CASES = {"llama": (tiny_llama, {}), "gpt2": (tiny_gpt2, {}), "bert": (tiny_bert_cls, {"task_type": "SEQ_CLS"})}


def test_count_and_magnitude_selection(ids):
    assert isinstance(make_config("sparse", density=0.1), SparseConfig)
    base = tiny_llama()
    pm = get_peft_model(base, SparseConfig(density=0.1))
    layers = [l for _, l in adapter_layers(pm)]
    assert pm.get_nb_trainable_parameters()[0] == sum(round(0.1 * l.weight.numel()) for l in layers)
    lay = layers[0]
    idx = lay.sparse_index["default"].index
    w = lay.weight.detach().abs().flatten()
    assert w[idx].min() >= w.topk(idx.numel()).values.min()  # the largest |w|
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))


def test_fisher_and_random_selection(ids):
    model = tiny_llama()
    batches = [{"input_ids": ids, "labels": ids}, {"input_ids": ids.flip(0), "labels": ids.flip(0)}]
    scores = fisher_scores(model, batches)
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored
    cfg = SparseConfig(density=0.05, selection="fisher", scores=scores)
    pm = get_peft_model(model, cfg)
    path, lay = next(iter(adapter_layers(pm.base_model.model)))
    idx = lay.sparse_index["default"].index
    assert torch.equal(idx, scores[path].flatten().topk(idx.numel()).indices.sort().values)
    assert "scores" not in pm.peft_config["default"].to_dict()
    with pytest.raises(ConfigError, match="fisher_scores"):
        get_peft_model(tiny_llama(), make_config("sparse", selection="fisher"))
    r1 = get_peft_model(tiny_llama(), SparseConfig(selection="random", density=0.05, seed=1))
    r2 = get_peft_model(tiny_llama(), SparseConfig(selection="random", density=0.05, seed=1))
    a = [l.sparse_index["default"].index for _, l in adapter_layers(r1)]
    b = [l.sparse_index["default"].index for _, l in adapter_layers(r2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("case", CASES)
def test_merge_and_roundtrip(case, ids, tmp_path):
    make, kw = CASES[case]
    pm = get_peft_model(make(), SparseConfig(density=0.05, selection="random", **kw))
    perturb_adapter(pm)
    with torch.no_grad():
        ref = logits(pm, ids)
        assert (ref - logits(make(), ids)).abs().max() > 1e-3
        pm.merge_adapter()
        torch.testing.assert_close(logits(pm, ids), ref, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
        torch.testing.assert_close(logits(pm, ids), ref, atol=1e-5, rtol=1e-5)
    pm.save_pretrained(tmp_path)
    sd = pm.get_adapter_state_dict()
    assert {k.rsplit(".", 1)[-1] for k in sd if "classifier" not in k} == {"sparse_values", "sparse_index"}
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(make(), tmp_path, is_trainable=trainable)
        with torch.no_grad():
            torch.testing.assert_close(logits(loaded, ids), ref, atol=0, rtol=0)
    with torch.no_grad():
        plain = loaded.merge_and_unload()
        assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in plain.modules())
        torch.testing.assert_close(logits(plain, ids), ref, atol=1e-5, rtol=1e-5)


def test_training_changes_only_the_subset(ids):
    pm = get_peft_model(tiny_llama(), SparseConfig(density=0.05))
    losses, changed = train_lm_steps(pm, ids)
    assert losses[-1] < losses[0]
    assert changed == {k for k, _ in pm.named_parameters() if ".sparse_values." in k}
    # merged weights differ from the base exactly at the chosen positions
    base = tiny_llama()
    plain = pm.merge_and_unload()
    for path, lay in adapter_layers(get_peft_model(tiny_llama(), SparseConfig(density=0.05)).base_model.model):
        diff = (plain.get_submodule(path).weight - base.get_submodule(path).weight).flatten().nonzero().flatten()
        assert set(diff.tolist()) <= set(lay.sparse_index["default"].index.tolist())


def test_selected_config_without_file_is_an_error(ids):
    pm = get_peft_model(tiny_llama(), make_config("sparse", selection="fisher", selected=True))
    with pytest.raises(RuntimeError, match="no positions"):
        pm(input_ids=ids)


def test_fisher_adapter_loads_without_scores(ids, tmp_path):
    import json
    model = tiny_llama()
    scores = fisher_scores(model, [{"input_ids": ids, "labels": ids}])
    pm = get_peft_model(model, SparseConfig(density=0.05, selection="fisher", scores=scores))
    perturb_adapter(pm)
    with torch.no_grad():
        ref = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["selected"] is True and "scores" not in cfg
    del cfg["selected"]  # a hand-written config: the file's positions are used all the same
    cfg_path.write_text(json.dumps(cfg))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids), ref, atol=0, rtol=0)
