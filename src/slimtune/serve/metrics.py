"""Prometheus metrics (prometheus-client), one registry per app so several servers can live in
one process (tests). `model` is the adapter that answered (or the base model's name); A/B arms are
counted per route and arm.

    slimtune_responses_total{route,status,reason}       every HTTP response (CountResponses): reason is the
                                                        error's `code` (invalid_json, unknown_parameter, ...) or "ok"
    slimtune_requests_total{endpoint,model,status}      slimtune_route_requests_total{route,arm}
    slimtune_prompt_tokens_total{model}                 slimtune_generation_tokens_total{model}
    slimtune_request_latency_seconds{endpoint,model}    slimtune_time_to_first_token_seconds{model}
    slimtune_inter_token_latency_seconds{model}         time between a choice's tokens as the HTTP side gets them
    slimtune_queue_depth  slimtune_running_requests  slimtune_batch_rows  slimtune_batch_adapters  slimtune_step_seconds
    slimtune_prefill_rows                               rows per prefill forward (a wave gathered: one forward)
    slimtune_adapters_resident  slimtune_adapters_known  slimtune_adapter_loads_total  slimtune_adapter_evictions_total
    slimtune_prefill_tokens_total  slimtune_prefix_cache_hit_tokens_total
"""
from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)


class _RegistryCollector:
    """Adapter counts read from the adapter registry at scrape time."""

    def __init__(self, adapters) -> None:
        self.adapters = adapters

    def collect(self):
        loads = CounterMetricFamily("slimtune_adapter_loads", "adapters loaded into memory (first use and reloads)")
        loads.add_metric([], self.adapters.loads)
        ev = CounterMetricFamily("slimtune_adapter_evictions", "resident adapters evicted (least recently used)")
        ev.add_metric([], self.adapters.evictions)
        known = GaugeMetricFamily("slimtune_adapters_known", "adapters a request may name")
        known.add_metric([], len(self.adapters.list()))
        res = GaugeMetricFamily("slimtune_adapters_resident", "adapters in memory")
        res.add_metric([], self.adapters.resident_count())
        return [loads, ev, known, res]


class _PrefixCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        pc = self.engine.prefix
        hit = CounterMetricFamily("slimtune_prefix_cache_hit_tokens", "prompt tokens whose KV came from the prefix cache")
        hit.add_metric([], pc.hit_tokens)
        done = CounterMetricFamily("slimtune_prefill_tokens", "prompt tokens computed by prefill")
        done.add_metric([], pc.computed_tokens)
        return [hit, done]


class Metrics:
    def __init__(self, adapters=None) -> None:
        r = self.registry = CollectorRegistry()
        self.responses = Counter("slimtune_responses", "HTTP responses by route template, status and reason "
                                 "(the error code, or ok)", ["route", "status", "reason"], registry=r)
        self.requests = Counter("slimtune_requests", "HTTP requests answered", ["endpoint", "model", "status"], registry=r)
        self.route_requests = Counter("slimtune_route_requests", "requests per A/B route and arm", ["route", "arm"],
                                      registry=r)
        self.prompt_tokens = Counter("slimtune_prompt_tokens", "prompt tokens", ["model"], registry=r)
        self.generation_tokens = Counter("slimtune_generation_tokens", "generated tokens", ["model"], registry=r)
        self.latency = Histogram("slimtune_request_latency_seconds", "request latency, arrival to last token",
                                 ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("slimtune_time_to_first_token_seconds", "arrival to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("slimtune_inter_token_latency_seconds", "time between two tokens of one choice",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.queue_depth = Gauge("slimtune_queue_depth", "requests waiting for a batch slot", registry=r)
        self.running = Gauge("slimtune_running_requests", "rows in the running batches", registry=r)
        self.batch_rows = Histogram("slimtune_batch_rows", "rows decoded per engine step", buckets=ROW_BUCKETS, registry=r)
        self.batch_adapters = Histogram("slimtune_batch_adapters", "distinct adapters (base included) in one decode forward",
                                        buckets=(1, 2, 3, 4, 6, 8, 16, 32), registry=r)
        self.prefill_rows = Histogram("slimtune_prefill_rows", "rows prefilled by one forward (an idle server "
                                      "gathers a wave's requests into one: --admit-wait-ms)", buckets=ROW_BUCKETS,
                                      registry=r)
        self.step_seconds = Histogram("slimtune_step_seconds", "engine step time", buckets=STEP_BUCKETS, registry=r)
        if adapters is not None:
            r.register(_RegistryCollector(adapters))

    def watch_engine(self, engine) -> None:
        self.registry.register(_PrefixCollector(engine))

    def engine_step(self, rows: int, seconds: float | None, waiting: int, running: int, resident: int) -> None:
        """Called by the engine after each step (its thread)."""
        self.queue_depth.set(waiting)
        self.running.set(running)
        if seconds is not None:
            self.batch_rows.observe(rows)
            self.step_seconds.observe(seconds)

    def request_done(self, endpoint: str, model: str, status: int, prompt_tokens: int = 0, completion_tokens: int = 0,
                     latency: float | None = None, ttft: float | None = None, gaps: list[float] = ()) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.labels(model).inc(completion_tokens)
        if latency is not None:
            self.latency.labels(endpoint, model).observe(latency)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        if gaps:
            h = self.itl.labels(model)
            for g in gaps:
                h.observe(g)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountResponses:
    """ASGI middleware (outermost): counts every response by route template, status and reason.

    The reason is the `code` of the OpenAI error body (so a 400 says whether it was bad JSON, an
    unknown field or a bad value; 401, 413, 429 and 5xx alike), "ok" otherwise; an error sent
    inside an event stream (after the 200 went out) is counted by its code too. The route is the
    app's path template (`/v1/models/{model}`), "unmatched" for any other path, so clients cannot
    grow the label set."""

    def __init__(self, app, metrics: Metrics, routes) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope) -> str:
        from starlette.routing import Match

        for r in self.routes:
            if r.matches(scope)[0] == Match.FULL:
                return getattr(r, "path", "unmatched")
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"status": 0, "reason": None}

        async def counting_send(msg):
            if msg["type"] == "http.response.start":
                state["status"] = msg["status"]
            elif msg["type"] == "http.response.body" and state["reason"] is None:
                state["reason"] = _reason(state["status"], msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            status = state["status"] or 500
            reason = state["reason"] or ("ok" if status < 400 else f"http_{status}")
            self.metrics.responses.labels(self._route(scope), str(status), reason).inc()


def _reason(status: int, body: bytes) -> str | None:
    """The error code of an error body (or of an error event in a stream); None: not an error (yet)."""
    if status >= 400 or body.startswith(b'data: {"error"'):
        try:
            err = json.loads(body[6:] if body.startswith(b"data: ") else body)["error"]
            return str(err.get("code") or err.get("type") or status)
        except (ValueError, KeyError, TypeError, AttributeError):
            return "client_disconnected" if status == 400 and not body else f"http_{status}"
    return None
