"""/metrics counts every response by route, status and reason (bad JSON, unknown field, bad value,
401, 413, 429, a 5xx), and keeps time-to-first-token and inter-token latency histograms per adapter.
In process: Starlette's TestClient over the real app and engine."""
from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from serve_support import build, load_base
from slimtune.serve import ServeConfig, build_app, make_server

KEYS = """
keys:
  - {key: sk-admin-0123456789, admin: true, adapters: ["*"], routes: ["*"]}
  - {key: sk-slow-0123456789, adapters: ["*"], rate_limit: 1/min}
"""
ADMIN = {"Authorization": "Bearer sk-admin-0123456789"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_metrics")
    base, ads = build(tmp, ["lora-a"])
    (tmp / "keys.yaml").write_text(KEYS)
    model, tok = load_base(base)
    srv = make_server(model, tok, ServeConfig(served_model_name="tiny", max_body_bytes=4096),
                      {"a": str(ads["lora-a"])}, keys=str(tmp / "keys.yaml"))
    with TestClient(build_app(srv)) as c:
        yield srv, c


def _count(srv, route, status, reason) -> float:
    return srv.metrics.registry.get_sample_value(
        "slimtune_responses_total", {"route": route, "status": str(status), "reason": reason}) or 0.0


def test_every_response_is_counted_by_route_status_and_reason(server, monkeypatch):
    srv, c = server
    comp = "/v1/completions"
    cases = [  # (how to send it, route, status, reason)
        (lambda: c.post(comp, content=b"{", headers={**ADMIN, "content-type": "application/json"}), comp, 400,
         "invalid_json"),
        (lambda: c.post(comp, json={"model": "a", "prompt": "x", "banana": 1}, headers=ADMIN), comp, 400,
         "unknown_parameter"),
        (lambda: c.post(comp, json={"model": "a", "prompt": "x", "max_tokens": 0}, headers=ADMIN), comp, 400,
         "invalid_value"),
        (lambda: c.post(comp, json={"model": "a", "prompt": "x", "reasoning_effort": "high"}, headers=ADMIN), comp,
         400, "unknown_parameter"),
        (lambda: c.post(comp, json={"model": "a", "prompt": "x"}), comp, 401, "invalid_api_key"),
        (lambda: c.post(comp, json={"model": "a", "prompt": "x" * 5000}, headers=ADMIN), comp, 413,
         "request_too_large"),
        (lambda: c.post(comp, json={"model": "nope", "prompt": "x"}, headers=ADMIN), comp, 404, "model_not_found"),
        (lambda: c.get("/v1/models/nope", headers=ADMIN), "/v1/models/{model:path}", 404, "model_not_found"),
        (lambda: c.get("/nowhere"), "unmatched", 404, "unknown_url"),
        (lambda: c.post(comp, json={"model": "a", "prompt": "x", "max_tokens": 2}, headers=ADMIN), comp, 200, "ok"),
    ]
    for send, route, status, reason in cases:
        before = _count(srv, route, status, reason)
        r = send()
        assert r.status_code == status, r.text
        assert _count(srv, route, status, reason) == before + 1, (route, status, reason)
    slow = {"Authorization": "Bearer sk-slow-0123456789"}
    assert c.get("/v1/models", headers=slow).status_code == 200
    before = _count(srv, "/v1/models", 429, "rate_limit_exceeded")
    assert c.get("/v1/models", headers=slow).status_code == 429
    assert _count(srv, "/v1/models", 429, "rate_limit_exceeded") == before + 1
    # a 5xx: the engine's forward breaks, the request fails, the server stays up and counts it
    def broken(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(type(srv.engine.forward), "__call__", broken)  # serve/forward.py's ModelCall
    before = _count(srv, comp, 500, "internal_error")
    assert c.post(comp, json={"model": "a", "prompt": "x", "max_tokens": 2}, headers=ADMIN).status_code == 500
    assert _count(srv, comp, 500, "internal_error") == before + 1
    monkeypatch.undo()
    # the same failure inside an event stream (the 200 already went out) is counted by its code
    monkeypatch.setattr(type(srv.engine.forward), "__call__", broken)  # serve/forward.py's ModelCall
    before = _count(srv, comp, 200, "internal_error")
    r = c.post(comp, json={"model": "a", "prompt": "x", "max_tokens": 2, "stream": True}, headers=ADMIN)
    assert r.status_code == 200 and '"internal_error"' in r.text
    assert _count(srv, comp, 200, "internal_error") == before + 1
    monkeypatch.undo()
    text = c.get("/metrics", headers=ADMIN).text
    assert 'slimtune_responses_total{reason="invalid_json",route="/v1/completions",status="400"}' in text


def test_time_to_first_token_and_inter_token_latency_per_adapter(server):
    srv, c = server
    get = srv.metrics.registry.get_sample_value
    before = {m: get("slimtune_inter_token_latency_seconds_count", {"model": m}) or 0 for m in ("a", "tiny")}
    ttft = {m: get("slimtune_time_to_first_token_seconds_count", {"model": m}) or 0 for m in ("a", "tiny")}
    for model, k in (("a", 6), ("tiny", 4)):
        r = c.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": k,
                                            "ignore_eos": True, "stream": True}, headers=ADMIN)
        assert r.status_code == 200
    # k tokens -> k - 1 gaps between them, per adapter
    assert get("slimtune_inter_token_latency_seconds_count", {"model": "a"}) == before["a"] + 5
    assert get("slimtune_inter_token_latency_seconds_count", {"model": "tiny"}) == before["tiny"] + 3
    assert get("slimtune_inter_token_latency_seconds_sum", {"model": "a"}) > 0
    assert get("slimtune_time_to_first_token_seconds_count", {"model": "a"}) == ttft["a"] + 1
    assert get("slimtune_time_to_first_token_seconds_count", {"model": "tiny"}) == ttft["tiny"] + 1
