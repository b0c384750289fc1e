"""KTO on the one-row layout (objectives/shared.py: collate_unpaired, policy_and_reference): each
prompt once with its completion and its mismatched KL completion beside it, one policy and one
reference forward, equals TRL's padded layout (four forwards): loss, KL estimate, rewards, log-probs
and gradients, with the adapters on every block and with the frozen prefix shared; sdpa and eager."""
import random

import pytest
import torch
from conftest import VOCAB

import slimtune
from slimtune.train.config import TrainConfig
from slimtune.train.objectives import shared
from slimtune.train.objectives.kto import KTO


def model(attn="sdpa", layers=None, seed=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
                      attn_implementation=attn)
    pm = slimtune.get_peft_model(LlamaForCausalLM(cfg), slimtune.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=layers))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def rows(n, seed):
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, VOCAB) for _ in range(k)]  # noqa: E731
    return [{"prompt_ids": ids(rng.randint(1, 12)), "completion_ids": ids(rng.randint(1, 6)), "label": rng.random() < 0.6}
            for _ in range(n)]


def run(pm, kto, ex, before=None):
    kto.ref_model = pm
    batch = kto.collate(ex, 0, before=before)
    loss, st = kto.loss(pm, batch)
    params = [p for p in pm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return batch, loss.detach(), st, grads


# w: the adapters' random init, one whose KL estimate z is > 0 on these rows (else it is clamped to 0
# and z's path would go unchecked)
@pytest.mark.parametrize("attn,layers,seed,w", [("sdpa", None, 0, 1), ("eager", None, 1, 3), ("sdpa", [1], 2, 9),
                                                ("eager", [1], 3, 2)])
def test_one_row_kto_equals_the_padded_layout(attn, layers, seed, w):
    ex = rows(6, seed)
    before = rows(1, seed + 100)[0] if seed % 2 else None  # a rank's share: its first KL row from the previous rank
    out = []
    for fast in (False, True):
        pm = model(attn, layers, w)
        kto = KTO(TrainConfig(objective="kto", beta=0.5, undesirable_weight=1.3))
        if fast:
            on, why = kto.use_shared_prompt(pm)
            assert on and "mismatched completion beside it" in why
            assert kto.prefix.on == (layers == [1]) and (kto.prefix.k == 1 or layers is None)
        out.append(run(pm, kto, ex, before))
    (b0, l0, s0, g0), (b1, l1, s1, g1) = out
    assert "pair_mask" in b1 and "pair_mask" not in b0 and b1["input_ids"].shape[0] == 6 and b0["input_ids"].shape[0] == 6
    assert torch.allclose(l0, l1, atol=1e-6), (l0, l1)
    assert float(s0["kl"]) > 0
    for k in s0:
        assert torch.allclose(s0[k], s1[k], atol=1e-5), (k, s0[k], s1[k])
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert any(a.abs().max() > 0 for a in g0)


def test_one_row_kto_under_bf16_autocast():
    ex = rows(4, 9)
    res = []
    for fast in (False, True):
        pm = model()
        kto = KTO(TrainConfig(objective="kto"))
        if fast:
            assert kto.use_shared_prompt(pm)[0]
        kto.ref_model = pm
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, st = kto.loss(pm, kto.collate(ex, 0))
        res.append((loss, st["logps_chosen"]))
    assert torch.allclose(res[0][0], res[1][0], atol=2e-2) and torch.allclose(res[0][1], res[1][1], rtol=2e-2, atol=0.2)


def test_prompt_learning_keeps_kto_on_the_padded_layout():
    from transformers import LlamaConfig, LlamaForCausalLM

    pm = slimtune.get_peft_model(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                              num_attention_heads=4, vocab_size=VOCAB)),
                                 slimtune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    kto = KTO(TrainConfig(objective="kto"))
    on, why = kto.use_shared_prompt(pm)
    assert not on and "prompt/prefix tuning" in why and "pair_mask" not in kto.collate(rows(3, 0), 0)
    assert shared.status(pm)[0] is False
