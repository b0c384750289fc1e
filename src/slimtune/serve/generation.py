"""/v1/completions and /v1/chat/completions: check the request, turn it into engine rows (one per
choice), and answer as one JSON body or as server-sent events.

    body ─► model -> adapter (route arm, tenant's globs) ─► prompts -> token ids ─► limits (checks.py)
         ─► engine.submit per choice (429 when the queue is full)
         ─► tokens -> TextStream per choice (stop strings cancel the row) ─► JSON / SSE

Log-probs (logprobs.py), tool calls (tools.py) and structured output (grammar.py) ride on the
same rows. A client that disconnects (or whose stream is closed) cancels its rows: they leave the batch at
the engine's next step.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..methods.lora_layers import BASE_ADAPTER
from . import checks, grammar, logprobs, tools
from .engine import EngineStopped, Event, GenRequest, QueueFull
from .errors import APIError, not_found
from .registry import AdapterLoadError, AdapterNotFound
from .schemas import ChatRequest
from .text import TextStream


@dataclass
class Target:
    adapter: str  # registry name or BASE_ADAPTER
    label: str  # the name that answered (adapter or base model)
    route: str | None = None


def resolve(srv, tenant, model: str, user: str | None) -> Target:
    """What `model` means for this key: the base, a route's arm (sticky per user) or an adapter.
    Anything the key may not use is a 404 exactly like a name that does not exist."""
    if model == srv.base_name and tenant.may_use_model(model):
        return Target(BASE_ADAPTER, model)
    if srv.router.get(model) is not None and tenant.may_use_route(model):
        arm = srv.router.choose(model, user)
        if not tenant.may_use_model(arm):  # start-up and PUT checks keep this from happening; never serve it
            raise not_found(model)
        srv.metrics.route_requests.labels(model, arm).inc()
        return Target(BASE_ADAPTER if arm == srv.base_name else arm, arm, model)
    if model != srv.base_name and srv.registry.get(model) is not None and tenant.may_use_model(model):
        return Target(model, model)
    raise not_found(model)


@dataclass
class _Choice:
    text: TextStream
    prompt_tokens: int
    tokens: int = 0
    finish: str | None = None
    sent_role: bool = False
    chunks: list[str] = field(default_factory=list)
    last: float | None = None  # when the latest token arrived
    gaps: list[float] = field(default_factory=list)  # inter-token latencies (s)
    prompt: list[int] = field(default_factory=list)
    lps: list = field(default_factory=list)  # log-prob entries of the generated tokens (logprobs.py)
    plps: list | None = None  # of the prompt tokens (echo)
    sent: int = 0  # entries already streamed
    echoed: bool = False  # the prompt's text went out (streamed echo)
    tools: tools.ToolStream | None = None  # streamed tool calls (tools.py)
    pre: int = 0  # tokens the grammar forced before the row ran (grammar.fast_forward): the first event


def _engine_error(ev) -> APIError:
    e = ev.error
    if isinstance(e, AdapterNotFound):
        return APIError(404, f"{e} (it was unloaded while the request waited)", "model", "model_not_found")
    if isinstance(e, AdapterLoadError):
        return APIError(400, f"{e}. Ask the server's admin to fix or unload it.", "model", "adapter_load_failed")
    if isinstance(e, EngineStopped) or ev.finish == "cancelled":
        return APIError(503, "The server is shutting down; retry on another instance.", code="shutting_down")
    if ev.finish == "timeout":
        return APIError(408, "The request ran past the server's timeout (--request-timeout); lower max_tokens "
                        "or retry when the server is less busy.", code="timeout")
    return APIError(500, f"generation failed ({type(e).__name__}: {e}); the server log has the details",
                    code="internal_error")


async def handle(srv, request: Request, body, tenant) -> Response:
    endpoint = "chat" if isinstance(body, ChatRequest) else "completions"
    try:
        return await _handle(srv, request, body, tenant, endpoint)
    except APIError as e:  # refused before any row ran: counted under model "" (names are the client's)
        if not getattr(e, "counted", False):
            srv.metrics.request_done(endpoint, "", e.status)
        raise


async def _handle(srv, request: Request, body, tenant, endpoint: str) -> Response:
    t0 = time.perf_counter()
    chat = endpoint == "chat"
    if srv.speech is not None:
        raise APIError(400, f"This server's base model '{srv.base_name}' is a speech recognizer: it answers POST "
                       "/v1/audio/transcriptions (multipart `file` + `model`), not text generation. Serve a causal LM "
                       "base for completions and chat.", "model", "not_a_text_model")
    bad = body.unsupported()
    if bad:
        raise APIError(400, bad[1], bad[0], "unsupported_parameter")
    target = resolve(srv, tenant, body.model, body.user)
    fns, how, gram = checks.tooling(srv, body) if chat else ({}, "none", None)
    prompts = checks.prompts(srv, body, fns)
    per = getattr(body, "best_of", None) or body.n  # candidates per prompt: best_of > n ranks them at the end
    if len(prompts) * per > srv.cfg.max_n:
        what = f"best_of={per}" if per > body.n else f"n={body.n}"
        raise APIError(400, f"{len(prompts)} prompt(s) x {what} is {len(prompts) * per} choices; this server "
                       f"allows at most {srv.cfg.max_n} per request (--max-n). Send fewer prompts per request (lm-eval: "
                       f"--batch_size {max(srv.cfg.max_n // per, 1)} or less) or lower n.", "n", "too_many_choices")
    max_new = checks.limits(srv, body, prompts)
    stops = checks.stops(srv, body.stop)
    bias = checks.logit_bias(srv, body.logit_bias)
    k = checks.top_k(body)
    gram = gram or checks.grammar(srv, body)
    echo = bool(getattr(body, "echo", False)) and not chat
    temp = srv.default_temperature if body.temperature is None else body.temperature
    top_p = srv.default_top_p if body.top_p is None else body.top_p
    loop = asyncio.get_running_loop()
    sink: asyncio.Queue = asyncio.Queue()
    handles, choices = [], []
    try:
        for i, p in enumerate(prompts):
            for j in range(per):
                seed = None if body.seed is None else (body.seed + j) % 2**64
                lp = k if k is not None else (None if per == body.n else 0)  # best_of ranks by log-prob
                m = srv.grammars.matcher(gram) if gram else None
                # tokens the grammar forces first go in with the prompt (one prefill forward), not
                # one decode step each; not where each token's log-prob or a count-based penalty is asked
                ff = grammar.fast_forward(m, max_new[i] - 1) if m is not None and lp is None and not (
                    body.frequency_penalty or body.presence_penalty) else []
                req = GenRequest(p + ff, target.adapter, max_new[i] - len(ff), temp, top_p, seed,
                                 srv.cfg.request_timeout_s, body.ignore_eos, top_k=max(body.top_k or 0, 0),
                                 min_p=body.min_p or 0.0, repetition_penalty=body.repetition_penalty,
                                 frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                                 logit_bias=bias, logprobs=lp, echo=echo and k is not None, matcher=m)
                if ff:  # handed out first, as generated tokens (counted in usage.completion_tokens)
                    sink.put_nowait((len(handles), Event(ff)))
                handles.append(srv.engine.submit(req, loop, sink, tag=len(handles)))
                choices.append(_Choice(TextStream(srv.tokenizer, stops), len(p), prompt=p, pre=len(ff)))
    except (QueueFull, EngineStopped) as e:
        for h in handles:
            h.cancel()
        if isinstance(e, EngineStopped):
            raise APIError(503, "The server is shutting down; retry on another instance.", code="shutting_down") from None
        raise APIError(429, f"The server is busy ({e}); retry after {srv.cfg.retry_after_s} s.",
                       code="queue_full", headers={"Retry-After": str(srv.cfg.retry_after_s)}) from None
    headers = {"X-Slimtune-Adapter": target.label}
    if target.route:
        headers["X-Slimtune-Route"] = target.route
    run = _Run(srv, endpoint, chat, target, handles, choices, sink, t0, body, k, echo, how, per)
    if body.stream:
        return StreamingResponse(run.sse(), media_type="text/event-stream", headers=headers)
    return await run.json(request, headers)


class _Run:
    """One request's choices in flight."""

    def __init__(self, srv, endpoint, chat, target, handles, choices, sink, t0, body, k=None, echo=False,
                 how="none", per: int = 1) -> None:
        self.srv, self.endpoint, self.chat, self.target = srv, endpoint, chat, target
        self.handles, self.choices, self.sink, self.t0, self.body = handles, choices, sink, t0, body
        self.k, self.echo = k, echo  # log-probs: top k per token (None: off); echo the prompt (completions)
        self.how = how  # tool calls: none / auto / required / named (tools.py)
        self.per = per  # choices run per prompt (best_of; n of them are answered)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.status = 200

    async def _events(self):
        """(index, new text, finish reason or None) until every choice has finished."""
        left = len(self.choices)
        while left:
            tag, ev = await self.sink.get()
            c = self.choices[tag]
            if c.finish is not None:
                continue  # the engine's last word on a row we already stopped (stop string)
            if ev.error is not None or ev.finish in ("cancelled", "timeout", "error"):
                raise _engine_error(ev)
            c.tokens += len(ev.tokens)
            if ev.logprobs:
                c.lps += ev.logprobs
            if ev.prompt_logprobs is not None:
                c.plps = ev.prompt_logprobs
            if ev.tokens:
                now = time.perf_counter()
                if c.last is not None:  # several tokens in one event share the wait
                    c.gaps += [(now - c.last) / len(ev.tokens)] * len(ev.tokens)
                c.last = None if c.tokens == c.pre else now  # forced tokens: no wait to time after them
            delta = c.text.push(ev.tokens)
            if c.text.stopped:
                c.finish = "stop"
                self.handles[tag].cancel()
            elif ev.finish is not None:
                c.finish = ev.finish
            if c.finish is not None:
                delta += c.text.finish()
                left -= 1
            if delta or c.finish is not None:
                yield tag, delta, c.finish

    def _usage(self) -> dict:
        p = sum(c.prompt_tokens for c in self.choices[:: self.per])
        g = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}

    async def json(self, request: Request, headers: dict) -> Response:
        async def collect():
            async for _ in self._events():
                pass

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client went away: its rows leave the batch now
                self.status = 499
                work.cancel()
                return Response(status_code=400)
            work.result()  # raises the request's APIError
        except APIError as e:
            self.status = e.status
            e.counted = True  # _close records it under the adapter that ran
            raise
        finally:
            gone.cancel()
            self._close()
        if self.chat:
            choices = [self._message(i, c) for i, c in enumerate(self.choices)]
        else:
            choices = [{"index": i, "text": self._echo(c) + c.text.text, "logprobs": self._logprobs(c),
                        "finish_reason": c.finish} for i, c in enumerate(self._best())]
        body = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.target.label, "choices": choices, "usage": self._usage()}
        return JSONResponse(body, headers=headers)

    def _best(self) -> list[_Choice]:
        """best_of: per prompt, the n candidates with the highest total log-prob (in run order)."""
        if self.per == self.body.n:
            return self.choices
        out = []
        for g in range(0, len(self.choices), self.per):
            group = self.choices[g:g + self.per]
            score = {id(c): sum(e[1] for e in c.lps) for c in group}
            keep = set(sorted(score, key=score.get, reverse=True)[: self.body.n])
            out += [c for c in group if id(c) in keep]
        return out

    def _message(self, i: int, c: _Choice) -> dict:
        """A chat choice; with tools, calls parsed out of the text into tool_calls."""
        content, calls = tools.parse(c.text.text, self.how)
        msg = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        return {"index": i, "message": msg, "logprobs": self._logprobs(c),
                "finish_reason": "tool_calls" if calls else c.finish}

    def _echo(self, c: _Choice) -> str:
        """The prompt's text in front of a completion (echo), once."""
        if not self.echo or c.echoed:
            return ""
        c.echoed = True
        return self.srv.tokenizer.decode(c.prompt, skip_special_tokens=True)

    def _logprobs(self, c: _Choice) -> dict | None:
        """The entries not yet sent, in the endpoint's shape (all of them for a JSON answer)."""
        if self.k is None:
            return None
        new, c.sent = c.lps[c.sent:], len(c.lps)
        tok = self.srv.tokenizer
        if self.chat:
            return {"content": logprobs.chat_shape(tok, new, self.srv.token_bytes), "refusal": None}
        ids = [e[0] for e in new]
        if c.plps is not None:  # echo: the prompt's entries first (once)
            new, ids, c.plps = c.plps + new, c.prompt + ids, None
        return logprobs.completion_shape(tok, new, ids)

    def _chunk(self, i: int, text: str | None, finish: str | None, role: bool = False) -> str:
        c = self.choices[i]
        lp = None if role else self._logprobs(c)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": self._echo(c) + (text or ""), "logprobs": lp, "finish_reason": finish}
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.target.label, "choices": [choice]}
        opts = self.body.stream_options
        if opts is not None and opts.continuous_usage_stats:  # vLLM's: usage so far in every chunk
            obj["usage"] = self._usage()
        return f"data: {json.dumps(obj)}\n\n"

    def _tool_chunk(self, i: int, text: str, finish: str | None) -> str | None:
        """With tools: content and `delta.tool_calls` pieces as the text grows (tools.ToolStream);
        the last chunk's finish_reason is "tool_calls" when the whole answer parses into calls."""
        c = self.choices[i]
        if c.tools is None:
            c.tools = tools.ToolStream(self.how)
        content, pieces = c.tools.push(text) if text else ("", [])
        if finish is not None:
            content += c.tools.finish()
            finish = "tool_calls" if tools.parse(c.text.text, self.how)[1] else finish
        if not (content or pieces or finish):
            return None
        delta = ({"content": content} if content else {}) | ({"tool_calls": pieces} if pieces else {})
        obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.target.label,
               "choices": [{"index": i, "delta": delta, "logprobs": self._logprobs(c), "finish_reason": finish}]}
        opts = self.body.stream_options
        if opts is not None and opts.continuous_usage_stats:
            obj["usage"] = self._usage()
        return f"data: {json.dumps(obj)}\n\n"

    async def sse(self):
        try:
            if self.chat:
                for i in range(len(self.choices)):
                    yield self._chunk(i, None, None, role=True)
            async for i, text, finish in self._events():
                if self.how != "none":  # with tools: calls stream as delta.tool_calls pieces
                    chunk = self._tool_chunk(i, text, finish)
                    if chunk:
                        yield chunk
                    continue
                if text:
                    yield self._chunk(i, text, None)
                if finish is not None:
                    yield self._chunk(i, None, finish)
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                       "created": self.created, "model": self.target.label, "choices": [], "usage": self._usage()}
                yield f"data: {json.dumps(obj)}\n\n"
        except APIError as e:  # headers are out: the error goes in the stream, as OpenAI does
            self.status = e.status
            yield f"data: {json.dumps(e.body())}\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.status = 499  # the client closed the stream
            raise
        finally:
            self._close()
        yield "data: [DONE]\n\n"

    def _close(self) -> None:
        """Cancel rows still running and record the request (once)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        for h in self.handles:
            if not h.cancelled and self.choices[h.tag].finish is None:
                h.cancel()
        firsts = [h.t_first for h in self.handles if h.t_first is not None]
        ok = self.status == 200
        self.srv.metrics.request_done(
            self.endpoint, self.target.label, self.status, self._usage()["prompt_tokens"] if ok else 0,
            sum(c.tokens for c in self.choices), time.perf_counter() - self.t0 if ok else None,
            (min(firsts) - self.t0) if firsts and ok else None, [g for c in self.choices for g in c.gaps] if ok else ())


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read by then, so the next ASGI message is that)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return
