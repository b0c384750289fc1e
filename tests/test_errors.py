"""Bad input gives one clear, actionable error or warning, and loses no work."""
import json

import pytest
import torch
from conftest import logits, randomize_lora, tiny_bert_cls, tiny_llama

from slimtune import CheckpointError, ConfigError, LoraConfig, PeftModel, get_peft_model, make_config
from slimtune.checkpoint import WEIGHTS_NAME


@pytest.fixture
def saved(tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path)
    return tmp_path


def test_wrong_shape_names_tensor_and_shapes(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    bigger = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(CheckpointError, match=r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' "
                                              r"has shape \(4, 32\) in the file but \(4, 64\) in the model"):
        PeftModel.from_pretrained(bigger, saved)


def test_wrong_model_names_first_foreign_key(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query", "value"]
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has no place in this model"):
        # config fits BERT, weights are Llama's
        PeftModel.from_pretrained(tiny_bert_cls(), saved)


def test_config_for_another_model_targets(saved):
    from slimtune import TargetError

    with pytest.raises(TargetError, match="q_proj"):
        PeftModel.from_pretrained(tiny_bert_cls(), saved)


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "empty")
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_corrupt_weights(saved):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_corrupt_config(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_incomplete_file_names_missing_tensor(saved):
    from safetensors.torch import load_file, save_file

    sd = load_file(saved / WEIGHTS_NAME)
    sd.pop(sorted(sd)[0])
    save_file(sd, saved / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_bin_loads_with_weights_only(saved, ids):
    ref = logits(PeftModel.from_pretrained(tiny_llama(), saved), ids)
    from safetensors.torch import load_file

    torch.save(load_file(saved / WEIGHTS_NAME), saved / "adapter_model.bin")
    (saved / WEIGHTS_NAME).unlink()
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), saved), ids), ref)


def test_bin_with_pickled_code_is_refused(saved):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, saved / "adapter_model.bin")
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_loaded_for_inference_warns_when_training(saved):
    pm = PeftModel.from_pretrained(tiny_llama(), saved)
    assert pm.get_nb_trainable_parameters()[0] == 0
    with pytest.warns(UserWarning, match="is_trainable=True"):
        pm.train()
    pm2 = PeftModel.from_pretrained(tiny_llama(), saved, is_trainable=True)
    assert pm2.get_nb_trainable_parameters()[0] > 0


def test_failed_load_adapter_leaves_model_intact(saved, tmp_path, ids):
    pm = PeftModel.from_pretrained(tiny_llama(), saved)
    ref = logits(pm, ids)
    bad = tmp_path / "bad"
    other = get_peft_model(tiny_llama(), LoraConfig(r=2))
    other.save_pretrained(bad)
    (bad / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        pm.load_adapter(bad, adapter_name="bad")
    assert pm.list_adapters() == ["default"]
    torch.testing.assert_close(logits(pm, ids), ref)


def test_strict_config_names_key_and_closest():
    with pytest.raises(ConfigError, match="unknown key 'lora_alph'.*did you mean 'lora_alpha'"):
        make_config("lora", r=4, lora_alph=8)
    with pytest.raises(KeyError, match="unknown method 'lroa'. Did you mean 'lora'"):
        make_config("lroa")


@pytest.mark.parametrize("kw,msg", [(dict(r=0), "positive"), (dict(bias="some"), "bias="),
                                    (dict(lora_dropout=1.5), "lora_dropout"), (dict(init_lora_weights="loftq"), "init_lora_weights")])
def test_bad_values(kw, msg):
    with pytest.raises((ConfigError, ValueError), match=msg):
        get_peft_model(tiny_llama(), LoraConfig(**kw))


def test_peft_feature_we_lack_is_refused(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["layer_replication"] = [[0, 2]]
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="layer_replication"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_save_to_a_file_path_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        get_peft_model(tiny_llama(), LoraConfig(r=2)).save_pretrained(f)


def test_failed_targeting_leaves_no_head_wrapper():
    from slimtune import TargetError
    from slimtune.inject import ModulesToSaveWrapper

    pm = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(TargetError):
        pm.add_adapter("bad", LoraConfig(r=2, target_modules=["nope"], task_type="SEQ_CLS"))
    assert pm.list_adapters() == ["default"]
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in pm.modules())
