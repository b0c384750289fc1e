"""LoRA on parameters (`target_parameters`) for fused MoE expert tensors, against the real peft 0.21.2.

transformers 5 keeps each expert projection of Mixtral, Qwen3-MoE and gpt-oss as one 3-D
nn.Parameter; gpt-oss stores it (experts, in, out) (`is_transposed`), the others (experts, out, in).
"""
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune import ConfigError
from slimtune.methods.lora_params import ParamWrapper
from slimtune.targeting import TargetError

LIBS = {"peft": peft, "slimtune": slimtune}
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def tiny_moe(kind: str = "mixtral", seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=128, max_position_embeddings=64, num_experts_per_tok=2)
    if kind == "mixtral":
        m = tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, **common))
    elif kind == "qwen3_moe":
        m = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=24, head_dim=8, **common))
    else:
        m = tf.GptOssForCausalLM(tf.GptOssConfig(num_local_experts=4, head_dim=8, layer_types=["full_attention"] * 2,
                                                 **common))
        with torch.no_grad():  # gpt-oss initialises its expert stacks to zero; make them count
            for n, p in m.named_parameters():
                if n.endswith("_proj") and p.dim() == 3:
                    p.normal_(std=0.05)
    return m.eval()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def lora(lib, kind, **kw):
    L = LIBS[lib]
    cfg = L.LoraConfig(r=2, target_modules=[], target_parameters=TARGETS, init_lora_weights=False, **kw)
    return quiet(L.get_peft_model, tiny_moe(kind), cfg).eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_files_and_outputs_equal_peft_both_ways(kind, ids, tmp_path):
    base = tiny_moe(kind)(ids).logits
    made = {}
    for lib in LIBS:
        pm = lora(lib, kind)
        pm.save_pretrained(tmp_path / lib)
        made[lib] = pm(ids).logits.detach()
        assert not torch.allclose(made[lib], base, atol=1e-4)  # the adapter changes the output
    keys = {lib: {k: tuple(v.shape) for k, v in load_file(tmp_path / lib / "adapter_model.safetensors").items()}
            for lib in LIBS}
    assert keys["slimtune"] == keys["peft"]
    assert any(".experts.base_layer.lora_A.weight" in k for k in keys["peft"])  # two parameters nest as PEFT's
    for src, dst in (("peft", "slimtune"), ("slimtune", "peft")):
        back = quiet(LIBS[dst].PeftModel.from_pretrained, tiny_moe(kind), tmp_path / src)
        torch.testing.assert_close(back(ids).logits, made[src], atol=1e-5, rtol=1e-5)
    wrapper = quiet(slimtune.PeftModel.from_pretrained, tiny_moe(kind), tmp_path / "peft").get_base_model() \
        .model.layers[0].mlp.experts
    assert isinstance(wrapper, ParamWrapper) and wrapper.num_experts == 4
    assert wrapper.is_transposed == (kind == "gpt_oss")


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_init_is_identity_merge_is_exact_and_training_reaches_the_adapter(kind, ids):
    base = tiny_moe(kind)(ids).logits
    fresh = quiet(slimtune.get_peft_model, tiny_moe(kind), slimtune.LoraConfig(r=2, target_parameters=TARGETS))
    torch.testing.assert_close(fresh(ids).logits, base)
    pm = lora("slimtune", kind)
    want = pm(ids).logits.detach()
    pm.merge_adapter()
    torch.testing.assert_close(pm(ids).logits, want, atol=1e-5, rtol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(pm(ids).logits, want, atol=0, rtol=0)
    with pm.disable_adapter():
        torch.testing.assert_close(pm(ids).logits, base, atol=1e-5, rtol=1e-5)
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    trained = [p for p in pm.parameters() if p.requires_grad]
    assert len(trained) == 2 * 2 * 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    plain = lora("slimtune", kind).merge_and_unload()
    assert not any(isinstance(m, ParamWrapper) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_second_adapter_switches_like_peft(ids, tmp_path):
    outs = {}
    for lib, L in LIBS.items():
        pm = lora(lib, "mixtral")
        torch.manual_seed(5)
        quiet(pm.add_adapter, "other", L.LoraConfig(r=4, target_modules=[], target_parameters=TARGETS,
                                                    init_lora_weights=False))
        first = pm(ids).logits.detach()
        pm.set_adapter("other")
        pm.save_pretrained(tmp_path / lib, selected_adapters=["other"])
        outs[lib] = (first, pm(ids).logits.detach())
        assert not torch.allclose(*outs[lib])
    back = quiet(slimtune.PeftModel.from_pretrained, tiny_moe(), tmp_path / "peft" / "other")
    torch.testing.assert_close(back(ids).logits, outs["peft"][1], atol=1e-5, rtol=1e-5)


def test_mistakes_are_clear(ids):
    with pytest.raises(TargetError, match="experts.nope"):
        slimtune.get_peft_model(tiny_moe(), slimtune.LoraConfig(target_parameters=["experts.nope"]))
    with pytest.raises(ConfigError, match="lora_dropout"):
        slimtune.get_peft_model(tiny_moe(), slimtune.LoraConfig(target_parameters=TARGETS, lora_dropout=0.1))
    with pytest.raises(ConfigError, match="use_dora"):
        slimtune.get_peft_model(tiny_moe(), slimtune.LoraConfig(target_parameters=TARGETS, use_dora=True))
    pm = lora("slimtune", "mixtral")
    with pytest.raises(ValueError, match="mixed-adapter"):
        pm(ids, adapter_names=["default", "__base__"])


def test_modules_and_parameters_together_equal_peft(ids, tmp_path):
    L = peft
    pm = quiet(L.get_peft_model, tiny_moe(), L.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=TARGETS[:1],
                                                          init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path)
    back = quiet(slimtune.PeftModel.from_pretrained, tiny_moe(), tmp_path)
    torch.testing.assert_close(back(ids).logits, pm(ids).logits, atol=1e-5, rtol=1e-5)
    assert back.peft_config["default"].target_parameters == TARGETS[:1]
