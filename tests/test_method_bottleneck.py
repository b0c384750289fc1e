"""Bottleneck adapters: placement per family, identity at init, files, training, errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
from properties import train_steps
from safetensors.torch import load_file

from slimtune import PeftModel, get_peft_model, make_config
from slimtune.methods.bottleneck import BottleneckConfig, BottleneckLayer, NotMergeableError
from slimtune.targeting import TargetError

# Tiny models run ~100x faster on one thread than on oversubscribed cores (2 cores, parallel jobs).
V = 64


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def tiny_bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=2)).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, bos_token_id=0,
                                      eos_token_id=0)).eval()


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16,
                                               vocab_size=V, decoder_start_token_id=0)).eval()


def tiny_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(n_layers=2, dim=32, hidden_dim=64, n_heads=2,
                                                                vocab_size=V)).eval()


IDS = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))


def run(model, ids=IDS):
    kw = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
    return model(input_ids=ids, **kw).logits


# (factory, wrapped paths expected for houlsby / pfeiffer / parallel in layer 0)
FAMILIES = {
    "llama": (tiny_llama, ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp"], ["model.layers.0.mlp"],
              ["model.layers.0.mlp"]),
    "bert": (tiny_bert_cls, ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"],
             ["bert.encoder.layer.0.output.dense"], ["bert.encoder.layer.0.output"]),
    "gpt2": (tiny_gpt2, ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp"], ["transformer.h.0.mlp"],
             ["transformer.h.0.mlp"]),
    "t5": (tiny_t5, ["encoder.block.0.layer.0.SelfAttention.o", "encoder.block.0.layer.1.DenseReluDense"],
           ["encoder.block.0.layer.1.DenseReluDense", "decoder.block.0.layer.2.DenseReluDense"],
           ["decoder.block.1.layer.2.DenseReluDense"]),
    "distilbert": (tiny_distilbert, ["distilbert.transformer.layer.0.attention.out_lin",
                                     "distilbert.transformer.layer.0.ffn"],
                   ["distilbert.transformer.layer.0.ffn"], ["distilbert.transformer.layer.1.ffn"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer", "parallel"])
def test_placement_and_identity_at_init(family, kind):
    factory, *expected = FAMILIES[family]
    want = expected[["houlsby", "pfeiffer", "parallel"].index(kind)]
    model = factory()
    ref = run(model)
    pm = get_peft_model(model, BottleneckConfig(adapter_type=kind, reduction_factor=4))
    wrapped = {n for n, m in pm.base_model.model.named_modules() if isinstance(m, BottleneckLayer)}
    assert set(want) <= wrapped
    per_layer = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}[kind] * (2 if family == "t5" else 1)
    assert len(wrapped) == per_layer * 2  # two blocks
    torch.testing.assert_close(run(pm), ref)  # zero up-projection: the base model's output
    # a random adapter changes the output, so it is really on the path
    pm2 = get_peft_model(factory(), BottleneckConfig(adapter_type=kind, reduction_factor=4, init_weights=False))
    assert not torch.allclose(run(pm2), ref)


def _formula(dim: int, size: int, ln: bool) -> int:
    return (dim * size + size) + (size * dim + dim) + (2 * dim if ln else 0)


@pytest.mark.parametrize("kind,n_per_layer", [("houlsby", 2), ("pfeiffer", 1), ("parallel", 1)])
def test_trainable_count_matches_formula(kind, n_per_layer):
    pm = get_peft_model(tiny_llama(), BottleneckConfig(adapter_type=kind, reduction_factor=4, ln_before=True))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == 2 * n_per_layer * _formula(32, 8, True)
    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig(adapter_type=kind, bottleneck_size=5, task_type="SEQ_CLS"))
    head = 32 * 2 + 2  # the fresh classifier trains in full (PEFT's rule for SEQ_CLS)
    assert pm.get_nb_trainable_parameters()[0] == 2 * n_per_layer * _formula(32, 5, False) + head


def test_save_load_round_trip(tmp_path):
    pm = get_peft_model(tiny_llama(), BottleneckConfig(adapter_type="houlsby", reduction_factor=4, init_weights=False,
                                                       non_linearity="gelu", ln_before=True))
    out = run(pm)
    pm.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["adapter_type"] == "houlsby" and cfg["non_linearity"] == "gelu"
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.mlp.bottleneck.adapter_down.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.o_proj.bottleneck.adapter_up.bias" in keys
    assert "base_model.model.model.layers.0.mlp.bottleneck.adapter_norm.weight" in keys
    assert not any(".default." in k for k in keys)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(run(loaded), out, rtol=0, atol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference by default, as PEFT
    # a second named adapter goes in its own sub-folder and loads next to the first
    loaded.load_adapter(tmp_path, adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(run(loaded), out, rtol=0, atol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(run(loaded), run(tiny_llama()))


def test_training_changes_only_adapter_and_lowers_loss():
    pm = get_peft_model(tiny_llama(), make_config("bottleneck", adapter_type="pfeiffer", reduction_factor=4))
    ids = (torch.arange(12).repeat(4, 1) * 5) % V  # a fixed pattern the adapter can learn
    losses, changed = train_steps(pm, {"input_ids": ids, "labels": ids}, 30, 3e-2, torch.optim.AdamW)
    assert losses[-1] < losses[0] - 0.1
    assert changed and all(".bottleneck.default." in n for n in changed)
    assert len(changed) == len([n for n, p in pm.named_parameters() if p.requires_grad])


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.block(h))


def test_custom_model_named_targets_and_errors():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    with pytest.raises(TargetError, match="no placement known.*target_modules"):
        get_peft_model(Custom(), BottleneckConfig())
    with pytest.raises(TargetError, match="input and output sizes match"):
        get_peft_model(Custom(), BottleneckConfig(adapter_type="parallel", target_modules=["inp"]))
    with pytest.raises(TargetError, match="matches no module"):
        get_peft_model(Custom(), BottleneckConfig(target_modules=["blok"]))
    for kind in ("pfeiffer", "parallel"):
        base = Custom()
        ref = base(x)
        pm = get_peft_model(base, BottleneckConfig(adapter_type=kind, target_modules=["block"], bottleneck_size=4,
                                                   init_weights=False))
        assert isinstance(pm.base_model.model.block, BottleneckLayer)
        assert pm.get_nb_trainable_parameters()[0] == _formula(16, 4, False)
        assert not torch.allclose(pm(x), ref)
        with pytest.raises(NotMergeableError, match="cannot be merged"):
            pm.merge_and_unload()
        with pytest.raises(NotMergeableError):
            pm.merge_adapter()
        plain = pm.unload()
        torch.testing.assert_close(plain(x), ref)
    with pytest.raises(Exception, match="adapter_type"):
        BottleneckConfig(adapter_type="lstm")
