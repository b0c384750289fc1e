"""QLoRA files move between slimtune and the real `peft` on the same NF4 base, with the same outputs,
and between a quantized base and its full-precision model; the PEFT user's flow works unchanged."""
import warnings

import peft
import pytest
import torch
from conftest_qlora import batch, llama_dir, load  # noqa: F401
from safetensors.torch import load_file

import slimtune
from slimtune.quant import dequantize, quantized_linears

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits


def _ours(model, **kw):
    torch.manual_seed(1)
    return slimtune.get_peft_model(model, slimtune.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))


def _peft(model, **kw):
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))


@pytest.mark.parametrize("targets", [ALL, ["q_proj", "v_proj"]])
def test_slimtune_nf4_adapter_loads_into_peft_with_the_same_outputs(llama_dir, tmp_path, targets):
    ours = _ours(load(llama_dir), target_modules=targets, task_type="CAUSAL_LM")
    x = batch()
    ref = _logits(ours, x)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load(llama_dir), tmp_path)
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # peft's bnb layer
    torch.testing.assert_close(_logits(theirs, x), ref, atol=1e-5, rtol=1e-5)


def test_peft_nf4_adapter_loads_into_slimtune_with_the_same_outputs(llama_dir, tmp_path):
    q = peft.prepare_model_for_kbit_training(load(llama_dir), use_gradient_checkpointing=False)
    theirs = _peft(q, target_modules=ALL, task_type="CAUSAL_LM")
    x = batch()
    theirs.train()
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # trained a little by peft, not just initialised
        theirs(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    ref = _logits(theirs, x)
    theirs.save_pretrained(tmp_path)
    ours = slimtune.PeftModel.from_pretrained(load(llama_dir), tmp_path)
    torch.testing.assert_close(_logits(ours, x), ref, atol=1e-5, rtol=1e-5)


def test_int8_adapters_move_both_ways(llama_dir, tmp_path):
    x = batch()
    ours = _ours(load(llama_dir, "int8"), target_modules=["q_proj", "v_proj"])
    ours.train()  # LLM.int8 eval quantizes activations; train mode is the dequantized matmul (both libraries)
    with torch.no_grad():
        ref = ours(x).logits
    ours.save_pretrained(tmp_path / "s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load(llama_dir, "int8"), tmp_path / "s")
    theirs.train()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ref, atol=1e-4, rtol=1e-4)
    theirs.save_pretrained(tmp_path / "p")
    back = slimtune.PeftModel.from_pretrained(load(llama_dir, "int8"), tmp_path / "p", is_trainable=True)
    back.train()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref, atol=1e-4, rtol=1e-4)


def test_adapters_move_between_the_quantized_and_the_full_precision_base(llama_dir, tmp_path):
    """Same keys and shapes both ways; merged, each base becomes *its own* weight + the same ΔW."""
    x = batch()
    on_q = _ours(load(llama_dir), target_modules=ALL)
    on_q.save_pretrained(tmp_path / "q")
    on_f = _ours(load(llama_dir, None), target_modules=ALL)
    with torch.no_grad():
        for p in on_f.parameters():
            if p.requires_grad:
                p.add_(0.01)  # not the same values as the adapter above
    on_f.save_pretrained(tmp_path / "f")
    for src, base_quant in (("q", None), ("f", "nf4")):
        file = load_file(str(tmp_path / src / "adapter_model.safetensors"))
        model = slimtune.PeftModel.from_pretrained(load(llama_dir, base_quant), tmp_path / src)
        live = model.get_adapter_state_dict()
        assert live.keys() == file.keys() and all(torch.equal(live[k], file[k]) for k in file)
        base_w = ({n: dequantize(m) for n, m in quantized_linears(load(llama_dir, base_quant))} if base_quant else
                  {n: m.weight.detach() for n, m in load(llama_dir, None).named_modules() if n.split(".")[-1] in ALL})
        deltas = {n.replace("base_model.model.", ""): m.get_delta_weight("default") for n, m in model.named_modules()
                  if hasattr(m, "get_delta_weight") and "lora_A" in m._modules and "default" in m.lora_A}
        merged = model.merge_and_unload()
        for n, w in base_w.items():
            assert torch.equal(merged.get_submodule(n).weight, w + deltas[n]), n
        assert torch.isfinite(_logits(merged, x)).all()


def test_the_peft_users_qlora_flow_trains(llama_dir):
    """from_pretrained(quantization_config) -> prepare_model_for_kbit_training -> get_peft_model -> train,
    with only the import changed from peft to slimtune (gradient checkpointing on, PEFT's default)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    model = slimtune.prepare_model_for_kbit_training(model)
    model = slimtune.get_peft_model(model, slimtune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                               lora_dropout=0.05, task_type="CAUSAL_LM"))
    t, total = model.get_nb_trainable_parameters()
    assert 0 < t < total
    x = batch(b=4, t=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    merged = model.merge_and_unload()  # bf16 compute dtype: the plain model comes back in bf16
    assert not list(quantized_linears(merged)) and merged.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
