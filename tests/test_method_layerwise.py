"""Layer-wise fine-tuning: chosen blocks train in full, in place; only they are saved."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_gpt2, tiny_llama
from properties import train_steps

from slimtune import ConfigError, PeftModel, get_peft_model, make_config
from slimtune.inject import AdapterLayer, ModulesToSaveWrapper
from slimtune.targeting import TargetError


def _train(pm, batch, steps=5, lr=1e-3):
    return train_steps(pm, batch, steps, lr, seed=0)[0]


@pytest.mark.parametrize("kw, prefixes", [
    (dict(last_n=1), ["model.layers.1."]),
    (dict(first_n=1), ["model.layers.0."]),
    (dict(layers=[-1, 0]), ["model.layers.0.", "model.layers.1."]),
    (dict(layers=[0], blocks=["model.norm", "lm_head"]), ["model.layers.0.", "model.norm.", "lm_head."]),
])
def test_only_chosen_layers_change(ids, kw, prefixes):
    base = tiny_llama()
    expect = sum(p.numel() for k, p in base.named_parameters() if k.startswith(tuple(prefixes)))
    pm = get_peft_model(base, make_config("layerwise", **kw))
    assert pm.get_nb_trainable_parameters()[0] == expect
    before = {k: p.detach().clone() for k, p in pm.named_parameters()}
    losses = _train(pm, {"input_ids": ids, "labels": ids})
    assert losses[-1] < losses[0]
    for k, p in pm.named_parameters():
        rel = k.removeprefix("base_model.model.")
        assert (not torch.equal(before[k], p)) == rel.startswith(tuple(prefixes)), k
    keys = pm.get_adapter_state_dict()
    assert all(k.removeprefix("base_model.model.").startswith(tuple(prefixes)) for k in keys)
    assert sum(v.numel() for v in keys.values()) == expect


def test_save_load_roundtrip_bert_with_head(ids, tmp_path):
    pm = get_peft_model(tiny_bert_cls(), make_config("layerwise", last_n=1, task_type="SEQ_CLS"))
    assert any("classifier" in k for k in pm.get_adapter_state_dict())
    _train(pm, {"input_ids": ids, "labels": torch.tensor([0, 1, 2])}, steps=2)
    with torch.no_grad():
        ref = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids), ref, atol=0, rtol=0)
    plain = loaded.merge_and_unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in plain.modules())


def test_gpt2_block_list_and_errors():
    pm = get_peft_model(tiny_gpt2(), make_config("layerwise", last_n=1))
    assert all(".transformer.h.1." in k for k in pm.get_adapter_state_dict())
    with pytest.raises(ConfigError, match="choose what trains"):
        make_config("layerwise")
    with pytest.raises(TargetError, match="has 2 blocks"):
        get_peft_model(tiny_llama(), make_config("layerwise", layers=[5]))
    with pytest.raises(TargetError, match="matches no module"):
        get_peft_model(tiny_llama(), make_config("layerwise", blocks=["nope"]))
    with pytest.raises(ValueError, match="one layerwise adapter"):
        pm.add_adapter("b", make_config("layerwise", last_n=1))
