"""Adapters move between slimtune and the real HF `peft` package with the same outputs."""
import json
import warnings

import peft
import pytest
import torch
from conftest import logits, randomize_lora, tiny_bert_cls, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import slimtune

CASES = {
    "decoder": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "encoder_cls": (tiny_bert_cls, dict(target_modules=["query", "key", "value"], task_type="SEQ_CLS")),
    "gpt2_conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "bias_rslora": (tiny_bert_cls, dict(target_modules=["query", "value"], bias="lora_only", use_rslora=True,
                                        lora_alpha=16, modules_to_save=["classifier"])),
}


def _perturb_heads(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("bias" in n or "modules_to_save" in n):
                p.add_(0.3)


@pytest.mark.parametrize("case", CASES)
def test_peft_to_slimtune(case, ids, tmp_path):
    make, kw = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(make(), peft.LoraConfig(r=4, init_lora_weights=False, **kw))
    _perturb_heads(pm)
    pm.eval()
    ref = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    ours = slimtune.PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(logits(ours, ids), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_slimtune_to_peft(case, ids, tmp_path):
    make, kw = CASES[case]
    ours = slimtune.get_peft_model(make(), slimtune.LoraConfig(r=4, **kw))
    randomize_lora(ours)
    _perturb_heads(ours)
    ref = logits(ours, ids)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    theirs.eval()
    torch.testing.assert_close(logits(theirs, ids), ref, atol=1e-6, rtol=1e-5)


def test_same_keys_and_config_as_peft(tmp_path):
    kw = dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(**kw)).save_pretrained(tmp_path / "p")
    slimtune.get_peft_model(tiny_bert_cls(), slimtune.LoraConfig(**kw)).save_pretrained(tmp_path / "s")
    p, s = load_file(tmp_path / "p/adapter_model.safetensors"), load_file(tmp_path / "s/adapter_model.safetensors")
    assert set(p) == set(s)
    assert all(p[k].shape == s[k].shape and p[k].dtype == s[k].dtype for k in p)
    from safetensors import safe_open

    assert safe_open(tmp_path / "s/adapter_model.safetensors", "pt").metadata() == {"format": "pt"}
    pc, sc = (json.loads((tmp_path / f"{d}/adapter_config.json").read_text()) for d in "ps")
    for key in ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "task_type", "bias",
                "inference_mode", "fan_in_fan_out", "use_rslora", "init_lora_weights", "layers_to_transform"):
        v1, v2 = pc[key], sc[key]
        if isinstance(v1, list):
            v1, v2 = sorted(v1), sorted(v2)
        assert v1 == v2, key


def test_peft_loads_named_adapter_subfolder(ids, tmp_path):
    ours = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4))
    ours.add_adapter("other", slimtune.LoraConfig(r=2, target_modules=["k_proj"]))
    randomize_lora(ours)
    ours.set_adapter("other")
    ref = logits(ours, ids)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
        theirs.load_adapter(tmp_path / "other", adapter_name="other")
    theirs.set_adapter("other")
    torch.testing.assert_close(logits(theirs.eval(), ids), ref, atol=1e-6, rtol=1e-5)


def test_unknown_config_keys_warn_not_crash(ids, tmp_path):
    ours = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4))
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["some_future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="some_future_option"):
        slimtune.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_peft_example_code_runs_with_import_changed(ids):
    """PEFT's sequence-classification example, only `from peft` -> `from slimtune`."""
    from slimtune import LoraConfig, TaskType, get_peft_model

    model = tiny_bert_cls()
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=["query", "key", "value"])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = torch.tensor([0, 1, 2])
    losses = []
    for _ in range(15):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]


def test_all_linear_on_classifier_selects_what_peft_selects(tmp_path, ids):
    """"all-linear" with a task head: the head trains in full, it is not also a LoRA target."""
    kw = dict(r=2, target_modules="all-linear", task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(**kw))
    ours = slimtune.get_peft_model(tiny_bert_cls(), slimtune.LoraConfig(**kw))
    assert set(ours.get_adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs))
    ours.save_pretrained(tmp_path)  # no shared-memory tensors
    torch.testing.assert_close(logits(slimtune.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path), ids), logits(ours, ids))
