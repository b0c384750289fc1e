"""BitFit: only biases (and the task head) train, in place; one adapter per model."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_gpt2, tiny_llama
from properties import train_steps

from slimtune import PeftModel, get_peft_model, make_config
from slimtune.inject import AdapterLayer, ModulesToSaveWrapper
from slimtune.methods.bitfit import BitFitConfig, bias_parameters
from slimtune.targeting import TargetError


def _batch(ids):
    return {"input_ids": ids, "labels": torch.tensor([0, 1, 2])}


def _train(pm, batch, steps=5, lr=1e-2):
    return train_steps(pm, batch, steps, lr, seed=0)[0]


def test_make_config_and_trainable_count():
    cfg = make_config("bitfit", task_type="SEQ_CLS")
    assert isinstance(cfg, BitFitConfig)
    base = tiny_bert_cls()
    n_bias = sum(p.numel() for k, p in bias_parameters(base).items() if not k.startswith("classifier"))
    n_head = sum(p.numel() for p in base.classifier.parameters())
    pm = get_peft_model(base, cfg)
    assert pm.get_nb_trainable_parameters()[0] == n_bias + n_head
    assert cfg.modules_to_save == ["classifier"]


def test_only_biases_and_head_change_and_loss_drops(ids):
    pm = get_peft_model(tiny_bert_cls(), make_config("bitfit", task_type="SEQ_CLS"))
    before = {k: p.detach().clone() for k, p in pm.named_parameters()}
    losses = _train(pm, _batch(ids), steps=8)
    assert losses[-1] < losses[0]
    for k, p in pm.named_parameters():
        changed = not torch.equal(before[k], p)
        assert changed == (k.endswith(".bias") or ".classifier." in k), k


def test_save_load_roundtrip_and_disable(ids, tmp_path):
    pm = get_peft_model(tiny_bert_cls(), make_config("bitfit", task_type="SEQ_CLS"))
    _train(pm, _batch(ids), steps=3)
    with torch.no_grad():
        ref = logits(pm, ids)
        with pm.disable_adapter():
            torch.testing.assert_close(logits(pm, ids), logits(tiny_bert_cls(), ids))
        torch.testing.assert_close(logits(pm, ids), ref)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # is_trainable=False freezes
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids), ref, atol=0, rtol=0)
    plain = loaded.merge_and_unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(logits(plain, ids), ref, atol=1e-5, rtol=1e-5)


def test_unload_restores_base(ids):
    pm = get_peft_model(tiny_gpt2(), make_config("bitfit"))
    _train(pm, {"input_ids": ids, "labels": ids}, steps=2)
    base = pm.unload()
    with torch.no_grad():
        torch.testing.assert_close(logits(base, ids), logits(tiny_gpt2(), ids))


def test_target_modules_subset():
    pm = get_peft_model(tiny_bert_cls(), make_config("bitfit", target_modules=["query", "value"]))
    keys = list(pm.get_adapter_state_dict())
    assert keys and all(k.endswith(("query.bias", "value.bias")) for k in keys)
    with pytest.raises(TargetError, match="selects no module with a bias"):
        get_peft_model(tiny_bert_cls(), make_config("bitfit", target_modules=["nope"]))


def test_llama_has_no_bias_clear_error():
    with pytest.raises(TargetError, match="no bias parameters.*LoRA"):
        get_peft_model(tiny_llama(), make_config("bitfit"))


def test_second_adapter_is_refused():
    pm = get_peft_model(tiny_bert_cls(), make_config("bitfit"))
    with pytest.raises(ValueError, match="one bitfit adapter"):
        pm.add_adapter("other", make_config("bitfit"))
