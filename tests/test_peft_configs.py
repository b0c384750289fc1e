"""Configs PEFT accepts that slimtune used to refuse (issue 17): DoRA on Embedding and Conv, LoRA
on grouped convolutions and on nn.MultiheadAttention, prompt / P-tuning on encoder-decoder models,
mixed-adapter batches with modules_to_save. Files move both ways with the real `peft`."""
import warnings
from types import SimpleNamespace

import peft
import pytest
import torch
import torch.nn as nn
from conftest import VOCAB, TinyCNN, TinyEmbedMLP, tiny_bert_cls, tiny_t5
from properties import train_steps

import slimtune
from slimtune import BASE_ADAPTER


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


class TinyMHA(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x, labels=None):
        h = self.emb(x)
        out = self.head(self.attn(h, h, h)[0])
        return out if labels is None else SimpleNamespace(loss=out.pow(2).mean(), logits=out)


class GroupedCNN(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8 * 16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def tiny_bart(seed: int = 0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64, scale_embedding=True)).eval()


def peft_file(make, tmp_path, cfg):
    """A random adapter made by peft and saved; returns its outputs function."""
    theirs = quiet(peft.get_peft_model, make(), cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    theirs.eval().save_pretrained(tmp_path)
    return theirs


INPUTS = {"emb": lambda: torch.randint(0, VOCAB, (3, 6)), "img": lambda: torch.randn(3, 1, 4, 4),
          "grp": lambda: torch.randn(3, 4, 4, 4), "mha": lambda: torch.randint(0, VOCAB, (3, 6))}
DORA_CASES = {"embedding": (TinyEmbedMLP, ["emb"], "emb"), "conv2d+conv1d": (TinyCNN, ["conv", "conv1d"], "img")}


@pytest.mark.parametrize("case", DORA_CASES)
def test_dora_on_embedding_and_conv_both_ways(case, tmp_path):
    make, targets, inp = DORA_CASES[case]
    x = INPUTS[inp]()
    theirs = peft_file(make, tmp_path / "p", peft.LoraConfig(r=2, target_modules=targets, use_dora=True, init_lora_weights=False))
    ref = theirs(x)
    ours = slimtune.PeftModel.from_pretrained(make(), tmp_path / "p")
    torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "s")
    back = quiet(peft.PeftModel.from_pretrained, make(), tmp_path / "s").eval()
    torch.testing.assert_close(back(x), ref, atol=1e-5, rtol=1e-5)
    fresh = slimtune.get_peft_model(make(), slimtune.LoraConfig(r=2, target_modules=targets, use_dora=True))
    torch.testing.assert_close(fresh(x), make()(x), atol=1e-5, rtol=1e-5)  # DoRA starts at the base model


def test_lora_on_grouped_conv_both_ways(tmp_path):
    x = INPUTS["grp"]()
    theirs = peft_file(GroupedCNN, tmp_path / "p", peft.LoraConfig(r=4, target_modules=["conv"], init_lora_weights=False))
    ours = slimtune.PeftModel.from_pretrained(GroupedCNN(), tmp_path / "p")
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    for pm in (ours, theirs):  # neither library can fold B·A into a grouped weight
        with pytest.raises(NotImplementedError):
            quiet(pm.merge_adapter)
    with pytest.raises(ValueError, match="divisible"):
        slimtune.get_peft_model(GroupedCNN(), slimtune.LoraConfig(r=3, target_modules=["conv"]))


def _merged_by_hand(tmp_path, scale):
    """A plain TinyMHA with the file's ΔW added to in_proj_weight and out_proj.weight: the reference."""
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "adapter_model.safetensors")
    m = TinyMHA()
    p = "base_model.model.attn."
    with torch.no_grad():
        m.attn.in_proj_weight.add_(scale * sd[p + "lora_B.weight"] @ sd[p + "lora_A.weight"])
        m.attn.out_proj.weight.add_(scale * sd[p + "base_layer.out_proj.lora_B.weight"] @ sd[p + "base_layer.out_proj.lora_A.weight"])
    return m


def test_lora_on_multihead_attention_both_ways(tmp_path):
    x = INPUTS["mha"]()
    peft_file(TinyMHA, tmp_path / "p", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["attn"], init_lora_weights=False))
    ours = slimtune.PeftModel.from_pretrained(TinyMHA(), tmp_path / "p")  # PEFT's file layout is read as is
    ref = _merged_by_hand(tmp_path / "p", scale=4.0)(x)
    torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)
    plain = ours.merge_and_unload()
    assert type(plain.attn) is nn.MultiheadAttention and type(plain.attn.out_proj) is not slimtune.AdapterLayer
    torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=1e-5)

    pm = slimtune.get_peft_model(TinyMHA(), slimtune.LoraConfig(r=2, lora_alpha=8, target_modules=["attn"]))
    torch.testing.assert_close(pm(x), TinyMHA()(x))  # B = 0: the base model
    _, changed = train_steps(pm, {"x": x, "labels": x}, steps=3, lr=1e-2)
    assert changed and all("lora_" in n for n in changed)
    pm.save_pretrained(tmp_path / "s")
    back = quiet(peft.PeftModel.from_pretrained, TinyMHA(), tmp_path / "s")
    assert set(back.state_dict()) == set(pm.state_dict())  # the same layout: PEFT loads every tensor
    assert all(torch.equal(back.state_dict()[k], v) for k, v in pm.state_dict().items())


def test_peft_multihead_attention_forward_differs_from_its_own_merge(tmp_path):
    """Why the test above compares with a hand merge: PEFT 0.21.2 adds the out_proj update twice in
    its MultiheadAttention forward (merge() adds it, then out_proj.merge() adds it again)."""
    x = INPUTS["mha"]()
    theirs = peft_file(TinyMHA, tmp_path, peft.LoraConfig(r=2, lora_alpha=8, target_modules=["attn"], init_lora_weights=False))
    assert (theirs(x) - _merged_by_hand(tmp_path, scale=4.0)(x)).abs().max() > 1e-3


PROMPT_CASES = {"t5_prompt": (tiny_t5, "PromptTuningConfig"), "t5_ptuning": (tiny_t5, "PromptEncoderConfig"),
                "bart_prompt": (tiny_bart, "PromptTuningConfig"), "bart_ptuning": (tiny_bart, "PromptEncoderConfig")}


@pytest.mark.parametrize("case", PROMPT_CASES)
def test_prompt_learning_on_encoder_decoder_models(case, tmp_path):
    make, cls = PROMPT_CASES[case]
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    labels = torch.randint(3, VOCAB, (2, 4))
    theirs = peft_file(make, tmp_path / "p", getattr(peft, cls)(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"))
    ref = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    ours = slimtune.PeftModel.from_pretrained(make(), tmp_path / "p")
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours.generate(**gen), theirs.generate(**gen))
    with ours.disable_adapter():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, labels=labels).logits,
                                   make()(input_ids=ids, attention_mask=mask, labels=labels).logits)
    fresh = slimtune.get_peft_model(make(), getattr(slimtune, cls)(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"))
    _, changed = train_steps(fresh, {"input_ids": ids, "attention_mask": mask, "labels": labels}, steps=2, lr=5e-2)
    assert changed and all("prompt_encoder" in n for n in changed)  # only the prompt trains
    fresh.save_pretrained(tmp_path / "s")
    back = quiet(peft.PeftModel.from_pretrained, make(), tmp_path / "s").eval()
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, labels=labels).logits,
                               fresh(input_ids=ids, attention_mask=mask, labels=labels).logits, atol=1e-5, rtol=1e-5)


def test_mixed_batch_with_modules_to_save_equals_peft(ids, tmp_path):
    kw = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False)
    for name in ("a", "b"):
        peft_file(tiny_bert_cls, tmp_path / name, peft.LoraConfig(**kw))
    outs = {}
    for lib, L in (("peft", peft), ("slimtune", slimtune)):
        pm = quiet(L.PeftModel.from_pretrained, tiny_bert_cls(), tmp_path / "a", adapter_name="a")
        quiet(pm.load_adapter, tmp_path / "b", adapter_name="b")
        names = ["b", BASE_ADAPTER, "a"]
        with torch.no_grad():
            mixed = pm(input_ids=ids, adapter_names=names).logits
            alone = []
            for i, n in enumerate(names):
                if n == BASE_ADAPTER:
                    with pm.disable_adapter():
                        alone.append(pm(input_ids=ids).logits[i])
                else:
                    pm.set_adapter(n)
                    alone.append(pm(input_ids=ids).logits[i])
        torch.testing.assert_close(mixed, torch.stack(alone), atol=1e-5, rtol=1e-5)  # each row: its own head
        outs[lib] = mixed
    torch.testing.assert_close(outs["slimtune"], outs["peft"], atol=1e-5, rtol=1e-5)
