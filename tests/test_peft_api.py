"""PEFT API that users call, side by side with the real `peft` (issue 17: "API PEFT users call")."""
import inspect
import json
import warnings

import peft
import pytest
import torch
from conftest import VOCAB, TinyCNN, TinyEmbedMLP, logits, randomize_lora, tiny_bert_cls, tiny_llama

import slimtune

LIBS = {"peft": peft, "slimtune": slimtune}


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def same_adapter(tmp_path, make=tiny_llama, **kw):
    """A random LoRA adapter made by peft, loaded by each library."""
    kw = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **kw}
    quiet(peft.get_peft_model, make(), peft.LoraConfig(**kw)).save_pretrained(tmp_path)
    return {n: quiet(L.PeftModel.from_pretrained, make(), tmp_path) for n, L in LIBS.items()}


# ---- autocast_adapter_dtype -----------------------------------------------------------------------
def test_autocast_adapter_dtype(ids):
    bf16 = lambda: tiny_llama().to(torch.bfloat16)  # noqa: E731
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"])
    theirs = quiet(peft.get_peft_model, bf16(), peft.LoraConfig(**cfg))
    upcast = slimtune.get_peft_model(bf16(), slimtune.LoraConfig(**cfg), autocast_adapter_dtype=True)
    kept = slimtune.get_peft_model(bf16(), slimtune.LoraConfig(**cfg))  # slimtune's default: the base dtype
    dtypes = lambda m: {p.dtype for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert dtypes(theirs) == dtypes(upcast) == {torch.float32} and dtypes(kept) == {torch.bfloat16}
    assert dtypes(quiet(peft.get_peft_model, bf16(), peft.LoraConfig(**cfg), autocast_adapter_dtype=False)) == {torch.bfloat16}
    randomize_lora(upcast)
    mine = dict(upcast.named_parameters())  # the same parameter names in both libraries
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            p.copy_(mine[n])
    torch.testing.assert_close(logits(upcast, ids), logits(theirs, ids), atol=0.05, rtol=0.05)  # bf16 rounding
    upcast.train()
    upcast(input_ids=ids, labels=ids).loss.backward()  # fp32 gradients reach the fp32 adapter weights
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in upcast.parameters() if p.requires_grad)


# ---- enable / disable adapter layers --------------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_enable_disable_adapter_layers(lib, ids, tmp_path):
    pm = same_adapter(tmp_path)[lib]
    with torch.no_grad():
        on, base = logits(pm, ids), logits(tiny_llama(), ids)
        pm.disable_adapter_layers()
        torch.testing.assert_close(logits(pm, ids), base)
        pm.enable_adapter_layers()
        torch.testing.assert_close(logits(pm, ids), on)


# ---- inject_adapter_in_model, state dicts ---------------------------------------------------------
def test_inject_adapter_in_model_matches_peft(ids):
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), tiny_llama())
    ours = slimtune.inject_adapter_in_model(slimtune.LoraConfig(**cfg), tiny_llama())
    assert type(ours).__name__ == "LlamaForCausalLM" and set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids))


def test_peft_model_state_dict_functions(ids, tmp_path):
    both = same_adapter(tmp_path)
    theirs, ours = both["peft"], both["slimtune"]
    sd = peft.get_peft_model_state_dict(theirs)
    mine = slimtune.get_peft_model_state_dict(ours)
    assert set(sd) == set(mine) and all(torch.equal(sd[k], mine[k]) for k in sd)
    fresh = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    res = slimtune.set_peft_model_state_dict(fresh, sd)
    assert res.missing_keys == [] and res.unexpected_keys == []
    torch.testing.assert_close(logits(fresh, ids), logits(theirs, ids))
    base = slimtune.get_base_model_state_dict(ours)
    assert set(base) == set(peft.get_base_model_state_dict(theirs)) == set(tiny_llama().state_dict())
    assert all(torch.equal(v, tiny_llama().state_dict()[k]) for k, v in base.items())


# ---- hotswap -------------------------------------------------------------------------------------
def test_hotswap_adapter_matches_loading_directly(ids, tmp_path):
    for name, seed, r in (("a", 1, 2), ("b", 2, 4)):
        torch.manual_seed(seed)
        quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False)).save_pretrained(tmp_path / name)
    want = logits(slimtune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "b"), ids)
    pm = slimtune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    from slimtune.hotswap import prepare_model_for_compiled_hotswap

    before = logits(pm, ids)
    prepare_model_for_compiled_hotswap(pm, target_rank=4)
    torch.testing.assert_close(logits(pm, ids), before)
    ids_before = {n: id(p) for n, p in pm.named_parameters()}
    slimtune.hotswap_adapter(pm, tmp_path / "b", adapter_name="default")
    assert {n: id(p) for n, p in pm.named_parameters()} == ids_before  # same tensors, new values
    torch.testing.assert_close(logits(pm, ids), want, atol=1e-6, rtol=1e-5)
    theirs = quiet(peft.PeftModel.from_pretrained, tiny_llama(), tmp_path / "a")  # peft's hotswap, same result
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap as peft_prepare

    quiet(peft_prepare, theirs, target_rank=4)
    quiet(hotswap_adapter, theirs, str(tmp_path / "b"), adapter_name="default")
    torch.testing.assert_close(logits(theirs.eval(), ids), want, atol=1e-6, rtol=1e-5)


# ---- AutoPeftModel ---------------------------------------------------------------------------------
def test_auto_peft_model_loads_the_recorded_base(ids, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    pm = slimtune.get_peft_model(base, slimtune.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    for auto in (slimtune.AutoPeftModelForCausalLM, slimtune.AutoPeftModel):
        loaded = auto.from_pretrained(tmp_path / "adapter")
        assert isinstance(loaded, slimtune.PeftModelForCausalLM)
        torch.testing.assert_close(logits(loaded, ids), logits(pm, ids))
    theirs = quiet(peft.AutoPeftModelForCausalLM.from_pretrained, tmp_path / "adapter")  # and peft reads the same folder
    torch.testing.assert_close(logits(theirs.eval(), ids), logits(pm, ids))


def test_auto_peft_model_for_classification_reads_the_head_size(ids, tmp_path):
    tiny_bert_cls(num_labels=3).save_pretrained(tmp_path / "base")
    from transformers import AutoModelForSequenceClassification

    pm = slimtune.get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"),
                                 slimtune.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    randomize_lora(pm)
    pm.eval().save_pretrained(tmp_path / "adapter")
    loaded = slimtune.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, slimtune.PeftModelForSequenceClassification)
    torch.testing.assert_close(logits(loaded, ids), logits(pm, ids))


def test_packaged_model_is_recorded_by_hub_id(tmp_path, monkeypatch):
    from slimtune.model import base_model_name
    from slimtune.train import models

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    m = tiny_llama()
    m.name_or_path = str(tmp_path / "smollm2-135m-instruct")  # where resolve("smollm2-135m") puts it
    assert base_model_name(m) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    m.name_or_path = str(tmp_path / "elsewhere")
    assert base_model_name(m) == str(tmp_path / "elsewhere")
    assert models.resolve("sentence-transformers/all-MiniLM-L6-v2") == models.resolve("minilm")


# ---- types, flags and status -----------------------------------------------------------------------
def test_peft_type_enum_and_flags():
    for L in LIBS.values():
        c = L.LoraConfig(r=4)
        assert c.peft_type == L.PeftType.LORA and c.peft_type.value == "LORA" and not c.is_prompt_learning
        assert L.PromptTuningConfig(num_virtual_tokens=4).is_prompt_learning
        assert L.TaskType.CAUSAL_LM == "CAUSAL_LM"
    assert slimtune.PeftType("PREFIX_TUNING") == peft.PeftType.PREFIX_TUNING.value


def test_model_level_attributes_match_peft(tmp_path):
    both = same_adapter(tmp_path, task_type="CAUSAL_LM")
    theirs, ours = both["peft"], both["slimtune"]
    assert ours.peft_type.value == theirs.peft_type.value == "LORA"
    assert type(ours).__name__ == type(theirs).__name__ == "PeftModelForCausalLM"
    assert ours.active_peft_config is ours.peft_config["default"]


def test_model_and_layer_status_match_peft(tmp_path):
    both = same_adapter(tmp_path)
    for pm in both.values():
        quiet(pm.load_adapter, tmp_path, adapter_name="other")
        pm.merge_adapter(["default"])
    mt, ms = both["peft"].get_model_status(), both["slimtune"].get_model_status()
    for f in ("base_model_type", "adapter_model_type", "peft_types", "trainable_params", "total_params",
              "num_adapter_layers", "enabled", "active_adapters", "merged_adapters", "requires_grad",
              "available_adapters", "devices"):
        assert getattr(ms, f) == getattr(mt, f), f
    lt, ls = both["peft"].get_layer_status(), both["slimtune"].get_layer_status()
    assert [(s.name, s.module_type, s.active_adapters, s.merged_adapters, s.available_adapters, s.requires_grad) for s in ls] \
        == [(s.name, s.module_type, s.active_adapters, s.merged_adapters, s.available_adapters, s.requires_grad) for s in lt]


@pytest.mark.parametrize("lib", LIBS)
def test_set_adapter_inference_mode(lib, tmp_path):
    pm = same_adapter(tmp_path)[lib]  # loaded for inference: frozen
    assert not any(p.requires_grad for p in pm.parameters())
    pm.set_adapter("default")  # PEFT: activating makes it trainable ...
    assert any(p.requires_grad for p in pm.parameters())
    pm.set_adapter("default", inference_mode=True)  # ... unless inference_mode=True
    assert not any(p.requires_grad for p in pm.parameters())


def test_layer_features_match_peft():
    for make, target in ((TinyEmbedMLP, "emb"), (TinyCNN, "conv"), (TinyCNN, "conv1d"), (tiny_llama, "q_proj")):
        got = {}
        for n, L in LIBS.items():
            pm = quiet(L.get_peft_model, make(), L.LoraConfig(r=2, target_modules=[target]))
            layer = next(m for name, m in pm.named_modules() if name.endswith(target))
            got[n] = (layer.in_features, layer.out_features)
        assert got["peft"] == got["slimtune"], target


# ---- files: model card, hub, key mapping ------------------------------------------------------------
def test_model_card_written_and_kept(tmp_path):
    from huggingface_hub import ModelCard

    pm = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    pm.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    pm.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "lora" in card.data.tags and card.data.pipeline_tag == "text-generation"
    (tmp_path / "README.md").write_text((tmp_path / "README.md").read_text() + "\nMy notes.\n")
    pm.save_pretrained(tmp_path)  # an existing card keeps its text
    assert "My notes." in (tmp_path / "README.md").read_text()


def test_push_to_hub_is_a_clear_offline_error():
    pm = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(slimtune.OfflineError, match="offline.*save_pretrained"):
        pm.push_to_hub("me/adapter")


@pytest.mark.parametrize("lib", LIBS)
def test_from_pretrained_key_mapping(lib, ids, tmp_path):
    from safetensors.torch import load_file, save_file

    src = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_lora(src)
    src.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    state = load_file(f)  # as if the architecture had named its blocks "blocks"
    save_file({k.replace("model.model.layers", "model.model.blocks"): v for k, v in state.items()}, f)
    L = LIBS[lib]
    pm = quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path, key_mapping={r"^model\.blocks": "model.layers"})
    torch.testing.assert_close(logits(pm, ids), logits(src, ids))


# ---- the forward signature tools read ----------------------------------------------------------------
def test_forward_signature_is_the_base_models_plus_adapter_names():
    pm = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    params = inspect.signature(pm.forward).parameters
    assert list(params)[:2] == ["input_ids", "attention_mask"] and "labels" in params and "adapter_names" in params
    assert "labels" in inspect.signature(type(pm).forward).parameters  # transformers' find_labels reads the class
    from transformers.utils import find_labels

    assert find_labels(type(pm)) == ["labels"]
    assert find_labels(slimtune.PeftModelForQuestionAnswering) == ["start_positions", "end_positions"]
    x = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(pm(x).logits, pm.forward(input_ids=x).logits)  # positional and by name
    cnn = slimtune.get_peft_model(TinyCNN(), slimtune.LoraConfig(r=2, target_modules=["fc"]))
    assert list(inspect.signature(cnn.forward).parameters) == ["x", "adapter_names"]


# ---- import cost ---------------------------------------------------------------------------------------
def test_import_is_lazy_and_every_public_name_resolves():
    import subprocess
    import sys

    code = ("import sys, slimtune; assert 'torch' not in sys.modules, 'import slimtune imported torch'; "
            "ns = {}; exec('from slimtune import *', ns); "
            "missing = [n for n in slimtune.__all__ if n not in ns]; assert not missing, missing; "
            "assert ns['LoraConfig'] is slimtune.LoraConfig and ns['get_peft_model'].__module__ == 'slimtune.model'")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-c", "import sys; from slimtune.cli.main import build_parser; "
                          "build_parser().format_help(); print('torch' in sys.modules)"],
                         check=True, capture_output=True, text=True).stdout
    assert out.strip().endswith("False")  # `slimtune --help` loads no torch
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        slimtune.nope  # noqa: B018
    subprocess.run([sys.executable, "-c", "import slimtune; slimtune.methods.sparse.fisher_scores"], check=True)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("make,targets", [(TinyEmbedMLP, ["emb", "proj"]), (TinyCNN, ["conv", "conv1d", "fc"])])
def test_fp32_adapters_on_a_bf16_base_run_every_layer_type(make, targets, use_dora, ids, images):
    """autocast_adapter_dtype=True on the paths besides the fused one: embeddings, convs, DoRA, and two
    active adapters at once (the general path). The output keeps the base's dtype."""
    x = ids if make is TinyEmbedMLP else images.to(torch.bfloat16)
    outs = {}
    for up in (False, True):
        pm = slimtune.get_peft_model(make().to(torch.bfloat16), slimtune.LoraConfig(r=4, target_modules=targets, use_dora=use_dora,
                                                                                    init_lora_weights=False), autocast_adapter_dtype=up)
        pm.add_adapter("b", slimtune.LoraConfig(r=4, target_modules=targets, use_dora=use_dora, init_lora_weights=False),
                       autocast_adapter_dtype=up)
        pm.base_model.set_adapter(["default", "b"])
        assert {p.dtype for p in pm.parameters() if p.requires_grad} == {torch.float32 if up else torch.bfloat16}
        out = pm(x)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        outs[up] = out.float()
    assert (outs[True] - outs[False]).abs().max() <= 0.05 * outs[False].abs().max() + 0.05  # bf16 rounding apart
