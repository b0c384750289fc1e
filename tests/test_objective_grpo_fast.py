"""GRPO's fast layout (objectives/shared.py group_collate): a prompt and its G sampled completions
in one row under a 4-D mask give the G-padded-rows layout's per-token log-probs, loss and gradients
(fp32, sdpa and eager; bf16 autocast to its rounding), also with beta > 0 (the adapter-off reference)."""
import random

import pytest
import torch
from conftest import VOCAB
from test_objective_fast import peft_model  # the same tiny Llama + LoRA (r 4 on q/v, weights drawn)

from slimtune.train.config import TrainConfig
from slimtune.train.objectives import shared
from slimtune.train.objectives.grpo import GRPO, group_advantages, policy_loss


class Tok:  # what GRPO.logps reads of the tokenizer
    pad_token_id = 0


def group_batch(n, G, C, seed):
    """n left-padded prompts of 1-12 tokens and n*G completions of C columns whose mask is a prefix
    of 1..C tokens (the tokens after it are whatever generate left there)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    P = max(len(p) for p in prompts)
    ids = torch.zeros((n, P), dtype=torch.long)
    att = torch.zeros((n, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], att[i, P - len(p):] = torch.tensor(p), 1
    comp = torch.tensor([[rng.randrange(3, VOCAB) for _ in range(C)] for _ in range(n * G)])
    lens = torch.tensor([rng.randint(1, C) for _ in range(n * G)])
    cmask = (torch.arange(C).unsqueeze(0) < lens.unsqueeze(1)).long()
    batch = {"input_ids": ids, "attention_mask": att, "rows": [{"prompt_ids": p} for p in prompts]}
    return batch, comp, cmask


def objective(G, beta, on):
    obj = GRPO(TrainConfig(objective="grpo", num_generations=G, beta=beta))
    obj.tok, obj.shared = Tok(), on
    return obj


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("seed,G,beta", [(0, 4, 0.0), (1, 3, 0.04), (2, 6, 0.0), (3, 2, 0.1)])
def test_one_row_per_group_equals_g_padded_rows(attn, seed, G, beta):
    pm = peft_model(attn)
    assert shared.status(pm)[0]
    batch, comp, cmask = group_batch(3, G, 5, seed)
    adv = group_advantages(torch.randn(3 * G, generator=torch.Generator().manual_seed(seed)), G)
    params = [p for p in pm.parameters() if p.requires_grad]
    out = {}
    for on in (False, True):
        obj = objective(G, beta, on)
        logps, ref = obj.logps(pm, pm, batch, comp, cmask)
        loss, kl = policy_loss(logps, logps.detach(), adv, cmask, beta, ref)
        out[on] = (logps, ref, loss, kl, torch.autograd.grad(loss, params))
    (a, ra, la, ka, ga), (b, rb, lb, kb, gb) = out[False], out[True]
    assert a.shape == b.shape == comp.shape
    assert torch.allclose(a * cmask, b, atol=1e-5), (a, b)
    assert torch.equal(b * (1 - cmask), torch.zeros_like(b))  # nothing outside the completions
    if beta:
        assert torch.allclose(ra * cmask, rb, atol=1e-5) and torch.allclose(ka, kb, atol=1e-5)
    assert torch.allclose(la, lb, atol=1e-5), (la, lb)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5)


def test_group_row_layout():
    """Prompt once, then each completion's masked tokens at positions P.. (one row per prompt)."""
    comp = torch.tensor([[5, 6, 7], [8, 9, 9], [10, 11, 12], [13, 14, 15]])
    cmask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    b = shared.group_collate([[3, 4], [20, 21, 22]], comp, cmask, 2, 0)
    assert b["input_ids"].shape == (2, 7)
    assert b["input_ids"][0].tolist() == [3, 4, 5, 6, 8, 0, 0]
    assert b["input_ids"][1].tolist() == [20, 21, 22, 10, 11, 12, 13]
    assert b["position_ids"][0, :5].tolist() == [0, 1, 2, 3, 2]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 3]
    m = b["pair_mask"][1, 0]
    assert not m[6, 3:6].any() and m[6, :3].all() and m[6, 6]  # the second completion skips the first
    assert b["tgt_ids"].tolist() == [5, 6, 8, 10, 11, 12, 13]
    # predicted at: prompt end (1), 2; prompt end (1); row 1: prompt end (2), 3, 4; prompt end (2)
    assert b["tgt_pos"].tolist() == [1, 2, 1, 7 + 2, 7 + 3, 7 + 4, 7 + 2]
    assert b["tgt_flat"].tolist() == [0, 1, 3, 6, 7, 8, 9]


def test_one_row_per_group_under_bf16_autocast():
    pm = peft_model()
    batch, comp, cmask = group_batch(3, 4, 5, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = objective(4, 0.0, False).logps(pm, pm, batch, comp, cmask)
        b, _ = objective(4, 0.0, True).logps(pm, pm, batch, comp, cmask)
    assert a.dtype == b.dtype == torch.float32
    assert torch.allclose(a * cmask, b, rtol=2e-2, atol=0.1), (a, b)


class GenTok(Tok):
    eos_token_id = 2


@pytest.mark.parametrize("seed", range(2))
def test_prompts_prefilled_once_sample_what_generate_samples(seed):
    """sample(): the prompts' KV cache computed once and repeated per completion gives the tokens
    generate gives running every prompt G times (greedy: deterministic)."""
    pm = peft_model().eval()
    batch, _, _ = group_batch(3, 1, 1, seed)
    obj = objective(4, 0.0, True)
    obj.tok = GenTok()
    obj.t.max_completion_length = 6
    seen = []  # the token counts the embedding sees: the prompts once, then one token per step
    hook = pm.get_base_model().get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    comp, mask = obj.sample(pm, batch, 4, greedy=True)
    hook.remove()
    P = batch["input_ids"].shape[1]
    assert seen[0] == (3, P - 1) and all(s == (12, 1) for s in seen[1:]), seen
    with torch.no_grad():
        ref = pm.generate(input_ids=batch["input_ids"].repeat_interleave(4, 0), max_new_tokens=6, do_sample=False,
                          attention_mask=batch["attention_mask"].repeat_interleave(4, 0), pad_token_id=0)
    assert comp.shape == (12, 6)
    assert torch.equal(comp, ref[:, batch["input_ids"].shape[1]:])
