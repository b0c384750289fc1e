"""Request bodies exactly as other people's clients send them (vLLM's `bench serve`, guidellm, SDKs that
add `store` / `service_tier`), in process through Starlette's TestClient over the real app and engine:
fields that change nothing are accepted, a field that would change the answer is one
`unsupported_parameter` 400 naming it, and the per-request prompt limit names the client-side fix."""
from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from serve_support import build, load_base
from slimtune.serve import ServeConfig, build_app, make_server
from slimtune.serve.fields import CHAT, COMMON


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    base, ads = build(tmp_path_factory.mktemp("serve_compat"), ["lora-a"])
    model, tok = load_base(base)
    srv = make_server(model, tok, ServeConfig(served_model_name="tiny", max_n=8), {"a": str(ads["lora-a"])})
    with TestClient(build_app(srv)) as c:
        yield srv, c


def _sse(r) -> list[dict]:
    lines = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_vllm_bench_serve_completions_body(client):
    srv, c = client
    # vllm/benchmarks/lib/endpoint_request_func.py: async_request_openai_completions
    body = {"model": "a", "prompt": "a clumsy, overlong mess", "repetition_penalty": 1.0, "max_tokens": 5,
            "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    chunks = _sse(r)
    assert chunks[-1]["usage"]["completion_tokens"] == 5 and chunks[-1]["choices"] == []


def test_guidellm_streaming_chat_body_gets_usage_in_every_chunk(client):
    srv, c = client
    # guidellm's default OpenAI backend: vLLM's continuous_usage_stats, both max-token names, stop: null
    body = {"model": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": "say something"}]}],
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 4, "max_completion_tokens": 4, "stop": None, "ignore_eos": True}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    chunks = _sse(r)
    assert all("usage" in ch for ch in chunks)
    counts = [ch["usage"]["completion_tokens"] for ch in chunks]
    assert counts == sorted(counts) and counts[-1] == 4  # running totals, ending at the real count


def test_sdk_fields_that_change_nothing_are_accepted(client):
    srv, c = client
    msgs = [{"role": "user", "content": "hi"}]
    plain = c.post("/v1/chat/completions", json={"model": "a", "messages": msgs, "max_tokens": 4}).json()
    extra = {"store": False, "service_tier": "auto", "metadata": {"run": "x"}, "user": "u1", "modalities": ["text"],
             "parallel_tool_calls": True, "skip_special_tokens": True, "include_stop_str_in_output": False,
             "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0}
    r = c.post("/v1/chat/completions", json={"model": "a", "messages": msgs, "max_tokens": 4, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == plain["choices"][0]["message"]


@pytest.mark.parametrize("field,value", [("reasoning_effort", "high"), ("include_stop_str_in_output", True),
                                         ("use_beam_search", True), ("audio", {"voice": "x"}),
                                         ("truncate_prompt_tokens", 5)])
def test_a_field_that_would_change_the_answer_is_one_unsupported_parameter(client, field, value):
    srv, c = client
    r = c.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "hi"}], field: value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unsupported_parameter" and err["param"] == field and field in err["message"]


def test_every_listed_field_is_in_the_schema_and_the_docs():
    from pathlib import Path

    from slimtune.serve.schemas import ChatRequest, CompletionRequest

    docs = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text()
    for name in COMMON:
        assert name in CompletionRequest.model_fields and name in ChatRequest.model_fields, name
        assert f"`{name}`" in docs, name
    for name in CHAT:
        assert name in ChatRequest.model_fields and f"`{name}`" in docs, name


def test_too_many_prompts_names_the_client_side_fix(client):
    srv, c = client
    r = c.post("/v1/completions", json={"model": "a", "prompt": ["x"] * 16, "max_tokens": 1})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "too_many_choices" and "--batch_size 8" in err["message"]


def test_a_guidellm_style_run_of_24_concurrent_streams(client):
    """24 streams at once with guidellm's body over a real socket: all answer, all counted in /metrics."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from test_serve_openai import LiveServer

    srv, _ = client
    body = {"model": "a", "messages": [{"role": "user", "content": "count to ten"}], "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "max_tokens": 6,
            "max_completion_tokens": 6, "stop": None, "ignore_eos": True}
    get = srv.metrics.registry.get_sample_value
    labels = {"route": "/v1/chat/completions", "status": "200", "reason": "ok"}
    before = get("slimtune_responses_total", labels) or 0
    with LiveServer(build_app(srv)) as server:
        def one(i):
            with httpx.Client(timeout=120) as h:
                r = h.post(f"{server.url}/chat/completions", json={**body, "user": f"u{i}"})
                return r.status_code, _sse(r)[-1]["usage"]["completion_tokens"]

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, range(24)))
    assert results == [(200, 6)] * 24
    assert get("slimtune_responses_total", labels) == before + 24
