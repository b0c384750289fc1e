"""Sampling options per row in tensor ops (serve/sampling.py): top_k, min_p, repetition / frequency /
presence penalties, logit_bias. The ops against their definitions, then the engine with rows of
different options in one mixed batch, each equal to HF `generate` (repetition_penalty,
sequence_bias) or to a plain reference loop (frequency / presence) for its own adapter."""
from __future__ import annotations

import copy

import pytest
import torch

from serve_support import _base, build, load_base
from slimtune.serve import Engine, GenRequest, Registry, ServeConfig
from slimtune.serve.sampling import cat_rows, next_tokens, record, row_state

EOS = 102


def _t(reqs, vocab):
    return row_state(reqs, vocab, torch.device("cpu"))


def test_each_option_as_defined():
    V = 6
    lg = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05, 0.0 + 1e-9]])).expand(200, V).contiguous()
    hot = lambda **kw: _t([GenRequest([1], temperature=1.0, **kw)] * 200, V)  # noqa: E731
    assert set(next_tokens(lg, hot(top_k=2), [None] * 200).tolist()) == {0, 1}
    assert set(next_tokens(lg, hot(top_k=1), [None] * 200).tolist()) == {0}
    assert set(next_tokens(lg, hot(min_p=0.5), [None] * 200).tolist()) == {0, 1}  # p >= 0.2
    assert set(next_tokens(lg, hot(min_p=0.3), [None] * 200).tolist()) == {0, 1, 2}  # p >= 0.12
    assert set(next_tokens(lg, hot(top_k=3, top_p=0.5), [None] * 200).tolist()) == {0, 1}
    greedy = lambda prompt=(1,), **kw: _t([GenRequest(list(prompt), **kw)], V)  # noqa: E731
    one = lg[:1]
    assert next_tokens(one, greedy(), None).tolist() == [0]
    assert next_tokens(one, greedy(logit_bias={4: 100.0}), None).tolist() == [4]
    assert next_tokens(one, greedy(logit_bias={0: -100.0}), None).tolist() == [1]
    # repetition_penalty: token 0 is in the prompt; its logit log(0.4) < 0 is multiplied by 2 -> below log(0.3)
    assert next_tokens(one, greedy(prompt=[0], repetition_penalty=2.0), None).tolist() == [1]
    assert next_tokens(one, greedy(prompt=[5], repetition_penalty=2.0), None).tolist() == [0]
    # frequency / presence count generated tokens only
    t = greedy(prompt=[0], frequency_penalty=0.5)
    assert next_tokens(one, t, None).tolist() == [0]  # the prompt does not count
    record(t, torch.tensor([0]))
    assert next_tokens(one, t, None).tolist() == [1]  # log .4 - .5 * 1 < log .3
    t = greedy(prompt=[1], presence_penalty=0.1)
    record(t, torch.tensor([0]))
    record(t, torch.tensor([0]))
    assert next_tokens(one, t, None).tolist() == [0]  # presence: 0.1 once, not per occurrence (.4 e^-.1 > .3)


def test_rows_with_and_without_state_concatenate_neutrally():
    V = 8
    plain = _t([GenRequest([1])], V)
    biased = _t([GenRequest([1], logit_bias={3: 50.0}), GenRequest([2], presence_penalty=1.0)], V)
    both = cat_rows(plain, biased)
    assert both["bias"].shape == (3, V) and both["bias"][0].abs().sum() == 0 and both["counts"].shape == (3, V)
    lg = torch.arange(V, dtype=torch.float).expand(3, V)
    assert next_tokens(lg, both, None).tolist() == [7, 3, 7]  # only row 1 has the bias
    lg2 = torch.zeros(3, V)
    assert next_tokens(lg2, both, None).tolist() == [0, 3, 0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("serve_sampling"), ["lora-a", "lora-b"])


def _hf(base, adapter, prompt, k, **kw):
    from slimtune import PeftModel

    model = copy.deepcopy(_base(str(base)))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, do_sample=False,
                             pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def _reference(base, adapter, prompt, k, freq, pres):
    """Greedy with OpenAI's frequency / presence penalties, one full forward per token."""
    from slimtune import PeftModel

    model = copy.deepcopy(_base(str(base)))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(k):
            lg = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=lg.shape[0]).float()
            lg = lg - freq * counts - pres * (counts > 0).float()
            nxt = int(lg.argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == EOS:
                break
    return out


def test_mixed_batch_rows_each_get_their_own_options(world):
    base, ads = world
    model, _ = load_base(base)
    reg = Registry(model, "tiny")
    for n in ("lora-a", "lora-b"):
        reg.add(n, str(ads[n]))
    eng = Engine(reg, ServeConfig(), [EOS], 0).start()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1000, 20000, (5 + i,), generator=g).tolist() for i in range(5)]
    k = 8
    try:
        jobs = [
            (GenRequest(prompts[0], "lora-a", k, repetition_penalty=1.5), ("hf", "lora-a", {"repetition_penalty": 1.5})),
            (GenRequest(prompts[1], "lora-b", k, logit_bias={2000: 8.0}),
             ("hf", "lora-b", {"sequence_bias": {(2000,): 8.0}})),
            (GenRequest(prompts[2], "lora-a", k), ("hf", "lora-a", {})),
            (GenRequest(prompts[3], "lora-b", k, frequency_penalty=1.0, presence_penalty=0.5),
             ("ref", "lora-b", (1.0, 0.5))),
            (GenRequest(prompts[4], max_tokens=k, presence_penalty=2.0), ("ref", None, (0.0, 2.0))),
        ]
        handles = [eng.submit(req) for req, _ in jobs]  # one step admits them all: one mixed batch
        for (req, (kind, name, kw)), h in zip(jobs, handles):
            got = h.result(60)[0]
            adapter = ads[name] if name else None
            if kind == "hf":
                ref = _hf(base, adapter, req.prompt, k, **kw)
            else:
                ref = _reference(base, adapter, req.prompt, k, *kw)
            assert got == ref, (req, got, ref)
    finally:
        eng.stop()
