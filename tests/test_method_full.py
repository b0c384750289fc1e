"""Full fine-tuning through the adapter pipeline (the baseline)."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_llama
from properties import train_steps

from slimtune import PeftModel, get_peft_model, make_config
from slimtune.inject import AdapterLayer, ModulesToSaveWrapper
from slimtune.methods.full import FullConfig


def _train(pm, batch, steps=5, lr=1e-3):
    return train_steps(pm, batch, steps, lr, seed=0)[0]


def test_everything_trains_and_saves(ids, tmp_path):
    assert isinstance(make_config("full"), FullConfig)
    base = tiny_llama()
    n = sum(p.numel() for p in base.parameters())
    pm = get_peft_model(base, make_config("full"))
    assert pm.get_nb_trainable_parameters() == (n, n)
    losses = _train(pm, {"input_ids": ids, "labels": ids})
    assert losses[-1] < losses[0]
    with torch.no_grad():
        ref = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(v.numel() for v in sd.values()) == n
    loaded = PeftModel.from_pretrained(tiny_llama(seed=5), tmp_path)  # other init: every weight comes from the file
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids), ref, atol=0, rtol=0)
    plain = loaded.merge_and_unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(logits(plain, ids), ref)


def test_tied_weights_saved_once(ids, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     vocab_size=128, tie_word_embeddings=True))
    pm = get_peft_model(m, make_config("full"))
    pm.save_pretrained(tmp_path)
    PeftModel.from_pretrained(m, tmp_path)


def test_bert_cls_and_single_adapter(ids):
    pm = get_peft_model(tiny_bert_cls(), make_config("full", task_type="SEQ_CLS"))
    t, a = pm.get_nb_trainable_parameters()
    assert t == a
    with pytest.raises(ValueError, match="one full adapter"):
        pm.add_adapter("b", make_config("full"))
    with pytest.raises(RuntimeError, match="kept no copy"):
        with pm.disable_adapter():
            pass
