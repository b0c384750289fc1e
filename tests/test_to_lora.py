"""convert_to_lora / save_as_lora (PEFT's names and results): LoHa, LoKr and VeRA adapters as a plain
LoRA by truncated SVD of each layer's ΔW, checked against the real `peft` on the same adapter."""
import peft
import pytest
import torch
from conftest import logits, tiny_gpt2, tiny_llama

import slimtune
from slimtune import PeftModel, convert_to_lora, save_as_lora

CONFIGS = {
    "loha": lambda: peft.LoHaConfig(r=2, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lokr": lambda: peft.LoKrConfig(r=2, init_weights=False, target_modules=["q_proj", "down_proj"]),
    "vera": lambda: peft.VeraConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"]),
}


def _both(method, tmp_path, model=tiny_llama):
    """The same adapter in peft and in slimtune (peft's file loaded here)."""
    pp = peft.get_peft_model(model(), CONFIGS[method]())
    pp.save_pretrained(tmp_path / "src")
    return pp, PeftModel.from_pretrained(model(), tmp_path / "src")


def _products(state):
    """{layer: B·A}: the SVD's factors are unique only up to signs, their product is not."""
    return {k.removesuffix(".lora_A.weight"): state[k.replace("lora_A", "lora_B")] @ state[k]
            for k in state if k.endswith(".lora_A.weight")}


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("rank", [2, 0.9])
def test_same_config_and_tensors_as_peft(method, rank, tmp_path):
    pp, ours = _both(method, tmp_path)
    pc, ps = peft.convert_to_lora(pp, rank)
    oc, os_ = convert_to_lora(ours, rank)
    assert set(ps) == set(os_) and len(ps) > 0
    pb, ob = _products(ps), _products(os_)
    for k in pb:
        torch.testing.assert_close(ob[k], pb[k], atol=1e-5, rtol=1e-4, msg=k)
    assert (oc.r, oc.lora_alpha, oc.rank_pattern, oc.alpha_pattern) == (pc.r, pc.lora_alpha, pc.rank_pattern,
                                                                        pc.alpha_pattern)
    if isinstance(rank, float):  # per-layer ranks from the energy threshold, some below the full rank
        assert oc.rank_pattern and len(set(oc.rank_pattern.values())) >= 1


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_saved_lora_loads_in_peft_and_here_with_the_adapters_outputs(method, tmp_path, ids):
    """At full rank the LoRA is the adapter (up to the SVD's rounding); both libraries load the folder
    and give the same outputs as peft's own conversion."""
    pp, ours = _both(method, tmp_path)
    full = 16  # the smallest side of the targeted layers (v_proj: 16 × 32), so ≥ every ΔW's rank
    with torch.no_grad():
        want = logits(pp, ids)
    save_as_lora(tmp_path / "ours", ours, full)
    peft.save_as_lora(tmp_path / "theirs", pp, full)
    with torch.no_grad():
        in_peft = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours"), ids)
        theirs = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs"), ids)
        here = logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours"), ids)
    torch.testing.assert_close(in_peft, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(here, in_peft, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(here, want, atol=1e-4, rtol=1e-3)


def test_gpt2_conv1d_layout(tmp_path, ids):
    """GPT-2's Conv1D stores W as (in, out): the converted LoRA still reproduces the VeRA adapter."""
    cfg = lambda: peft.VeraConfig(r=4, init_weights=False, target_modules=["c_attn"])  # noqa: E731
    pp = peft.get_peft_model(tiny_gpt2(), cfg())
    pp.save_pretrained(tmp_path / "src")
    ours = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "src")
    save_as_lora(tmp_path / "lora", ours, 4)
    with torch.no_grad():
        want = logits(pp, ids)
        got = logits(peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "lora"), ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_refusals_name_the_problem(tmp_path):
    oft = slimtune.get_peft_model(tiny_llama(), slimtune.OFTConfig(oft_block_size=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="OFTLinear"):
        convert_to_lora(oft, 2)
    dora = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="DoraLinear"):  # its magnitude is not part of B·A
        convert_to_lora(dora, 2)
    _, ours = _both("loha", tmp_path)
    for bad in (0, 1.5, -1):
        with pytest.raises(ValueError, match="rank"):
            convert_to_lora(ours, bad)
    with pytest.raises(ValueError, match="larger than"):
        convert_to_lora(ours, 1000)
    with pytest.raises(TypeError, match="no layer"):
        convert_to_lora(ours, 2, adapter_name="other")
    lora = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="LoRA already"):
        convert_to_lora(lora, 2)
