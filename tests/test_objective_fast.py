"""The preference objectives' fast path (objectives/shared.py): one row per pair, the prompt
computed once, equals the padded two-rows-per-pair layout (log-probs and gradients), in fp32 and
under bf16 autocast; the reference log-probs a row keeps are the ones the adapter-off model gives."""
import random

import pytest
import torch
from conftest import VOCAB

import slimtune
from slimtune.train.config import TrainConfig
from slimtune.train.objectives import OBJECTIVES, shared
from slimtune.train.objectives.pairs import PairObjective


def llama(attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def examples(n, seed=0):
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, VOCAB) for _ in range(k)]  # noqa: E731
    return [{"prompt_ids": ids(rng.randint(1, 12)), "chosen_ids": ids(rng.randint(1, 6)),
             "rejected_ids": ids(rng.randint(1, 6))} for _ in range(n)]


def peft_model(attn="sdpa"):
    pm = slimtune.get_peft_model(llama(attn), slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", range(3))
def test_one_row_per_pair_equals_two_padded_rows(attn, seed):
    pm = peft_model(attn)
    assert shared.status(pm)[0]
    ex = examples(5, seed)
    padded = PairObjective._padded(ex, 0)
    one = shared.collate(ex, 0)
    assert one["input_ids"].shape[0] == 5 and padded["input_ids"].shape[0] == 10
    a = PairObjective.seq_logps(pm, padded)
    b = PairObjective.seq_logps(pm, one)
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert torch.equal(PairObjective.lengths(padded), PairObjective.lengths(one))
    params = [p for p in pm.parameters() if p.requires_grad]
    ga = torch.autograd.grad(a.sum(), params)
    gb = torch.autograd.grad(PairObjective.seq_logps(pm, one).sum(), params)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5)


def test_one_row_per_pair_under_bf16_autocast():
    pm = peft_model()
    ex = examples(4, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = PairObjective.seq_logps(pm, PairObjective._padded(ex, 0))
        b = PairObjective.seq_logps(pm, shared.collate(ex, 0))
    assert a.dtype == b.dtype == torch.float32
    assert torch.allclose(a, b, rtol=2e-2, atol=0.1), (a, b)


def test_prompt_learning_keeps_the_padded_layout():
    pm = slimtune.get_peft_model(llama(), slimtune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ok, why = shared.status(pm)
    assert not ok and "prompt/prefix tuning" in why


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo"])
def test_kept_reference_equals_the_adapter_off_model(objective):
    """cache_ref: the first loss writes each row's reference into the row; the next batch of the same
    rows reads it instead of running the reference, and the loss is unchanged."""
    pm = peft_model()
    obj = OBJECTIVES[objective](TrainConfig(objective=objective))
    obj.use_shared_prompt(pm)
    obj.cache_ref = True
    ex = examples(4, 3)
    b1 = obj.collate(ex, 0)
    l1, _ = obj.loss(pm, b1)
    if not obj.needs_reference:
        assert all("ref_logps" not in e for e in ex)
        return
    assert all(len(e["ref_logps"]) == 2 for e in ex)
    b2 = obj.collate(ex, 0)
    assert "ref_logps" in b2 and "rows" not in b2
    with torch.no_grad(), pm.disable_adapter():
        want = PairObjective.seq_logps(pm, PairObjective._padded(ex, 0))
    assert torch.allclose(b2["ref_logps"], want, atol=1e-5)
    l2, _ = obj.loss(pm, b2)
    assert torch.allclose(l1, l2, atol=1e-6)


def test_frozen_prefix_once_for_policy_and_reference():
    """Adapters on the top block only: DPO's reference runs every block and keeps block 1's input,
    the policy starts there; loss, log-probs and gradients equal running every block twice."""
    def top_only():
        pm = slimtune.get_peft_model(llama(), slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                  layers_to_transform=[1]))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return pm

    ex = examples(5, 11)
    out = []
    for share in (True, False):
        pm = top_only()
        obj = OBJECTIVES["dpo"](TrainConfig(objective="dpo"))
        obj.use_shared_prompt(pm)
        assert obj.prefix.on and obj.prefix.k == 1
        if not share:
            obj.prefix.k = 0
        loss, st = obj.loss(pm, obj.collate(ex, 0))
        loss.backward()
        grads = [p.grad.clone() for p in pm.parameters() if p.requires_grad]
        out.append((loss.detach(), st["logps_chosen"], st["rewards_rejected"], grads))
    (l1, c1, r1, g1), (l2, c2, r2, g2) = out
    assert torch.allclose(l1, l2, atol=1e-6) and torch.allclose(c1, c2, atol=1e-5) and torch.allclose(r1, r2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6)


def test_frozen_prefix_that_disagrees_turns_itself_off():
    """A decoder whose block input is not what the cut forward gives (checked once) runs every block."""
    pm = slimtune.get_peft_model(llama(), slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                              layers_to_transform=[1]))
    for p in pm.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    msgs = []
    obj = OBJECTIVES["dpo"](TrainConfig(objective="dpo"))
    obj.use_shared_prompt(pm, msgs.append)
    batch = obj.collate(examples(3, 2), 0)
    with torch.no_grad(), pm.disable_adapter():
        _, h = obj.prefix.reference_with_input(pm, batch)
    got = obj.prefix.policy_from(pm, batch, h * 2)  # a wrong block input, as a rescaling model would give
    assert obj.prefix.k == 0 and "runs every block" in msgs[0]
    assert torch.allclose(got, PairObjective.seq_logps(pm, batch), atol=1e-5)
