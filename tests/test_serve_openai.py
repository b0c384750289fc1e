"""The official `openai` client against a real uvicorn server on 127.0.0.1 (a free port), no mocks:
listing, completions, chat, streaming, errors as the client's exception types, tenants' keys,
many clients at once over several adapters, and clients that go away mid-request."""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serve_support import build, load_base, offline_greedy
from slimtune.serve import ServeConfig, build_app, make_server

ADAPTERS = ["lora-a", "lora-b", "lora-c", "lora-d", "lora-head", "prompt"]
KEYS = """
keys:
  - {key: sk-admin-0123456789, admin: true, adapters: ["*"], routes: ["*"]}
  - {key: sk-acme-0123456789, adapters: ["lora-a", "lora-b"]}
"""


class LiveServer:
    """uvicorn serving the app from a thread, on a socket bound to 127.0.0.1:0."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started and time.monotonic() < end:
            time.sleep(0.02)
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_openai")
    base, ads = build(tmp, ADAPTERS)
    keys = tmp / "keys.yaml"
    keys.write_text(KEYS)
    model, tok = load_base(base)
    srv = make_server(model, tok, ServeConfig(served_model_name="tiny", max_batch=16),
                      {n: str(p) for n, p in ads.items()}, keys=str(keys))
    with LiveServer(build_app(srv)) as server:
        yield server, srv, base, ads


def _client(live, key="sk-admin-0123456789"):
    return openai.OpenAI(base_url=live[0].url, api_key=key, max_retries=0, timeout=60)


def test_models_completion_chat_and_streams(live):
    server, srv, base, ads = live
    client = _client(live)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == set(ADAPTERS) | {"tiny"}
    assert models["lora-a"].parent == "tiny" and models["tiny"].parent is None
    tok = srv.tokenizer
    prompt = "a clumsy, overlong mess"
    raw = client.completions.with_raw_response.create(model="lora-c", prompt=prompt, max_tokens=6, temperature=0)
    assert raw.headers["x-slimtune-adapter"] == "lora-c"
    done = raw.parse()
    ref = offline_greedy(base, ads["lora-c"], tok(prompt)["input_ids"], 6)
    assert done.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert done.usage.completion_tokens == 6 and done.choices[0].finish_reason == "length"
    streamed = "".join(ch.choices[0].text for ch in
                       client.completions.create(model="lora-c", prompt=prompt, max_tokens=6, stream=True))
    assert streamed == done.choices[0].text
    msgs = [{"role": "user", "content": "Is this a review? A clumsy, overlong mess."}]
    chat = client.chat.completions.create(model="prompt", messages=msgs, max_tokens=7)
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    parts = list(client.chat.completions.create(model="prompt", messages=msgs, max_tokens=7, stream=True,
                                                stream_options={"include_usage": True}))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_errors_arrive_as_the_clients_exception_types(live):
    client = _client(live)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="lora-a", prompt="x", n=10_000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="lora-a", messages=[], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        _client(live, "sk-wrong-0123456789").models.list()
    acme = _client(live, "sk-acme-0123456789")
    assert sorted(m.id for m in acme.models.list()) == ["lora-a", "lora-b"]
    with pytest.raises(openai.NotFoundError):
        acme.completions.create(model="lora-c", prompt="x", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        acme.post("/load_lora_adapter", body={"lora_name": "z", "lora_path": "/tmp"}, cast_to=str)


def test_concurrent_clients_over_several_adapters_get_their_adapters_greedy_output(live):
    """16 clients at once over 6 adapters and the base: every answer is the adapter's offline greedy output."""
    server, srv, base, ads = live
    tok = srv.tokenizer
    names = ADAPTERS + ["tiny"]
    jobs = [(names[i % len(names)], f"review number {i}: " + " ".join(["great", "dull", "long", "fun"][: 1 + i % 4]),
             4 + i % 6) for i in range(32)]

    def ask(job):
        name, prompt, k = job
        c = _client(live)
        return c.completions.create(model=name, prompt=prompt, max_tokens=k, temperature=0).choices[0].text

    def mixed4():  # decode forwards whose rows used 4 or more distinct adapters (base included)
        get = srv.metrics.registry.get_sample_value
        return (get("slimtune_batch_adapters_count") or 0) - (get("slimtune_batch_adapters_bucket", {"le": "3.0"}) or 0)

    before = mixed4()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    assert mixed4() > before
    for (name, prompt, k), got in zip(jobs, answers):
        ref = offline_greedy(base, ads.get(name), tok(prompt)["input_ids"], k)
        assert got == tok.decode(ref, skip_special_tokens=True), name


def _metric(srv, status: str) -> float:
    text = srv.metrics.render().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("slimtune_requests_total{") and f'status="{status}"' in line)


def _wait_running_at_least(srv, n, timeout=20.0):
    end = time.monotonic() + timeout
    while srv.engine.running() < n and time.monotonic() < end:
        time.sleep(0.002)
    return srv.engine.running() >= n


def _wait_idle(srv, timeout=20.0):
    end = time.monotonic() + timeout
    while (srv.engine.running() or srv.engine.queue_depth()) and time.monotonic() < end:
        time.sleep(0.01)
    return srv.engine.running() == 0


def test_a_client_that_goes_away_leaves_the_batch(live):
    server, srv, base, ads = live
    assert _wait_idle(srv)
    gone = _metric(srv, "499")
    # a stream closed after its first chunk
    stream = _client(live).completions.create(model="lora-b", prompt="tell me", max_tokens=240, stream=True)
    next(iter(stream))
    stream.close()
    # a plain request whose connection drops while it runs
    body = b'{"model": "lora-a", "prompt": "tell me more", "max_tokens": 240}'
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer sk-admin-0123456789\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert _wait_running_at_least(srv, 1)
    s.close()
    assert _wait_idle(srv)
    end = time.monotonic() + 10
    while _metric(srv, "499") < gone + 2 and time.monotonic() < end:
        time.sleep(0.02)
    assert _metric(srv, "499") == gone + 2  # both seen as gone, their rows cancelled
    gen = srv.metrics.generation_tokens.labels("lora-a")._value.get()
    assert gen < 240 * 2  # the dropped request did not run to its max_tokens


def test_sampling_options_sent_by_the_client_reach_the_rows(live):
    """top_k, min_p, repetition / frequency / presence penalties (extra_body for vLLM's names),
    logit_bias and seed through the `openai` client give what the engine gives for the same options
    (the engine's rows equal HF generate / the definitions: tests/test_serve_sampling.py)."""
    from slimtune.serve.handles import GenRequest
    from slimtune.serve.text import encode

    server, srv, base, ads = live
    client = _client(live)
    text = "a clumsy, overlong mess"
    ids = encode(srv.tokenizer, text)
    plain = client.completions.create(model="lora-a", prompt=text, max_tokens=8, temperature=0.9, seed=3)
    bias = {ids[-1]: 5.0, ids[0]: -100.0}
    opts = dict(top_k=5, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3)
    got = client.completions.create(model="lora-a", prompt=text, max_tokens=8, temperature=0.9, seed=3,
                                    frequency_penalty=0.5, presence_penalty=0.3,
                                    logit_bias={str(k): v for k, v in bias.items()},
                                    extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3})
    req = GenRequest(ids, "lora-a", 8, 0.9, 1.0, 3, 60, logit_bias=bias, **opts)
    toks, _ = srv.engine.submit(req).result(60)
    assert got.choices[0].text == srv.tokenizer.decode(toks, skip_special_tokens=True)
    assert got.choices[0].text != plain.choices[0].text  # the options changed the answer
    with pytest.raises(openai.BadRequestError) as e:  # a vLLM option slimtune lacks, at a value that matters
        client.completions.create(model="lora-a", prompt=text, max_tokens=2, extra_body={"use_beam_search": True})
    assert e.value.body["code"] == "unsupported_parameter" and e.value.body["param"] == "use_beam_search"
