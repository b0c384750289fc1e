"""Log-probs through the real `openai` client against a real uvicorn server on 127.0.0.1 (a free port):
`logprobs` / `top_logprobs` on completions and chat (also streaming), `echo` with prompt log-probs,
each row scored by its own adapter in the mixed batch and equal to the library's forward with that
adapter to 1e-4; then lm-eval's `local-completions` log-likelihood on a tiny local multiple-choice
task through the server, against lm-eval's own HF backend on the same adapter."""
from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from serve_support import _base, build, load_base
from slimtune.serve import ServeConfig, build_app, make_server
from test_serve_openai import LiveServer

ADAPTERS = ["lora-a", "lora-b", "prompt"]
CLS = 101  # the tiny tokenizer (MiniLM's WordPiece) has no BOS: lm-eval's prefix token, the same for both backends


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_logprobs")
    base, ads = build(tmp, ADAPTERS)
    model, tok = load_base(base)
    srv = make_server(model, tok, ServeConfig(served_model_name="tiny", max_batch=16),
                      {n: str(p) for n, p in ads.items()})
    with LiveServer(build_app(srv)) as server:
        yield server, srv, base, ads


def _client(live):
    return openai.OpenAI(base_url=live[0].url, api_key="unused", max_retries=0, timeout=60)


def _library_logprobs(base, adapter, ids: list[int]) -> torch.Tensor:
    """log_softmax of the library's own forward (PeftModel with the adapter, fp32) over `ids`: (T, V)
    (prompt-learning adapters put their virtual tokens' positions in front: dropped)."""
    from slimtune import PeftModel

    model = copy.deepcopy(_base(str(base)))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -len(ids):].float(), dim=-1)


def test_echo_logprobs_per_row_equal_the_librarys_forward(live):
    server, srv, base, ads = live
    tok = srv.tokenizer
    names = ["lora-a", "lora-b", "tiny", "prompt", "lora-a", "tiny"]
    prompts = [f"review {i}: " + " ".join(["a fine", "dull and long", "great fun"][: 1 + i % 3]) for i in range(6)]

    def ask(job):
        name, prompt = job
        return _client(live).completions.create(model=name, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                                logprobs=3)

    with ThreadPoolExecutor(6) as pool:  # at once: the LoRA rows and the base rows share mixed batches
        outs = list(pool.map(ask, zip(names, prompts)))
    for name, prompt, out in zip(names, prompts, outs):
        ch = out.choices[0]
        ids = tok(prompt)["input_ids"]
        lp = ch.logprobs
        assert ch.text.startswith(tok.decode(ids, skip_special_tokens=True))
        assert len(lp.token_logprobs) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        gen = [tok.convert_tokens_to_ids(t) for t in lp.tokens[len(ids):]]  # the tiny vocab's tokens are whole
        ref = _library_logprobs(base, ads.get(name), ids + gen)
        want = ref[:-1].gather(1, torch.tensor(ids[1:] + gen)[:, None]).squeeze(1)
        got = torch.tensor(lp.token_logprobs[1:], dtype=torch.float32)
        assert torch.allclose(got, want, atol=1e-4), (name, (got - want).abs().max())
        for pos, top in enumerate(lp.top_logprobs[1:]):  # the top 3 (and the chosen token) at every position
            best = ref[pos].topk(3).values
            assert torch.allclose(torch.tensor(sorted(top.values(), reverse=True)[:3]), best, atol=1e-4)
        assert max(lp.top_logprobs[-1].values()) == lp.token_logprobs[-1]  # greedy: the chosen is the best


def test_chat_logprobs_streamed_and_not(live):
    server, srv, base, ads = live
    client = _client(live)
    msgs = [{"role": "user", "content": "Is this a review? A clumsy, overlong mess."}]
    done = client.chat.completions.create(model="lora-b", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = done.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy
    assert "".join(c.token for c in content).replace("##", "").replace(" ", "") == \
        done.choices[0].message.content.replace(" ", "")
    assert all(bytes(c.bytes) == c.token.encode() for c in content)  # WordPiece: whole characters
    parts = list(client.chat.completions.create(model="lora-b", messages=msgs, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True))
    streamed = [c for p in parts if p.choices and p.choices[0].logprobs for c in p.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    assert done.choices[0].logprobs is not None
    plain = client.chat.completions.create(model="lora-b", messages=msgs, max_tokens=2)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="lora-b", messages=msgs, max_tokens=2, top_logprobs=2)
    # completions, streamed: the same log-probs as the JSON answer, echo included
    one = client.completions.create(model="lora-a", prompt="so dull", max_tokens=4, logprobs=1, echo=True)
    chunks = list(client.completions.create(model="lora-a", prompt="so dull", max_tokens=4, logprobs=1, echo=True,
                                            stream=True))
    flat = [v for ch in chunks if ch.choices and ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs]
    assert flat == one.choices[0].logprobs.token_logprobs
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == one.choices[0].text


def test_chat_logprob_bytes_are_the_tokens_own_bytes():
    """A byte-level BPE token can hold part of a UTF-8 character (SmolLM2 splits 日 into two tokens): its
    decoded string is U+FFFD, but `bytes` carries the raw bytes, so joining the pieces gives the text back."""
    from transformers import AutoTokenizer

    from slimtune.serve import logprobs
    from slimtune.train.models import smollm2_folder

    tok = AutoTokenizer.from_pretrained(smollm2_folder(log=lambda *a: None))
    text = "café – 日本 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the case this is about: a split character
    items = logprobs.chat_shape(tok, [(i, -0.5, [(i, -0.5)]) for i in ids], logprobs.token_bytes(tok))
    assert b"".join(bytes(it["bytes"]) for it in items).decode() == text
    assert all(it["top_logprobs"][0]["bytes"] == it["bytes"] for it in items)


TASK = """
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""
DOCS = [{"question": "The film was", "choices": ["great", "awful", "long"], "label": 0},
        {"question": "Is the sky blue? Answer:", "choices": ["yes", "no"], "label": 0},
        {"question": "A clumsy, overlong mess. Sentiment:", "choices": ["positive", "negative"], "label": 1},
        {"question": "Two plus two is", "choices": ["four", "five", "three", "six"], "label": 0}]


def test_lm_eval_local_completions_equals_its_hf_backend(live, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from slimtune import PeftModel

    server, srv, base, ads = live
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(TASK.format(data=data))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # not the ~25 s index of every task

    def scores(lm) -> list[float]:
        out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=tasks, log_samples=True,
                                      bootstrap_iters=0)
        return [r[0] for s in out["samples"]["tiny_mc"] for r in s["filtered_resps"]]

    served = LocalCompletionsAPI(base_url=f"{server.url}/completions", model="lora-a", tokenizer=str(base),
                                 tokenizer_backend="huggingface", batch_size=8, max_retries=1, timeout=60,
                                 custom_prefix_token_id=CLS)
    model = PeftModel.from_pretrained(copy.deepcopy(_base(str(base))), str(ads["lora-a"])).eval()
    hf = HFLM(pretrained=model, tokenizer=srv.tokenizer, batch_size=8, prefix_token_id=CLS,
              add_bos_token=False)  # as local-completions encodes: no [CLS] ... [SEP] around each string
    got, want = scores(served), scores(hf)
    assert len(got) == sum(len(d["choices"]) for d in DOCS)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4), (got, want)


def test_best_of_answers_the_n_most_likely_of_its_candidates(live):
    client = _client(live)
    ask = dict(model="lora-a", prompt="a clumsy, overlong mess", max_tokens=5, temperature=1.0, seed=7)
    # the same seeds (seed + j for candidate j) give the same candidates: all 4, scored
    every = client.completions.create(n=4, logprobs=0, **ask).choices
    total = {c.index: sum(c.logprobs.token_logprobs) for c in every}
    top2 = sorted(sorted(total, key=total.get, reverse=True)[:2])
    best = client.completions.create(n=2, best_of=4, **ask)
    assert [c.text for c in best.choices] == [every[i].text for i in top2]
    assert best.choices[0].logprobs is None  # not asked for: used for the ranking only
    assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in every)  # every candidate ran
