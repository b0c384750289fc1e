"""Prefix tuning through transformers' cache API: masks, generate, checkpointing, files both ways with peft."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
from properties import greedy_by_forward, train_steps
from safetensors.torch import load_file

from slimtune import PeftModel, get_peft_model
from slimtune.compat import enable_activation_checkpointing
from slimtune.methods.bottleneck import NotMergeableError
from slimtune.methods.prefix import PrefixTuningConfig
from slimtune.targeting import TargetError

V = 64
N = 4
L = 2
KV_DIM = 16  # GQA: head_dim 8 x 2 key/value heads (PEFT #1901)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()


def tiny_bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=L, num_attention_heads=4, num_labels=2)).eval()


IDS = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(IDS)
MASK[0, :2] = 0  # row 0 left-padded


def logits(m, ids=IDS, mask=MASK):
    return m(input_ids=ids, attention_mask=mask).logits


def test_config_filled_from_model_with_gqa():
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N))
    cfg = pm.peft_config["default"]
    assert (cfg.num_layers, cfg.token_dim, cfg.num_attention_heads, cfg.num_transformer_submodules) == (L, KV_DIM, 2, 1)
    assert pm.get_nb_trainable_parameters()[0] == N * L * 2 * KV_DIM
    e = 8
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True,
                                                         encoder_hidden_size=e))
    d = KV_DIM
    assert pm.get_nb_trainable_parameters()[0] == N * d + (d * e + e) + (e * L * 2 * d + L * 2 * d)


def test_prefix_reaches_every_layer_and_padding_is_masked():
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N))
    out = logits(pm)
    assert out.shape == (2, 6, V)  # no extra positions in the output
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm), logits(tiny_llama()))
    assert not torch.allclose(out, logits(tiny_llama()))
    # a padded row gives the same logits on its real tokens as the same row unpadded:
    # left padding with position ids (as generate passes them), right padding without
    row = IDS[0:1, 2:]
    alone = logits(pm, row, torch.ones_like(row))[0]
    pos = (MASK.cumsum(-1) - 1).clamp(min=0)
    left = pm(input_ids=IDS, attention_mask=MASK, position_ids=pos).logits
    torch.testing.assert_close(left[0, 2:], alone, atol=1e-5, rtol=1e-5)
    right = logits(pm, torch.cat([row, IDS[0:1, :2]], 1), MASK.flip(-1)[0:1])
    torch.testing.assert_close(right[0, :4], alone, atol=1e-5, rtol=1e-5)


def test_batched_generate_with_cache_matches_without():
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N))
    kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    a, b = pm.generate(**kw), pm.generate(**kw, use_cache=False)
    assert a.sequences.shape == (2, 11) and torch.equal(a.sequences[:, :6], IDS)
    torch.testing.assert_close(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # the padded row generates what it generates alone
    single = pm.generate(input_ids=IDS[0:1, 2:], max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(single[0, 4:], a.sequences[0, 6:])


def test_gradient_checkpointing_keeps_the_prefix():
    grads, losses = [], []
    labels = IDS.masked_fill(MASK == 0, -100)
    for gc in (False, True):
        model = tiny_llama()
        if gc:
            enable_activation_checkpointing(model, use_reentrant=False)
        pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True,
                                                      encoder_hidden_size=8))
        pm.train()
        loss = pm(input_ids=IDS, attention_mask=MASK, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in pm.parameters() if p.requires_grad])
    torch.testing.assert_close(losses[0], losses[1])
    model = tiny_llama()
    enable_activation_checkpointing(model, use_reentrant=True)
    pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=N)).train()
    with pytest.raises(ValueError, match="use_reentrant"):
        pm(input_ids=IDS, labels=IDS)
    pm.eval()
    pm(input_ids=IDS)  # the flag set for that failed step is not left behind
    assert not any("_can_checkpoint_with_cache" in m.__dict__ for m in model.modules())
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_save_bakes_prefixes_and_round_trips(projection, tmp_path):
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=projection,
                                                         encoder_hidden_size=8))
    out = logits(pm)
    pm.save_pretrained(tmp_path)
    state = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert list(state) == ["prompt_embeddings"] and state["prompt_embeddings"].shape == (N, L * 2 * KV_DIM)
    disk = json.load(open(tmp_path / "adapter_config.json"))
    assert disk["peft_type"] == "PREFIX_TUNING" and disk["inference_mode"] and disk["prefix_projection"] == projection
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), out, rtol=0, atol=1e-6)
    if projection:  # trainable load continues on the baked table (PEFT refuses this case)
        with pytest.warns(UserWarning, match="baked"):
            again = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
        torch.testing.assert_close(logits(again), out, rtol=0, atol=1e-6)
        assert again.get_nb_trainable_parameters()[0] == N * L * 2 * KV_DIM


def test_training_changes_only_prefix_and_lowers_loss():
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True,
                                                         encoder_hidden_size=16))
    ids = (torch.arange(10).repeat(4, 1) * 7) % V
    losses, changed = train_steps(pm, {"input_ids": ids, "labels": ids}, 25, 1e-2, torch.optim.Adam)
    assert losses[-1] < losses[0] - 0.1
    assert changed and all(n.startswith("base_model.prompt_encoder.default.") for n in changed)


def test_bert_classifier_through_its_backbone(tmp_path):
    pm = get_peft_model(tiny_bert_cls(), PrefixTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"))
    assert pm.get_nb_trainable_parameters()[0] == N * L * 2 * 32 + (32 * 2 + 2)
    base = logits(tiny_bert_cls())
    out = logits(pm)
    assert out.shape == (2, 2) and not torch.allclose(out, base)
    pm.train()
    pm(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1])).loss.backward()
    assert pm.base_model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    pm.eval()
    pm.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)), out)


def test_model_without_cache_is_one_clear_error():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(TargetError, match="takes no KV cache"):
        get_peft_model(Custom(), PrefixTuningConfig(num_virtual_tokens=N))
    from transformers import T5Config, T5ForConditionalGeneration

    with pytest.raises(TargetError, match="encoder-decoder"):
        get_peft_model(T5ForConditionalGeneration(T5Config(num_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                                                           vocab_size=V)), PrefixTuningConfig())
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N))
    with pytest.raises(NotMergeableError):
        pm.merge_adapter()
    base = pm.unload()  # hooks removed: the plain model again
    assert not base._forward_pre_hooks and not base._forward_hooks
    torch.testing.assert_close(logits(base), logits(tiny_llama()))


# ---- the real peft package, both directions ------------------------------------------------
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("projection", [False, True])
def test_peft_saved_loads_in_slimtune(projection, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection, encoder_hidden_size=8)).eval()
    ref = logits(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(ours), ref, rtol=0, atol=1e-6)
    kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # The reference is PEFT's forward, one token at a time: peft 0.21.2's own generate with prefix
    # tuning looks for the cache under `past_key_values`, so on transformers >= 5.24 (which passes
    # `cache`) it re-inserts the prefix at every step and its cached output differs from its own
    # uncached one. Ours must equal the uncached reference, cached or not.
    ref_ids = greedy_by_forward(theirs, IDS, MASK, 4)
    torch.testing.assert_close(ours.generate(**kw), ref_ids)
    torch.testing.assert_close(ours.generate(**kw, use_cache=False), ref_ids)


@pytest.mark.parametrize("projection", [False, True])
def test_slimtune_saved_loads_in_peft(projection, tmp_path):
    ours = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                           prefix_projection=projection, encoder_hidden_size=8))
    ref = logits(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), ref, rtol=0, atol=1e-6)


def test_bert_classifier_files_move_both_ways(tmp_path):
    theirs = peft.get_peft_model(tiny_bert_cls(), peft.PrefixTuningConfig(task_type="SEQ_CLS",
                                                                          num_virtual_tokens=N)).eval()
    theirs.save_pretrained(tmp_path / "p")
    ours = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "p")
    table = theirs.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(ours.base_model.prompt_encoder["default"].table(), table, rtol=0, atol=0)
    ours.save_pretrained(tmp_path / "s")
    back = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "s").eval()
    torch.testing.assert_close(back.prompt_encoder["default"].embedding.weight, table, rtol=0, atol=0)
    if not _peft_runs_prefix_on(theirs):
        # peft 0.21.2 finds a cache by the name `past_key_values` in BertModel.forward; transformers
        # >= 5.24 calls it `cache`, so peft refuses the model it built. The files still move both ways
        # (checked above); the outputs are compared wherever peft can compute its own.
        return
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(back), logits(theirs), rtol=0, atol=1e-6)


def _peft_runs_prefix_on(peft_model) -> bool:
    """Whether the installed peft can run prefix tuning on this model (it needs `past_key_values` by name)."""
    import inspect

    model = peft_model.get_base_model()
    backbone = getattr(model, model.base_model_prefix, model)
    return any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone))


def _family(name):
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, bos_token_id=0,
                                                eos_token_id=0)).eval()
    cls = {"mistral": (tf.MistralConfig, tf.MistralForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[name]
    return cls[1](cls[0](vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()


@pytest.mark.parametrize("name", ["gpt2", "mistral", "qwen2"])
def test_other_decoder_families_forward_and_generate(name):
    pm = get_peft_model(_family(name), PrefixTuningConfig(num_virtual_tokens=N))
    assert not torch.allclose(logits(pm), logits(_family(name)))
    kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(pm.generate(**kw), pm.generate(**kw, use_cache=False))


def test_no_deprecation_warnings_from_our_calls_and_either_cache_name():
    """The cache goes in under the name the model's forward takes (`cache` from transformers 5.24,
    `past_key_values` before), checkpointing through its current name: nothing of ours warns.
    A caller's cache under either name reaches the model once, under the model's name."""
    import warnings

    from transformers import DynamicCache

    from slimtune.compat import cache_arg

    model = tiny_llama()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        enable_activation_checkpointing(model, use_reentrant=False)
        pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=N)).train()
        pm(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
        pm.eval()
        out = pm.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=3, do_sample=False, pad_token_id=0)
        first = pm(input_ids=IDS, attention_mask=MASK, use_cache=True)
    ours = [str(w.message) for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not ours, ours
    assert out.shape == (2, 9)
    name = cache_arg(model)
    assert name in ("cache", "past_key_values")
    cache = getattr(first, name if name == "cache" else "past_key_values", None) or first.past_key_values
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == N + 6
    step = IDS[:, -1:]
    mask = torch.cat([MASK, torch.ones_like(step)], 1)
    for given in ("cache", "past_key_values"):  # the caller's name, whatever the model's
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            again = pm(input_ids=IDS, attention_mask=MASK, use_cache=True)
            c = getattr(again, "cache", None) or again.past_key_values
            nxt = pm(input_ids=step, attention_mask=mask, **{given: c}).logits
        assert not [w for w in seen if issubclass(w.category, FutureWarning) and "deprecated" in str(w.message)]
        full = pm(input_ids=torch.cat([IDS, step], 1), attention_mask=mask).logits[:, -1:]
        torch.testing.assert_close(nxt, full, atol=1e-5, rtol=1e-5)
