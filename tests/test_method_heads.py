"""Attention-head fine-tuning: only q/k/v/o slices of chosen heads train; only they are saved."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_gpt2, tiny_llama
from properties import check_merge_and_round_trip, perturb_adapter, train_lm_steps

from slimtune import ConfigError, get_peft_model, make_config
from slimtune.methods.heads import HeadsConfig, head_importance
from slimtune.targeting import TargetError

CASES = {"llama": (tiny_llama, {}), "gpt2": (tiny_gpt2, {}), "bert": (tiny_bert_cls, {"task_type": "SEQ_CLS"})}


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
    perturb_adapter(pm)
    check_merge_and_round_trip(pm, make, ids, tmp_path)
    assert all(k.endswith(".heads_delta") or "classifier" in k for k in pm.get_adapter_state_dict())

def test_only_chosen_slices_change(ids):
    pm = get_peft_model(tiny_llama(), HeadsConfig(heads={1: [2]}))
    losses, _ = train_lm_steps(pm, ids)
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
