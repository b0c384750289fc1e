"""LoRA properties in HF PEFT's style, over several model families and layer types."""

import pytest
import torch
import torch.nn as nn
from conftest import (
    TinyCNN,
    TinyEmbedMLP,
    logits,
    randomize_lora,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)
from properties import check_merge_unmerge

from slimtune import LoraConfig, PeftModel, get_peft_model
from slimtune.compat import enable_activation_checkpointing
from slimtune.inject import AdapterLayer, ModulesToSaveWrapper, adapter_layers

CASES = {
    "llama": (tiny_llama, dict(target_modules="all-linear"), "ids"),
    "bert": (tiny_bert_cls, dict(target_modules=["query", "key", "value"], task_type="SEQ_CLS"), "ids"),
    "gpt2": (tiny_gpt2, dict(), "ids"),
    "t5": (tiny_t5, dict(), "t5"),
    "cnn": (TinyCNN, dict(target_modules=["conv", "conv1d", "fc"], modules_to_save=["head"]), "images"),
    "embed": (TinyEmbedMLP, dict(target_modules=["emb", "proj"]), "ids"),
}


def inputs(kind, ids, images):
    if kind == "images":
        return images
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return ids


def build(case, **over):
    make, kw, kind = CASES[case]
    return make, get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, **{**kw, **over})), kind


@pytest.mark.parametrize("case", CASES)
def test_init_equals_base(case, ids, images):
    make, pm, kind = build(case)
    x = inputs(kind, ids, images)
    torch.testing.assert_close(logits(pm, x), logits(make(), x))


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_merge_and_unload_agree(case, ids, images):
    make, pm, kind = build(case)
    randomize_lora(pm)
    x = inputs(kind, ids, images)
    ref = check_merge_unmerge(pm, make, x)
    with torch.no_grad():
        plain = pm.merge_and_unload()
        assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in plain.modules())
        torch.testing.assert_close(logits(plain, x), ref, atol=1e-5, rtol=1e-5)


def test_unmerge_restores_base_weights():
    base = tiny_llama()
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    pm = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(pm)
    pm.merge_adapter()
    pm.unmerge_adapter()
    for k, v in pm.unload().state_dict().items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_disable_equals_base(case, ids, images):
    make, pm, kind = build(case)
    randomize_lora(pm)
    x = inputs(kind, ids, images)
    with torch.no_grad(), pm.disable_adapter():
        torch.testing.assert_close(logits(pm, x), logits(make(), x))
    pm.merge_adapter()  # disabling a merged adapter unmerges inside and re-merges after
    with torch.no_grad():
        merged = logits(pm, x)
        with pm.disable_adapter():
            torch.testing.assert_close(logits(pm, x), logits(make(), x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(pm, x), merged)


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip(case, ids, images, tmp_path):
    make, pm, kind = build(case)
    randomize_lora(pm)
    if case == "cnn":
        with torch.no_grad():
            pm.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    x = inputs(kind, ids, images)
    ref = logits(pm, x)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(logits(loaded, x), ref)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # PEFT's default: loaded for inference


@pytest.mark.parametrize("case", ["llama", "bert", "cnn"])
def test_only_adapter_params_change(case, ids, images):
    make, pm, kind = build(case)
    x = inputs(kind, ids, images)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for _ in range(3):
        out = logits(pm, x)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    # the trainable set is exactly the adapters (and modules_to_save copies), found by type
    expected = set()
    for n, m in pm.named_modules():
        if isinstance(m, AdapterLayer):
            expected |= {f"{n}.{a}.default" + (f".{r}" if r else "") for a_rel, _ in m.adapter_parameters("default")
                         for a, _, r in [a_rel.partition(".")]}
        elif isinstance(m, ModulesToSaveWrapper):
            expected |= {f"{n}.modules_to_save.default.{r}" for r, _ in m.adapter_parameters("default")}
    assert trainable == expected


def test_trainable_count_formula():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    want = sum(4 * (layer.in_features + layer.out_features) for _, layer in adapter_layers(pm))
    assert pm.get_nb_trainable_parameters()[0] == want
    total = sum(p.numel() for p in tiny_llama().parameters())
    assert pm.get_nb_trainable_parameters()[1] == total + want


def test_print_trainable_parameters(capsys):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2))
    pm.print_trainable_parameters()
    out = capsys.readouterr().out
    t, a = pm.get_nb_trainable_parameters()
    assert out.strip() == f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"


def test_scaling_and_rslora_and_patterns():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                                 rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}))
    layers = dict(adapter_layers(pm))
    q0 = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    v0 = layers["base_model.model.model.layers.0.self_attn.v_proj"]
    q1 = layers["base_model.model.model.layers.1.self_attn.q_proj"]
    assert q0.r["default"] == 4 and q0.scaling["default"] == pytest.approx(16 / 2)
    assert v0.r["default"] == 2 and v0.lora_A["default"].weight.shape == (2, 32)
    assert q1.scaling["default"] == pytest.approx(3 / 2)
    plain = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16))
    assert next(l for _, l in adapter_layers(plain)).scaling["default"] == 4.0


def test_gaussian_and_pissa_init(ids):
    base_out = logits(tiny_llama(), ids)
    g = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights="gaussian"))
    torch.testing.assert_close(logits(g, ids), base_out)
    p = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights="pissa", target_modules="all-linear"))
    torch.testing.assert_close(logits(p, ids), base_out, atol=1e-5, rtol=1e-5)
    layer = next(l for _, l in adapter_layers(p))
    assert layer.lora_B["default"].weight.abs().sum() > 0  # principal components, not zeros


def test_dropout_identity_when_zero_and_train_eval():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2))
    assert all(isinstance(l.lora_dropout["default"], nn.Identity) for _, l in adapter_layers(pm))
    pm2 = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_dropout=0.5))
    assert all(isinstance(l.lora_dropout["default"], nn.Dropout) for _, l in adapter_layers(pm2))


@pytest.mark.parametrize("mode,expect", [("none", 0), ("all", None), ("lora_only", 4)])
def test_bias_modes(mode, expect, tmp_path, ids):
    pm = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, bias=mode, target_modules=["query", "value"]))
    biases = [n for n, p in pm.named_parameters() if p.requires_grad and n.endswith("bias")]
    if expect is None:
        assert len(biases) == sum(1 for m in tiny_bert_cls().modules() if getattr(m, "bias", None) is not None)
    else:
        assert len(biases) == expect
    randomize_lora(pm)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.5)
    ref = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), ref)


def test_modules_to_save_for_seq_cls_head(tmp_path, ids):
    pm = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query", "value"]))
    assert isinstance(pm.base_model.model.classifier, ModulesToSaveWrapper)
    assert pm.peft_config["default"].modules_to_save == ["classifier", "score"]  # as PEFT records it
    keys = set(pm.get_adapter_state_dict())
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


def test_bf16_adapters_stay_bf16(ids):
    m = tiny_llama().to(torch.bfloat16)
    pm = get_peft_model(m, LoraConfig(r=2))
    assert all(p.dtype == torch.bfloat16 for n, p in pm.named_parameters() if p.requires_grad)
    out = logits(pm, ids)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()


def test_gradients_match_reference_composition(ids, monkeypatch):
    """The fused autograd path (per layer and per SwiGLU block) gives the same gradients as plain ops."""
    from slimtune.kernels.lora import lora_reference
    from slimtune.methods import lora_blocks, lora_layers

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(pm)
    pm.train()
    logits(pm, ids).pow(2).mean().backward()
    fast = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    monkeypatch.setattr(lora_layers, "lora_linear", lora_reference)
    monkeypatch.setattr(lora_blocks, "FUSE_SWIGLU", False)
    logits(pm, ids).pow(2).mean().backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[n], p.grad, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_trains(ids):
    m = tiny_llama()
    enable_activation_checkpointing(m, use_reentrant=False)
    pm = get_peft_model(m, LoraConfig(r=2))
    pm.train()
    pm(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
