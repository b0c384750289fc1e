import pytest
import torch.nn as nn
from conftest import TinyCNN, tiny_bert_cls, tiny_gpt2, tiny_llama

from slimtune import LoraConfig, TargetError, get_peft_model
from slimtune.inject import adapter_layers
from slimtune.methods.lora_layers import SUPPORTED_TYPES
from slimtune.targeting import layer_index, name_matches, select


def adapted(model):
    return sorted(p.removeprefix("base_model.model.") for p, _ in adapter_layers(model))


def test_suffix_and_exact_match():
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not name_matches("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert name_matches("q_proj", ["q_proj"])


def test_regex_is_full_match():
    m = tiny_llama()
    sel = select(m, r".*\.0\.self_attn\.(q|v)_proj", supported_types=SUPPORTED_TYPES)
    assert sel.names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(TargetError, match="whole path"):
        select(m, r"q_proj", supported_types=SUPPORTED_TYPES)


def test_default_targets_llama_are_q_v():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2))
    assert adapted(pm) == [f"model.layers.{i}.self_attn.{t}_proj" for i in range(2) for t in "qv"]
    assert pm.peft_config["default"].target_modules == ["q_proj", "v_proj"]


def test_all_linear_excludes_head():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    names = adapted(pm)
    assert "lm_head" not in names and len(names) == 2 * 7


def test_all_linear_gpt2_conv1d():
    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules="all-linear"))
    assert "transformer.h.0.attn.c_attn" in adapted(pm) and "lm_head" not in adapted(pm)


def test_layers_to_transform_and_exclude():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "k_proj"], layers_to_transform=[1],
                                                 exclude_modules=["k_proj"]))
    assert adapted(pm) == ["model.layers.1.self_attn.q_proj"]


def test_layer_index_rules():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("encoder.block.2.layer.0.SelfAttention.q") == 2
    assert layer_index("encoder.block.2.layer.0.SelfAttention.q", "layer") == 0
    assert layer_index("lm_head") is None


def test_module_types_on_custom_model():
    pm = get_peft_model(TinyCNN(), LoraConfig(r=2, target_modules=[nn.Conv2d, nn.Linear], exclude_modules=["head"]))
    assert adapted(pm) == ["conv", "fc"]
    assert pm.peft_config["default"].target_modules == ["conv", "fc"]  # types recorded as names for PEFT


def test_unknown_entry_names_the_entry_and_suggests():
    with pytest.raises(TargetError) as e:
        get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_prj"]))
    msg = str(e.value)
    assert "'v_prj'" in msg and "v_proj" in msg and "q_proj" in msg


def test_nothing_matches_lists_candidates():
    with pytest.raises(TargetError, match="query"):
        get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["q"]))


def test_container_target_points_to_children():
    with pytest.raises(TargetError, match="Target its children instead: .*query"):
        get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["attention.self"]))


def test_layers_to_transform_out_of_range():
    with pytest.raises(TargetError, match="layers \\[0, 1\\]"):
        get_peft_model(tiny_llama(), LoraConfig(r=2, layers_to_transform=[7]))


def test_no_default_for_custom_model():
    with pytest.raises(TargetError, match="target_modules"):
        get_peft_model(TinyCNN(), LoraConfig(r=2))
