"""OpenAPI-driven fuzzing: schemathesis generates requests (valid and invalid) from the app's own
/openapi.json for every operation; the server must never answer 5xx and must stay up.

Bounded: a fixed number of examples per operation (positive and negative modes), a server whose
limits (max_tokens 4, prompts of 64 tokens, n <= 2) keep each generation to a few decode steps."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from serve_support import build, load_base
from test_task_audio import tiny_whisper  # noqa: F401 - fixture
from slimtune.serve import ServeConfig, build_app, make_server

EXAMPLES = {"positive": 20, "negative": 8}  # per operation: 12 operations -> ~340 requests in all


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    base, ads = build(tmp_path_factory.mktemp("serve_fuzz"), ["lora-a", "prompt"])
    model, tok = load_base(base)
    cfg = ServeConfig(served_model_name="tiny", max_tokens=4, default_completion_tokens=4, max_prompt_tokens=64,
                      max_n=2, max_body_bytes=64 << 10, request_timeout_s=30)
    srv = make_server(model, tok, cfg, {"fz-a": str(ads["lora-a"]), "fz-p": str(ads["prompt"])},
                      routes={"fz-route": {"fz-a": 0.5, "fz-p": 0.5}})
    srv.engine.start()  # the ASGI transport does not run the lifespan
    yield srv
    srv.engine.stop()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_makes_a_5xx(fuzz_server, mode):
    # the Python API, not `schema.parametrize()`: schemathesis' pytest plugin reads a pytest-internal
    # attribute that pytest 9 no longer has (`Function._nodeid`)
    schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(fuzz_server))
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) == 12  # every route of app.py
    seen: dict[str, set[int]] = {}

    for op in ops:
        @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def one(case):
            body = case.body if isinstance(case.body, dict) else None
            if case.path == "/v1/unload_lora_adapter" and body and str(body.get("lora_name", "")).startswith("fz-"):
                body["lora_name"] = "not-" + body["lora_name"]  # keep the served set for the other examples
            if body and isinstance(body.get("model"), str):  # mostly served names, so bodies reach the engine
                body["model"] = ["tiny", "fz-a", "fz-p", "fz-route", body["model"]][len(body["model"]) % 5]
            response = case.call()
            seen.setdefault(op.label, set()).add(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])
            ct = response.headers.get("content-type") or [""]  # schemathesis: header -> list of values
            if response.status_code >= 400 and ct[0].startswith("application/json"):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        try:
            one()
        except Unsatisfiable:  # negative mode: an operation with nothing to get wrong (GET /health)
            assert mode == "negative"
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/load_lora_adapter"} <= set(seen)
    if mode == "positive":  # generated bodies were generated from, not only refused
        assert 200 in seen["POST /v1/completions"] and 200 in seen["POST /v1/chat/completions"]
    assert len(seen) >= (len(ops) if mode == "positive" else 5)  # negative: the operations with a body
    assert all(code < 500 for codes in seen.values() for code in codes)
    print({k: sorted(v) for k, v in seen.items()})


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_transcriptions_form_never_makes_a_5xx(tiny_whisper, tmp_path, mode):  # noqa: F811
    """The multipart operation of a speech base (its schema: transcriptions.OPENAPI), fuzzed the same way:
    random bytes as audio, odd languages, formats and temperatures are 4xx with OpenAI's error body."""
    from slimtune.train.tasks import get_task

    model, proc = get_task("speech_recognition").load_for_adapter(str(tiny_whisper), None, None)
    srv = make_server(model.eval(), proc, ServeConfig(served_model_name="tiny-asr", request_timeout_s=30,
                                                      max_audio_bytes=32 << 10))
    srv.engine.start()
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(srv))
        op = next(r.ok() for r in schema.get_all_operations() if r.ok().path == "/v1/audio/transcriptions")
        seen: set[int] = set()

        @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def one(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = ["tiny-asr", case.body["model"]][len(case.body["model"]) % 2]
            response = case.call()
            seen.add(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])
            assert response.status_code in (200, 400, 404, 413)
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        one()
    finally:
        srv.engine.stop()
    assert 400 in seen and all(code < 500 for code in seen)
