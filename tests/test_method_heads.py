"""Attention-head fine-tuning: only q/k/v/o slices of chosen heads train; only they are saved."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_gpt2, tiny_llama

from slimtune import ConfigError, PeftModel, get_peft_model, make_config
from slimtune.inject import AdapterLayer, ModulesToSaveWrapper, adapter_layers
from slimtune.methods.heads import HeadsConfig, head_importance
from slimtune.targeting import TargetError

CASES = {"llama": (tiny_llama, {}), "gpt2": (tiny_gpt2, {}), "bert": (tiny_bert_cls, {"task_type": "SEQ_CLS"})}


def randomize(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in pm.get_adapter_state_dict().values():
            v.add_(0.3 * torch.randn(v.shape, generator=g))


def test_count_llama_gqa():
    assert isinstance(make_config("heads", heads=[0]), HeadsConfig)
    pm = get_peft_model(tiny_llama(), HeadsConfig(heads=[0, 1]))  # 4 heads, 2 kv heads, head_dim 8, hidden 32
    # q: 2 heads x 8 rows x 32; k, v: kv head 0 only (heads 0, 1 share it) 8 x 32 each; o: 32 x 16 columns
    per_layer = 16 * 32 + 2 * 8 * 32 + 32 * 16
    assert pm.get_nb_trainable_parameters()[0] == 2 * per_layer
    pm2 = get_peft_model(tiny_llama(), HeadsConfig(heads={1: [3]}))
    assert pm2.get_nb_trainable_parameters()[0] == 8 * 32 + 2 * 8 * 32 + 32 * 8
    assert pm2.peft_config["default"].to_dict()["heads"] == {"1": [3]}


@pytest.mark.parametrize("case", CASES)
def test_merge_and_roundtrip(case, ids, tmp_path):
    make, kw = CASES[case]
    pm = get_peft_model(make(), HeadsConfig(heads={0: [1], 1: [0, 3]}, **kw))
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(make(), ids))
    randomize(pm)
    with torch.no_grad():
        ref = logits(pm, ids)
        assert (ref - logits(make(), ids)).abs().max() > 1e-3
        pm.merge_adapter()
        torch.testing.assert_close(logits(pm, ids), ref, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
        torch.testing.assert_close(logits(pm, ids), ref, atol=1e-5, rtol=1e-5)
    pm.save_pretrained(tmp_path)
    assert all(k.endswith(".heads_delta") or "classifier" in k for k in pm.get_adapter_state_dict())
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids), ref, atol=0, rtol=0)
        plain = loaded.merge_and_unload()
        assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in plain.modules())
        torch.testing.assert_close(logits(plain, ids), ref, atol=1e-5, rtol=1e-5)


def test_only_chosen_slices_change(ids):
    pm = get_peft_model(tiny_llama(), HeadsConfig(heads={1: [2]}))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    base, plain = tiny_llama(), pm.merge_and_unload()
    for name, p in plain.named_parameters():
        diff = (p - base.get_parameter(name)).abs() > 0
        rows, cols = diff.nonzero(as_tuple=True) if diff.dim() == 2 else (diff.nonzero().flatten(), None)
        if "layers.1.self_attn" not in name:
            assert not diff.any(), name
        elif name.endswith("q_proj.weight"):
            assert diff.any() and set(rows.tolist()) <= set(range(16, 24)), name  # head 2
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            assert diff.any() and set(rows.tolist()) <= set(range(8, 16)), name  # kv head 1
        elif name.endswith("o_proj.weight"):
            assert diff.any() and set(cols.tolist()) <= set(range(16, 24)), name


def test_top_k_by_importance_and_errors(ids):
    model = tiny_llama()
    scores = head_importance(model, [{"input_ids": ids, "labels": ids}])
    assert set(scores) == {0, 1} and scores[0].shape == (4,)
    pm = get_peft_model(model, HeadsConfig(top_k=1, scores=scores))
    assert pm.peft_config["default"].heads == {i: [int(s.argmax())] for i, s in scores.items()}
    with pytest.raises(ConfigError, match="head_importance"):
        get_peft_model(tiny_llama(), make_config("heads", top_k=2))
    with pytest.raises(ConfigError, match="choose the heads"):
        make_config("heads")
    with pytest.raises(TargetError, match="head 7 does not exist"):
        get_peft_model(tiny_llama(), HeadsConfig(heads=[7]))
    from conftest import tiny_t5
    with pytest.raises(TargetError, match="attention_modules"):
        get_peft_model(tiny_t5(), HeadsConfig(heads=[0]))
