"""The HTTP API in process (Starlette's TestClient drives the real ASGI app, engine thread included):
OpenAI shapes, streaming, bad input as 4xx OpenAI error bodies, tenants, A/B routes, run-time
load/unload, limits."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from starlette.testclient import TestClient

from serve_support import build, load_base, offline_greedy
from slimtune.serve import ServeConfig, ServeError, build_app, make_server
from slimtune.serve.tenants import KeysFileError, load_keys

KEYS = """
keys:
  - key: sk-acme-0123456789
    name: acme
    adapters: ["acme-*"]
    routes: ["support"]
  - sha256: "{globex}"
    name: globex
    adapters: ["globex-*", "tiny"]
  - key: sk-admin-0123456789
    admin: true
    adapters: ["*"]
    routes: ["*"]
  - key: sk-limited-0123456789
    adapters: ["*"]
    rate_limit: 2/min
routes:
  support: {{acme-v1: 0.5, acme-v2: 0.5}}
"""
ACME = {"Authorization": "Bearer sk-acme-0123456789"}
GLOBEX = {"Authorization": "Bearer sk-globex-0123456789"}
ADMIN = {"Authorization": "Bearer sk-admin-0123456789"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_api")
    base, ads = build(tmp, ["lora-a", "lora-b", "lora-head", "prompt"])
    keys = tmp / "keys.yaml"
    keys.write_text(KEYS.format(globex=hashlib.sha256(b"sk-globex-0123456789").hexdigest()))
    return base, ads, keys


def _server(world, keys=False, **cfg):
    base, ads, keyfile = world
    model, tok = load_base(base)
    adapters = {"acme-v1": str(ads["lora-a"]), "acme-v2": str(ads["lora-b"]), "globex-x": str(ads["lora-head"])}
    cfg.setdefault("allow_adapter_paths", (str(base.parent),))  # API loads read the world's folders
    srv = make_server(model, tok, ServeConfig(served_model_name="tiny", **cfg), adapters,
                      keys=str(keyfile) if keys else None)
    return srv, TestClient(build_app(srv))


@pytest.fixture(scope="module")
def open_client(world):
    srv, c = _server(world)
    with c:
        yield srv, c


@pytest.fixture(scope="module")
def keyed(world):
    srv, c = _server(world, keys=True)
    with c:
        yield srv, c


def _ids(tok, text):
    return tok(text)["input_ids"]


def test_models_completions_and_greedy_equals_offline(world, open_client):
    base, ads, _ = world
    srv, c = open_client
    data = c.get("/v1/models").json()["data"]
    assert {m["id"]: m["parent"] for m in data} == {"tiny": None, "acme-v1": "tiny", "acme-v2": "tiny",
                                                     "globex-x": "tiny"}
    assert c.get("/v1/models/acme-v1").json()["id"] == "acme-v1"
    tok = srv.tokenizer
    for name, folder in [("acme-v1", ads["lora-a"]), ("globex-x", ads["lora-head"]), ("tiny", None)]:
        r = c.post("/v1/completions", json={"model": name, "prompt": "the film was", "max_tokens": 7, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-slimtune-adapter"] == name
        body = r.json()
        ref = offline_greedy(base, folder, _ids(tok, "the film was"), 7)
        assert body["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True)
        assert body["usage"] == {"prompt_tokens": len(_ids(tok, "the film was")), "completion_tokens": len(ref),
                                 "total_tokens": len(_ids(tok, "the film was")) + len(ref)}
        assert body["object"] == "text_completion" and body["model"] == name


def test_chat_uses_the_chat_template_like_generate(world, open_client):
    from slimtune.train.data import ensure_chat_template

    base, ads, _ = world
    srv, c = open_client
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is this a review?"}]
    r = c.post("/v1/chat/completions", json={"model": "acme-v2", "messages": msgs, "max_tokens": 6})
    assert r.status_code == 200
    tok = srv.tokenizer
    ensure_chat_template(tok)
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ref = offline_greedy(base, ads["lora-b"], tok(text, add_special_tokens=False)["input_ids"], 6)
    msg = r.json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": tok.decode(ref, skip_special_tokens=True)}
    # content as a list of text parts is the same request
    parts = [msgs[0], {"role": "user", "content": [{"type": "text", "text": "is this "}, {"type": "text", "text": "a review?"}]}]
    r2 = c.post("/v1/chat/completions", json={"model": "acme-v2", "messages": parts, "max_tokens": 6})
    assert r2.json()["choices"][0]["message"] == msg


def _sse(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_streaming_adds_up_to_the_plain_answer(open_client):
    srv, c = open_client
    for path, body in [("/v1/completions", {"prompt": "a dull and long film"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi there"}]})]:
        req = {"model": "acme-v1", "max_tokens": 9, **body}
        plain = c.post(path, json=req).json()["choices"][0]
        events = _sse(c.post(path, json={**req, "stream": True, "stream_options": {"include_usage": True}}).text)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 9
        chunks = [e["choices"][0] for e in events[:-2]]
        if "messages" in body:
            assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
            text = "".join(ch["delta"].get("content", "") for ch in chunks)
            assert text == plain["message"]["content"]
        else:
            assert "".join(ch["text"] for ch in chunks) == plain["text"]
        assert chunks[-1]["finish_reason"] == "length" == plain["finish_reason"]


def test_n_prompt_lists_stop_strings_and_seeds(open_client):
    srv, c = open_client
    r = c.post("/v1/completions", json={"model": "acme-v1", "prompt": ["one", "two words"], "n": 2, "max_tokens": 4})
    ch = r.json()["choices"]
    assert [x["index"] for x in ch] == [0, 1, 2, 3] and ch[0]["text"] == ch[1]["text"]  # greedy: n copies agree
    full = c.post("/v1/completions", json={"model": "acme-v1", "prompt": "one", "max_tokens": 8}).json()
    words = full["choices"][0]["text"].split(" ")
    stop = " " + words[2]
    cut = c.post("/v1/completions", json={"model": "acme-v1", "prompt": "one", "max_tokens": 8, "stop": [stop]}).json()
    assert cut["choices"][0] == {"index": 0, "text": full["choices"][0]["text"].split(stop)[0], "logprobs": None,
                                 "finish_reason": "stop"}
    streamed = _sse(c.post("/v1/completions", json={"model": "acme-v1", "prompt": "one", "max_tokens": 8,
                                                     "stop": stop, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == cut["choices"][0]["text"]
    hot = {"model": "acme-v2", "prompt": "one", "max_tokens": 8, "temperature": 1.5, "seed": 11}
    a, b = (c.post("/v1/completions", json=hot).json()["choices"][0]["text"] for _ in range(2))
    assert a == b
    tokens = c.post("/v1/completions", json={"model": "tiny", "prompt": [1000, 2000, 3000], "max_tokens": 2}).json()
    assert tokens["usage"]["prompt_tokens"] == 3


BAD = [
    (b"{", 400, "invalid_json"),
    (b"[1, 2]", 400, None),
    (b'{"prompt": "x"}', 400, "missing_required_parameter"),
    (b'{"model": "acme-v1", "prompt": ""}', 400, "empty_prompt"),
    (b'{"model": "acme-v1", "prompt": []}', 400, "empty_prompt"),
    (b'{"model": "nope", "prompt": "x"}', 404, "model_not_found"),
    (b'{"model": "acme-v1", "prompt": "x", "n": 100000}', 400, "too_many_choices"),
    (b'{"model": "acme-v1", "prompt": "x", "max_tokens": "many"}', 400, "invalid_value"),
    (b'{"model": "acme-v1", "prompt": "x", "max_tokens": 100000000}', 400, "max_tokens_too_large"),
    (b'{"model": "acme-v1", "prompt": "x", "max_tokens": 0}', 400, "invalid_value"),
    (b'{"model": "acme-v1", "prompt": "x", "temperature": -1}', 400, "invalid_value"),
    (b'{"model": "acme-v1", "prompt": "x", "temperature": NaN}', 400, "invalid_value"),
    (b'{"model": "acme-v1", "prompt": "x", "top_p": 0}', 400, "invalid_value"),
    (b'{"model": "acme-v1", "prompt": "x", "seed": 1e400}', 400, None),
    (b'{"model": "acme-v1", "prompt": "x", "seed": 100000000000000000000000}', 400, "invalid_value"),
    (b'{"model": "acme-v1", "prompt": "x", "stream": "yes"}', 400, "invalid_value"),
    (b'{"model": "acme-v1", "prompt": "x", "banana": 1}', 400, "unknown_parameter"),
    (b'{"model": "acme-v1", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "too_many_stops"),
    (b'{"model": "acme-v1", "prompt": "x", "echo": true, "logprobs": 50}', 400, "invalid_value"),
    (b'{"model": "acme-v1", "prompt": "x", "presence_penalty": 3}', 400, "invalid_value"),
    (b'{"model": "acme-v1", "prompt": "x", "best_of": 1, "n": 2}', 400, "unsupported_parameter"),
    (b'{"model": "acme-v1", "prompt": "x", "best_of": 3, "stream": true}', 400, "unsupported_parameter"),
    (b'{"model": "acme-v1", "prompt": "x", "logit_bias": {"99999999": 5}}', 400, "invalid_value"),
    (b'{"model": "acme-v1", "prompt": [99999999]}', 400, "invalid_token_id"),
    (b'{"model": "acme-v1", "prompt": [-1]}', 400, None),
    (b'{"model": "acme-v1", "prompt": "\\ud800"}', 400, None),
    (b'{"model": "acme-v1", "prompt": "x x x x x x x x x x x x x x x x x x x x x x x x x", "max_tokens": 250}', 400,
     "context_length_exceeded"),
]


@pytest.mark.parametrize("body,status,code", BAD)
def test_bad_input_is_a_4xx_with_an_openai_error_body(open_client, body, status, code):
    srv, c = open_client
    r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code


def test_chat_bad_input_and_http_errors(open_client):
    srv, c = open_client
    cases = [({"model": "acme-v1", "messages": []}, 400), ({"model": "acme-v1", "messages": [{"role": "robot"}]}, 400),
             ({"model": "acme-v1", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
             ({"model": "acme-v1", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400),
             ({"model": "acme-v1", "messages": "hello"}, 400)]
    for body, status in cases:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error", body
    assert c.get("/v1/nothing").status_code == 404 and c.get("/v1/nothing").json()["error"]["code"] == "unknown_url"
    assert c.get("/v1/completions").status_code == 405
    big = b'{"model": "acme-v1", "prompt": "' + b"x" * (srv.cfg.max_body_bytes + 1) + b'"}'
    r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert c.get("/health").json()["status"] == "ok"  # and the server is still up


def test_queue_full_is_429_with_retry_after(world):
    srv, c = _server(world, max_queue=0)
    with c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"


def test_tenants_see_and_use_only_their_adapters(keyed):
    srv, c = keyed
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-0123456789"}).json()["error"]["code"] == "invalid_api_key"
    ids = lambda h: sorted(m["id"] for m in c.get("/v1/models", headers=h).json()["data"])  # noqa: E731
    assert ids(ACME) == ["acme-v1", "acme-v2", "support"]
    assert ids(GLOBEX) == ["globex-x", "tiny"]  # the sha256 form of a key
    assert ids(ADMIN) == ["acme-v1", "acme-v2", "globex-x", "support", "tiny"]
    req = {"prompt": "x", "max_tokens": 2}
    theirs = c.post("/v1/completions", json={"model": "globex-x", **req}, headers=ACME)
    absent = c.post("/v1/completions", json={"model": "no-such-adapter", **req}, headers=ACME)
    assert theirs.status_code == absent.status_code == 404
    assert theirs.json()["error"]["message"].replace("globex-x", "X") == absent.json()["error"]["message"].replace(
        "no-such-adapter", "X")
    assert c.get("/v1/models/globex-x", headers=ACME).status_code == 404
    assert c.post("/v1/completions", json={"model": "acme-v1", **req}, headers=ACME).status_code == 200
    assert c.post("/v1/completions", json={"model": "tiny", **req}, headers=ACME).status_code == 404
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, headers=ACME).status_code == 403
    assert c.get("/metrics", headers=ACME).status_code == 403
    assert c.get("/metrics", headers=ADMIN).status_code == 200
    lim = {"Authorization": "Bearer sk-limited-0123456789"}
    codes = [c.get("/v1/models", headers=lim).status_code for _ in range(3)]
    assert codes[:2] == [200, 200] and codes[2] == 429
    assert int(c.get("/v1/models", headers=lim).headers["retry-after"]) >= 1


def test_ab_route_is_sticky_per_user_and_counted_per_arm(keyed):
    srv, c = keyed
    req = {"model": "support", "prompt": "hello", "max_tokens": 2}
    arms = {}
    for u in range(24):
        got = {c.post("/v1/completions", json={**req, "user": f"user-{u}"}, headers=ACME) for _ in range(2)}
        heads = {(r.headers["x-slimtune-adapter"], r.headers["x-slimtune-route"], r.json()["model"]) for r in got}
        assert len(heads) == 1  # the same user gets the same arm every time
        arm, route, model = heads.pop()
        assert route == "support" and model == arm
        arms[u] = arm
    assert set(arms.values()) == {"acme-v1", "acme-v2"}
    # the admin moves all traffic to v2 at run time
    r = c.put("/v1/routes/support", json={"arms": {"acme-v1": 0, "acme-v2": 1}}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["arms"] == {"acme-v1": 0.0, "acme-v2": 1.0}
    assert {c.post("/v1/completions", json={**req, "user": f"user-{u}"}, headers=ACME).headers["x-slimtune-adapter"]
            for u in range(6)} == {"acme-v2"}
    text = c.get("/metrics", headers=ADMIN).text
    assert 'slimtune_route_requests_total{arm="acme-v2",route="support"}' in text
    assert 'slimtune_route_requests_total{arm="acme-v1",route="support"}' in text
    assert 'slimtune_requests_total{endpoint="completions",model="acme-v1",status="200"}' in text
    for line in ("slimtune_queue_depth", "slimtune_time_to_first_token_seconds_bucket", "slimtune_adapters_resident"):
        assert line in text
    # routes are validated, cannot shadow an adapter, and an arm cannot be unloaded from under them
    assert c.put("/v1/routes/support", json={"arms": {"ghost": 1}}, headers=ADMIN).status_code == 400
    assert c.put("/v1/routes/acme-v1", json={"arms": {"acme-v2": 1}}, headers=ADMIN).status_code == 400
    assert c.put("/v1/routes/support", json={"arms": {"acme-v1": 0}}, headers=ADMIN).status_code == 400
    assert c.put("/v1/routes/support", json={"arms": {}}, headers=ADMIN).status_code == 400
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "acme-v2"}, headers=ADMIN).status_code == 409
    assert c.put("/v1/routes/trial", json={"arms": {"acme-v1": 1}}, headers=ACME).status_code == 403
    assert c.put("/v1/routes/trial", json={"arms": {"acme-v1": 1, "tiny": 1}}, headers=ADMIN).status_code == 200
    assert c.post("/v1/completions", json={**req, "model": "trial"}, headers=ACME).status_code == 404  # not its route
    assert c.delete("/v1/routes/trial", headers=ADMIN).status_code == 200
    assert c.delete("/v1/routes/trial", headers=ADMIN).status_code == 404


def test_load_and_unload_at_run_time(world, keyed, tmp_path):
    base, ads, _ = world
    srv, c = keyed
    ids = lambda: sorted(m["id"] for m in c.get("/v1/models", headers=ADMIN).json()["data"])  # noqa: E731
    before = ids()
    bad = base.parent / "bad"
    shutil.copytree(ads["prompt"], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "acme-bad", "lora_path": str(bad)}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_load_failed"
    assert ids() == before
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "acme-prompt", "lora_path": str(ads["prompt"])}, headers=ADMIN)
    assert r.status_code == 200 and "added successfully" in r.text
    assert ids() == sorted(before + ["acme-prompt"])  # listed at once, for the tenant too
    assert "acme-prompt" in [m["id"] for m in c.get("/v1/models", headers=ACME).json()["data"]]
    tok = srv.tokenizer
    out = c.post("/v1/completions", json={"model": "acme-prompt", "prompt": "so", "max_tokens": 5}, headers=ACME).json()
    assert out["choices"][0]["text"] == tok.decode(offline_greedy(base, ads["prompt"], _ids(tok, "so"), 5),
                                                   skip_special_tokens=True)
    dup = c.post("/v1/load_lora_adapter", json={"lora_name": "acme-prompt", "lora_path": str(ads["prompt"])}, headers=ADMIN)
    assert dup.status_code == 400 and dup.json()["error"]["code"] == "adapter_exists"
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "acme-prompt"}, headers=ADMIN).text.startswith("Success")
    assert ids() == before
    assert c.post("/v1/completions", json={"model": "acme-prompt", "prompt": "so"}, headers=ACME).status_code == 404
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "acme-prompt"}, headers=ADMIN).status_code == 404


def test_bind_and_keys_file_checks(world, tmp_path):
    base, ads, keys = world
    model, tok = load_base(base)
    with pytest.raises(ServeError, match="--keys"):
        make_server(model, tok, ServeConfig(host="0.0.0.0"))
    assert make_server(model, tok, ServeConfig(host="0.0.0.0", insecure=True)) is not None
    one = tmp_path / "one.yaml"
    one.write_text("keys: [{key: sk-0123456789, adapters: ['*']}]")
    assert make_server(model, tok, ServeConfig(host="0.0.0.0"), keys=str(one)).tenants is not None
    with pytest.raises(ServeError, match="arm 'acme-v1' is not a loaded adapter"):
        make_server(model, tok, ServeConfig(), keys=str(keys))  # routes name adapters that are not there
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "serve" / "keys.yaml"
    tenants, routes = load_keys(str(example))  # the shipped example is valid
    assert len(tenants.tenants) == 3 and routes == {"acme-support": {"acme-v1": 0.9, "acme-v2": 0.1}}
    assert tenants.authenticate("Bearer sk-admin-change-me-0001").admin
    for text, match in [("keys: [{key: sk-0123456789, sha256: " + "a" * 64 + "}]", "exactly one"),
                        ("keys: [{key: sk-0123456789, rate_limit: lots}]", "rate_limit"),
                        ("keys: [{key: sk-0123456789, colour: red}]", "colour"),
                        ("keys: [{sha256: abc}]", "64 hex"), ("keys: [{key: short}]", "at least 8"),
                        ("keys: [{key: sk-0123456789}, {key: sk-0123456789}]", "twice"), ("keys: [", "YAML")]:
        p = tmp_path / "k.yaml"
        p.write_text(text)
        with pytest.raises(KeysFileError, match=match):
            load_keys(str(p))


def test_lora_kernel_switch_at_start_up(world, monkeypatch):
    """--lora-kernel: auto builds the mixed-LoRA decode kernel and says so (the CLI prints the line,
    /health tells the mode); off keeps torch's bmm; on refuses to start where it cannot build, naming
    the fix; auto there says why it keeps torch's bmm. Greedy answers are the offline ones either way."""
    from slimtune.kernels import lora_rows

    base, ads, _ = world
    for mode, want in (("auto", "on"), ("off", "off")):
        srv, c = _server(world, lora_kernel=mode)
        with c:
            assert c.get("/health").json()["lora_kernel"] == want
            got = c.post("/v1/completions", json={"model": "acme-v1", "prompt": "the cat sat", "max_tokens": 6,
                                                  "temperature": 0}).json()
        assert ("the lora_rows kernel" if want == "on" else "torch bmm") in srv.kernel_line
        tok = srv.tokenizer
        ref = offline_greedy(base, ads["lora-a"], _ids(tok, "the cat sat"), 6)
        assert got["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True)
    model, tok = load_base(base)
    with pytest.raises(ServeError, match="--lora-kernel fast: use one of auto, on, off"):
        make_server(model, tok, ServeConfig(lora_kernel="fast"))

    def broken(arch="native"):
        raise lora_rows.KernelUnavailable("the mixed-LoRA decode kernel did not build (c++: not found): it needs gcc")

    monkeypatch.setattr(lora_rows, "build", broken)
    with pytest.raises(ServeError, match=r"--lora-kernel on: the mixed-LoRA decode kernel did not build"):
        make_server(model, tok, ServeConfig(lora_kernel="on"))
    srv = make_server(model, tok, ServeConfig(lora_kernel="auto"))
    assert srv.kernel_line.startswith("mixed LoRA decode: torch bmm, because the mixed-LoRA decode kernel did not build")
