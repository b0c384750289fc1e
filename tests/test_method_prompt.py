"""Prompt tuning and P-tuning: inputs, masks, labels, generate, files both ways with peft, training."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
from properties import train_steps
from safetensors.torch import load_file

from slimtune import PeftModel, get_peft_model
from slimtune.compat import enable_activation_checkpointing
from slimtune.methods.bottleneck import NotMergeableError
from slimtune.methods.prompt import PromptEncoderConfig, PromptTuningConfig
from slimtune.targeting import TargetError

V = 64
N = 4


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()


def tiny_bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=2)).eval()


IDS = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(IDS)
MASK[0, :2] = 0  # row 0 left-padded


def logits(m):
    return m(input_ids=IDS, attention_mask=MASK).logits


def test_inputs_masks_labels_are_extended():
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N))
    seen = {}
    h = pm.base_model.model.model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    out = pm(input_ids=IDS, attention_mask=MASK, labels=IDS)
    h.remove()
    assert seen["inputs_embeds"].shape == (2, N + 6, 32) and seen.get("input_ids") is None
    assert seen["attention_mask"].shape == (2, N + 6) and seen["attention_mask"][:, :N].all()
    torch.testing.assert_close(seen["inputs_embeds"][0, :N], pm.base_model.prompt_encoder["default"].embedding.weight)
    assert out.logits.shape == (2, N + 6, V)
    # loss counts the real tokens only (the first one predicted from the last virtual token)
    lg = out.logits[:, N - 1:-1].reshape(-1, V)
    tgt = IDS.reshape(-1)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(lg, tgt))


def test_init_from_vocab_and_text():
    model = tiny_llama()
    emb = model.get_input_embeddings().weight
    pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB"))
    table = pm.base_model.prompt_encoder["default"].embedding.weight
    assert all(any(torch.equal(r, e) for e in emb) for r in table)

    class Tok:  # any callable returning input_ids works (slimtune-only `tokenizer=` kwarg)
        name_or_path = ""

        def __call__(self, text):
            return {"input_ids": [ord(c) % V for c in text]}

    cfg = PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="abc",
                             tokenizer=Tok())
    pm = get_peft_model(tiny_llama(), cfg)
    ids = torch.tensor([ord(c) % V for c in "abcab"])
    torch.testing.assert_close(pm.base_model.prompt_encoder["default"].embedding.weight, emb[ids])
    assert "tokenizer" not in cfg.to_dict() and cfg.tokenizer is None  # never written to disk
    with pytest.raises(Exception, match="tokenizer_name_or_path"):
        PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="x")


def test_text_init_from_local_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "classify", "the", "review", "sentiment"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(tmp_path)
    model = tiny_llama()
    emb = model.get_input_embeddings().weight
    cfg = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text="classify the review", tokenizer_name_or_path=str(tmp_path))
    pm = get_peft_model(model, cfg)
    torch.testing.assert_close(pm.base_model.prompt_encoder["default"].embedding.weight, emb[torch.tensor([1, 2, 3])])


def test_generate_excludes_prompt_and_cache_matches_no_cache():
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N))
    kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with_cache = pm.generate(**kw)
    assert with_cache.shape == (2, 6 + 5) and torch.equal(with_cache[:, :6], IDS)
    torch.testing.assert_close(pm.generate(**kw, use_cache=False), with_cache)
    # the prompt changes what is generated; disabled, the base model's generation comes back
    base = tiny_llama().generate(**kw)
    with pm.disable_adapter():
        torch.testing.assert_close(pm.generate(**kw), base)
    assert not torch.equal(with_cache, base)


@pytest.mark.parametrize("kind", ["prompt", "p_tuning_mlp", "p_tuning_lstm"])
def test_save_load_round_trip_and_baked_file(kind, tmp_path):
    cfg = {"prompt": PromptTuningConfig(num_virtual_tokens=N),
           "p_tuning_mlp": PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=16),
           "p_tuning_lstm": PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=8,
                                                encoder_reparameterization_type="LSTM")}[kind]
    pm = get_peft_model(tiny_llama(), cfg)
    out = logits(pm)
    pm.save_pretrained(tmp_path)
    state = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert list(state) == ["prompt_embeddings"] and state["prompt_embeddings"].shape == (N, 32)
    disk = json.load(open(tmp_path / "adapter_config.json"))
    assert disk["peft_type"] == ("PROMPT_TUNING" if kind == "prompt" else "P_TUNING") and disk["inference_mode"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), out, rtol=0, atol=1e-6)
    if kind != "prompt":  # trainable load of a baked file: continues on the plain table, never ignores it
        with pytest.warns(UserWarning, match="baked"):
            again = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
        torch.testing.assert_close(logits(again), out, rtol=0, atol=1e-6)
        assert again.get_nb_trainable_parameters()[0] == N * 32


def test_trainable_counts():
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N))
    assert pm.get_nb_trainable_parameters()[0] == N * 32
    d, e = 32, 16
    pm = get_peft_model(tiny_llama(), PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=e))
    assert pm.get_nb_trainable_parameters()[0] == N * d + (d * e + e) + (e * e + e) + (e * d + d)
    pm = get_peft_model(tiny_bert_cls(), PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"))
    assert pm.get_nb_trainable_parameters()[0] == N * 32 + (32 * 2 + 2)  # + the fresh classifier


@pytest.mark.parametrize("cfg", [PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB"),
                                 PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=32)],
                         ids=["prompt", "p_tuning"])
def test_training_changes_only_prompt_and_lowers_loss(cfg):
    pm = get_peft_model(tiny_llama(), cfg)
    ids = (torch.arange(10).repeat(4, 1) * 7) % V
    losses, changed = train_steps(pm, {"input_ids": ids, "labels": ids}, 25, 5e-2, torch.optim.Adam)
    assert losses[-1] < losses[0] - 0.1
    assert changed and all(n.startswith("base_model.prompt_encoder.default.") for n in changed)


def test_bert_sequence_classification_trains_head_and_prompt(tmp_path):
    pm = get_peft_model(tiny_bert_cls(), PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"))
    tt = torch.zeros_like(IDS)
    out = pm(input_ids=IDS, attention_mask=MASK, token_type_ids=tt, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and out.loss is not None
    pm.save_pretrained(tmp_path)
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    # PEFT's keys for prompt learning: no tuner level, so "base_model.<path>"
    assert keys == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(pm))


def test_errors_and_not_mergeable():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(TargetError, match="input embedding"):
        get_peft_model(Custom(), PromptTuningConfig(num_virtual_tokens=N))
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N))
    with pytest.raises(NotMergeableError, match="nothing to merge"):
        pm.merge_and_unload()
    with pytest.raises(NotImplementedError, match="mixed-adapter"):
        pm(input_ids=IDS, adapter_names=["default", "default"])
    base = pm.unload()  # hook removed: the plain model again
    torch.testing.assert_close(logits(base), logits(tiny_llama()))


# ---- the real peft package, both directions ------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_cfg(kind):
    if kind == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16)


def _ours_cfg(kind):
    if kind == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16)


@pytest.mark.parametrize("kind", ["prompt", "p_tuning"])
def test_peft_saved_loads_in_slimtune(kind, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), _peft_cfg(kind)).eval()
    ref = logits(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(ours), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["prompt", "p_tuning"])
def test_slimtune_saved_loads_in_peft(kind, tmp_path):
    ours = get_peft_model(tiny_llama(), _ours_cfg(kind))
    ref = logits(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), ref, rtol=0, atol=1e-6)
    assert type(theirs.peft_config["default"]).__name__ == type(_peft_cfg(kind)).__name__


def test_bert_classifier_files_move_both_ways(tmp_path):
    theirs = peft.get_peft_model(tiny_bert_cls(), peft.PromptTuningConfig(task_type="SEQ_CLS",
                                                                          num_virtual_tokens=N)).eval()
    theirs.save_pretrained(tmp_path / "p")
    ours = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "p")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)
    ours.save_pretrained(tmp_path / "s")
    back = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "s").eval()
    torch.testing.assert_close(logits(back), logits(theirs), rtol=0, atol=1e-6)


def test_several_adapters_switch_and_delete():
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N))
    a = logits(pm)
    pm.add_adapter("b", PromptTuningConfig(num_virtual_tokens=N + 2))
    torch.testing.assert_close(logits(pm), a)  # the first stays active
    assert pm.get_nb_trainable_parameters()[0] == N * 32  # only the active adapter trains
    pm.set_adapter("b")
    assert pm(input_ids=IDS).logits.shape == (2, N + 2 + 6, V)
    assert pm.get_nb_trainable_parameters()[0] == (N + 2) * 32
    with pytest.raises(ValueError, match="one adapter is active"):
        pm.set_adapter(["default", "b"])
    pm.delete_adapter("b")
    torch.testing.assert_close(logits(pm), a)


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for gc in (False, True):
        model = tiny_llama()
        if gc:
            enable_activation_checkpointing(model, use_reentrant=False)
        pm = get_peft_model(model, PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=8))
        pm.train()
        pm(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100)).loss.backward()
        grads.append([p.grad for p in pm.parameters() if p.requires_grad])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)
