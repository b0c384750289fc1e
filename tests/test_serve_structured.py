"""Structured output (`response_format` json_schema / json_object, grammar.py with llguidance) through the
real `openai` client against a real uvicorn server on 127.0.0.1: constrained and free rows of
different adapters at once in one mixed batch, every constrained answer parses and meets its schema.

llguidance needs a byte-level tokenizer (the other serve tests' MiniLM WordPiece is not one): the
tiny model here gets a byte-level BPE trained in the test on a few lines (well under a second)."""
from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_support import make_adapter
from slimtune.serve import ServeConfig, build_app, make_server
from test_serve_openai import LiveServer

pytest.importorskip("llguidance")

CORPUS = ['{"answer": "yes", "n": 12, "ok": true}', '{"tags": ["red", "green"]}', "the quick brown fox",
          "Is this a review? A clumsy, overlong mess.", '[1, 2, 3] {"a": null, "b": false}', "0123456789 {}[],:"]
SCHEMA_A = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                              "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "ok": {"type": "boolean"}},
            "required": ["answer", "n", "ok"], "additionalProperties": False}
SCHEMA_B = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                       "minItems": 1, "maxItems": 3}},
            "required": ["tags"], "additionalProperties": False}


def _tiny_bpe_model(path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from slimtune import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("serve_structured")
    base = _tiny_bpe_model(tmp / "base")
    ad = make_adapter(base, tmp / "a", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=1)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    srv = make_server(model, AutoTokenizer.from_pretrained(base), ServeConfig(served_model_name="tiny"), {"a": str(ad)})
    with LiveServer(build_app(srv)) as server:
        yield server, srv


def _client(live):
    return openai.OpenAI(base_url=live[0].url, api_key="unused", max_retries=0, timeout=120)


def _meets_a(v):
    return (set(v) == {"answer", "n", "ok"} and v["answer"] in ("yes", "no") and isinstance(v["n"], int)
            and 0 <= v["n"] <= 99 and isinstance(v["ok"], bool))


def _meets_b(v):
    return set(v) == {"tags"} and 1 <= len(v["tags"]) <= 3 and set(v["tags"]) <= {"red", "green", "blue"}


def test_constrained_and_free_rows_in_one_batch(live):
    msgs = [{"role": "user", "content": "Is this a review? A clumsy, overlong mess."}]
    fmt = lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": True}}  # noqa: E731
    jobs = [("a", fmt(SCHEMA_A), _meets_a, 0.0, None), ("tiny", fmt(SCHEMA_B), _meets_b, 0.0, None),
            ("a", fmt(SCHEMA_B), _meets_b, 1.0, 3), ("tiny", fmt(SCHEMA_A), _meets_a, 1.0, 4),
            ("a", None, None, 0.0, None), ("tiny", None, None, 1.0, 5)]

    def ask(job):
        model, rf, _, temp, seed = job
        extra = {"response_format": rf} if rf else {}
        return _client(live).chat.completions.create(model=model, messages=msgs, max_tokens=80, temperature=temp,
                                                     seed=seed, **extra)

    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(ask, jobs))
    for (model, rf, meets, _, _), out in zip(jobs, outs):
        ch = out.choices[0]
        if rf is None:
            assert ch.finish_reason in ("stop", "length")
            continue
        assert ch.finish_reason == "stop", ch
        assert meets(json.loads(ch.message.content)), ch.message.content


def test_json_object_with_logit_bias_and_a_bad_schema(live):
    server, srv = live
    client = _client(live)
    msgs = [{"role": "user", "content": "hi"}]
    tok = srv.tokenizer
    # the bias: "}" up, every merged token that opens an object and goes on ('{"', ...) down
    bias = {str(i): -100 for i in range(len(tok)) if tok.decode([i]).startswith("{") and tok.decode([i]) != "{"}
    bias[str(tok.convert_tokens_to_ids("}"))] = 100
    out = client.chat.completions.create(model="a", messages=msgs, max_tokens=40, response_format={"type": "json_object"},
                                         logit_bias=bias)
    assert json.loads(out.choices[0].message.content) == {}  # the grammar forces "{", then the bias picks "}"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="a", messages=msgs, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="a", messages=msgs, max_tokens=4, response_format={"type": "json_schema"})


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                                          "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["a", "b"], "additionalProperties": False}}}]


def _valid_call(call):
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return args in ({"city": "Paris"}, {"city": "Oslo"})
    return call.function.name == "add" and set(args) == {"a", "b"} and all(0 <= v <= 9 for v in args.values())


def test_tool_calls_required_named_streamed_and_results_back(live):
    client = _client(live)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = client.chat.completions.create(model="a", messages=msgs, tools=TOOLS, tool_choice="required", max_tokens=80)
    ch = out.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    assert ch.message.tool_calls and all(_valid_call(c) for c in ch.message.tool_calls)
    named = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, parallel_tool_calls=False,
                                           tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=60)
    calls = named.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "add" and _valid_call(calls[0])
    # streamed: OpenAI's delta.tool_calls pieces (index, id, name first, then arguments in pieces)
    # join into the non-streamed answer's calls
    for kw, want in (({"tool_choice": "required"}, ch.message.tool_calls), (
            {"tool_choice": {"type": "function", "function": {"name": "add"}}, "parallel_tool_calls": False,
             "model": "tiny", "max_tokens": 60}, calls)):
        kw = {"model": "a", "max_tokens": 80, **kw}
        parts = list(client.chat.completions.create(messages=msgs, tools=TOOLS, stream=True, **kw))
        pieces = [c for p in parts if p.choices for c in (p.choices[0].delta.tool_calls or [])]
        joined: dict[int, dict] = {}
        for c in pieces:
            d = joined.setdefault(c.index, {"id": c.id, "name": c.function.name, "arguments": ""})
            assert c.id in (None, d["id"]) and c.function.name in (None, d["name"])
            d["arguments"] += c.function.arguments or ""
        assert [(d["name"], json.loads(d["arguments"])) for d in joined.values()] == \
            [(c.function.name, json.loads(c.function.arguments)) for c in want]
        assert all(d["id"].startswith("call_") for d in joined.values())
        assert len(pieces) > 2 * len(joined)  # the arguments came in several pieces, not whole
        assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "tool_calls"
        assert all(not p.choices[0].delta.content for p in parts if p.choices)
    # the call and its result go back to the model through the chat template
    call = ch.message.tool_calls[0]
    back = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                   {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    again = client.chat.completions.create(model="a", messages=back, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert again.choices[0].message.tool_calls is None and again.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="a", messages=msgs, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_auto_tool_calls_are_parsed_from_hermes_blocks():
    from slimtune.serve.tools import parse

    text = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls = parse(text, "auto")
    assert content == "Let me check." and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert parse("no call here", "auto") == ("no call here", [])
    assert parse('<tool_call>{"name": broken</tool_call>', "auto")[1] == []


def test_langchain_with_structured_output(live):
    """LangChain's ChatOpenAI against the server: with_structured_output by json_schema (its default) and
    by function calling; both come back as validated pydantic objects."""
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(json_schema_extra={"enum": ["Paris", "Oslo"]})
        degrees: int = Field(ge=-40, le=50)

    llm = ChatOpenAI(model="a", base_url=live[0].url, api_key="unused", max_tokens=60, temperature=0, max_retries=0,
                     timeout=120)
    for method in ("json_schema", "function_calling"):
        got = llm.with_structured_output(Weather, method=method, strict=True).invoke("Weather in Oslo?")
        assert isinstance(got, Weather) and got.city in ("Paris", "Oslo") and -40 <= got.degrees <= 50, method
    # streaming tool calls: LangChain merges the delta.tool_calls pieces by index into whole calls
    tooled = llm.bind_tools([Weather], tool_choice="required", strict=True)
    chunks = list(tooled.stream("Weather in Oslo?"))
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c
    assert len(chunks) > 3 and whole.tool_calls and whole.tool_calls[0]["name"] == "Weather"
    once = tooled.invoke("Weather in Oslo?").tool_calls  # greedy: the same calls as the stream's
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [(c["name"], c["args"]) for c in once]
    assert Weather(**whole.tool_calls[0]["args"]).city in ("Paris", "Oslo")


TOOL_TEXTS = [("required", '[{"name": "get_weather", "arguments": {"city": "Paris", "n": {"y": [1, "}\\""]}}}, '
                           '{"name":"add","arguments":{"a":1,"b":2}}]'),
              ("named", '{"name": "add", "arguments": {"a": 3, "b": 4}}'),
              ("auto", '  Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
                       ' then <tool_call>{"name":"add","arguments":{"a":1}}</tool_call> ok  '),
              ("auto", " no call here <tool "), ("auto", '\n<tool_call>{"name": "add", "arguments": {}}</tool_call>\n'),
              ("auto", "   ")]


@given(st.sampled_from(TOOL_TEXTS), st.lists(st.integers(1, 9), min_size=1, max_size=40))
@settings(max_examples=150, deadline=None)
def test_streamed_tool_pieces_join_into_the_parsed_answer(case, steps):
    """However the text arrives, the content and delta.tool_calls pieces join into tools.parse's answer."""
    from slimtune.serve.tools import ToolStream, parse

    how, text = case
    ts, content, joined, i = ToolStream(how), "", {}, 0
    for k in itertools.cycle(steps):
        if i >= len(text):
            break
        c, pieces = ts.push(text[i:i + k])
        i += k
        content += c
        for p in pieces:
            d = joined.setdefault(p["index"], {"name": p["function"].get("name"), "arguments": ""})
            assert "id" not in p or p["function"]["arguments"] == ""  # the first piece: id + name
            d["arguments"] += p["function"]["arguments"]
    content += ts.finish()
    want_content, want_calls = parse(text, how)
    assert (content or None) == (want_content or None)
    assert [(d["name"], json.loads(d["arguments"])) for d in joined.values()] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in want_calls]


SCHEMA_C = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 3},
    "nested": {"type": "object", "properties": {"flag": {"type": "boolean"}, "kind": {"enum": ["x", "y", None]}},
               "required": ["flag", "kind"], "additionalProperties": False}},
    "required": ["name", "nested"], "additionalProperties": False}
SCHEMA_D = {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "tag": {"type": "string", "pattern": "^[a-c]{1,3}$"}},
    "required": ["id", "tag"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False}
SCHEMAS = [SCHEMA_A, SCHEMA_B, SCHEMA_C, SCHEMA_D]


@given(st.lists(st.tuples(st.sampled_from(range(len(SCHEMAS))), st.sampled_from(["a", "tiny"]),
                          st.sampled_from([0.0, 0.7, 1.5]), st.integers(0, 2**16), st.booleans()),
                min_size=2, max_size=5))
@settings(max_examples=6, deadline=None, derandomize=True)
def test_every_constrained_answer_validates(live, rows):
    """Several schemas, adapters and temperatures at once in one mixed batch, seeded, with and without
    log-probs (without: the grammar's forced first tokens go in with the prompt, grammar.fast_forward):
    every answer parses and validates against its schema (jsonschema_rs); with log-probs, one entry per
    token counted in usage."""
    import jsonschema_rs

    msgs = [{"role": "user", "content": "Is this a review? A clumsy, overlong mess."}]

    def ask(row):
        i, model, temp, seed, lp = row
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}
        return _client(live).chat.completions.create(model=model, messages=msgs, max_tokens=120, temperature=temp,
                                                     seed=seed, logprobs=lp, response_format=fmt)

    with ThreadPoolExecutor(len(rows)) as pool:
        outs = list(pool.map(ask, rows))
    for (i, _, _, _, lp), out in zip(rows, outs):
        ch = out.choices[0]
        assert ch.finish_reason == "stop", ch
        jsonschema_rs.validate(SCHEMAS[i], json.loads(ch.message.content))
        if lp:  # one entry per generated token (forced ones included)
            assert len(ch.logprobs.content) == out.usage.completion_tokens


def test_forced_tokens_in_the_prompt_give_the_same_greedy_answer(live):
    """grammar.fast_forward: with log-probs on, each forced token is sampled one step at a time; off,
    they go in with the prompt. The greedy answers and their token counts are the same."""
    client = _client(live)
    msgs = [{"role": "user", "content": "Is this a review? A clumsy, overlong mess."}]
    for i, schema in enumerate(SCHEMAS):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        fast, slow = (client.chat.completions.create(model="a", messages=msgs, max_tokens=120, temperature=0,
                                                     logprobs=lp, response_format=fmt) for lp in (False, True))
        assert fast.choices[0].message.content == slow.choices[0].message.content, i
        assert fast.usage.completion_tokens == slow.usage.completion_tokens == len(slow.choices[0].logprobs.content)
