"""The HTTP surface: FastAPI routes over one `Server` (registry + engine + tenants + routes + metrics).

    GET  /health                      no key needed
    GET  /metrics                     Prometheus text (an admin key when --keys is set)
    GET  /v1/models, /v1/models/{id}  the base, adapters and routes this key may use
    POST /v1/completions, /v1/chat/completions         (generation.py; a text base)
    POST /v1/audio/transcriptions                      (transcriptions.py; a speech base)
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter (vLLM's names and bodies; admin)
    GET  /v1/routes, PUT|DELETE /v1/routes/{name}      A/B routes (admin)

`build_app(server)` returns the ASGI app; its lifespan starts and stops the engine thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .config import ServeConfig
from .engine import Engine, EngineStopped
from .errors import APIError, BodyLimit, install, not_found
from .generation import handle
from .grammar import Grammars
from .logprobs import token_bytes
from .metrics import CONTENT_TYPE, CountResponses, Metrics
from .registry import AdapterError, AdapterExists, AdapterLoadError, AdapterNotFound, AdapterRefused, Registry
from .routes import RouteError, Router
from .speech import Transcriber, is_speech_base
from .schemas import ChatRequest, CompletionRequest, LoadLoraRequest, RouteBody, UnloadLoraRequest
from .tenants import OPEN, Tenant, Tenants
from .transcriptions import OPENAPI as TRANSCRIPTION_FORM
from .transcriptions import transcribe


@dataclass
class Server:
    """Everything one serving process holds."""

    registry: Registry
    tokenizer: object
    cfg: ServeConfig = field(default_factory=ServeConfig)
    tenants: Tenants | None = None  # None: no keys needed (loopback only, unless --insecure)
    router: Router = field(default_factory=Router)
    base_path: str | None = None
    kernel_line: str | None = None  # which path mixed decode steps take (server._lora_kernel), printed at start-up

    def __post_init__(self) -> None:
        base = self.registry.base
        self.base_name = self.registry.base_name
        # a speech base answers /v1/audio/transcriptions (speech.py), a text base the generation endpoints
        self.speech = (Transcriber(self.registry, self.tokenizer, self.cfg.max_tokens, self.cfg.max_audio_seconds)
                       if is_speech_base(base) else None)
        mcfg = getattr(base, "config", None)
        self.vocab_size = int(base.get_input_embeddings().num_embeddings) if self.speech is None else 0
        self.context = int(getattr(mcfg, "max_position_embeddings", None) or 2048)
        self.max_prompt_tokens = min(self.cfg.max_prompt_tokens, self.context - 1)
        # what /v1/models advertises: prompt + completion tokens a request can really have
        self.max_model_len = min(self.context, self.max_prompt_tokens + self.cfg.max_tokens)
        gen = getattr(base, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = getattr(mcfg, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        # `slimtune generate` is greedy unless told otherwise; a model whose generation_config samples
        # by default (do_sample: true) keeps its temperature / top_p as the server's defaults
        sample = bool(getattr(gen, "do_sample", False))
        self.default_temperature = float(getattr(gen, "temperature", 1.0) or 1.0) if sample else 0.0
        self.default_top_p = float(getattr(gen, "top_p", 1.0) or 1.0) if sample else 1.0
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)  # response_format (grammar.py)
        self.token_bytes = token_bytes(self.tokenizer)  # chat log-probs' `bytes` (logprobs.py)
        self.metrics = Metrics(self.registry)
        self.engine = Engine(self.registry, self.cfg, self.eos_ids, pad if pad is not None else (self.eos_ids or [0])[0],
                             self.metrics)
        self.metrics.watch_engine(self.engine)
        self.started = int(time.time())
        for name in list(self.router.all()):
            self.check_route(name, self.router.get(name))

    def check_route(self, name: str, arms: dict[str, float]) -> None:
        if name == self.base_name or self.registry.get(name) is not None:
            raise RouteError(f"route name '{name}' is already an adapter or the base model; pick another name")
        missing = [a for a in arms if a != self.base_name and self.registry.get(a) is None]
        if missing:
            raise RouteError(f"route '{name}': arm '{missing[0]}' is not a loaded adapter (or the base model "
                             f"'{self.base_name}'); load it first")
        # a key granted a route must be granted every arm of it: otherwise the route would answer
        # with an adapter the key's `adapters` globs exclude (checked at start-up and on every PUT)
        for t in self.tenants.tenants if self.tenants is not None else ():
            if t.may_use_route(name):
                out = [a for a in arms if not t.may_use_model(a)]
                if out:
                    raise RouteError(f"route '{name}': key '{t.name}' may use the route but not its arm '{out[0]}'; "
                                     f"add '{out[0]}' to that key's adapters, or take '{name}' out of its routes")


def build_app(srv: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv.engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, srv.engine.stop)

    app = FastAPI(title="slimtune serve", description="One base model, many adapters, OpenAI-compatible.",
                  version="0.1.0", lifespan=lifespan)
    install(app)
    app.add_middleware(BodyLimit, limit=srv.cfg.max_body_bytes,
                       paths={"/v1/audio/transcriptions": (srv.cfg.max_audio_bytes, "--max-audio-bytes")})
    app.add_middleware(CountResponses, metrics=srv.metrics, routes=app.routes)  # outermost: sees the 413s too

    def auth(authorization: str | None = Header(None, description="Bearer API key (with --keys)")) -> Tenant:
        if srv.tenants is None:
            return OPEN
        t = srv.tenants.authenticate(authorization)
        if t is None:
            raise APIError(401, "Incorrect API key provided. Send it as `Authorization: Bearer KEY`.",
                           code="invalid_api_key")
        wait = t.limiter.take() if t.limiter else 0.0
        if wait > 0:
            raise APIError(429, f"Rate limit reached for this key; retry in {wait:.1f} s.", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(math.ceil(wait), 1))})
        return t

    def admin(t: Tenant = Depends(auth)) -> Tenant:
        if not t.admin:
            raise APIError(403, "This needs an admin key (admin: true in keys.yaml).", code="admin_required")
        return t

    async def on_engine(fn):
        try:
            return await asyncio.wrap_future(srv.engine.call(fn))
        except EngineStopped:
            raise APIError(503, "The server is shutting down.", code="shutting_down") from None

    @app.get("/health")
    async def health():
        from ..kernels import lora_rows

        return {"status": "ok", "model": srv.base_name, "queue_depth": srv.engine.queue_depth(),
                "running": srv.engine.running(), "lora_kernel": lora_rows.state()["mode"]}

    @app.get("/metrics")
    async def metrics(t: Tenant = Depends(auth)):
        if srv.tenants is not None and not t.admin:
            raise APIError(403, "/metrics needs an admin key (it names every tenant's adapters).", code="admin_required")
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE)

    limits = ({"max_model_len": srv.max_model_len, "max_prompt_tokens": srv.max_prompt_tokens,
               "max_tokens": srv.cfg.max_tokens} if srv.speech is None else
              {"max_audio_seconds": srv.speech.max_seconds, "max_audio_bytes": srv.cfg.max_audio_bytes,
               "sampling_rate": srv.speech.rate})

    def model_cards(t: Tenant) -> list[dict]:
        cards = []
        if t.may_use_model(srv.base_name):
            cards.append({"id": srv.base_name, "object": "model", "created": srv.started, "owned_by": "slimtune",
                          "root": srv.base_path if t.admin else srv.base_name, "parent": None,
                          **limits})
        for e in srv.registry.list():
            if e.name != srv.base_name and t.may_use_model(e.name):
                cards.append({"id": e.name, "object": "model", "created": e.created, "owned_by": "slimtune",
                              "root": e.path if t.admin else e.name, "parent": srv.base_name,
                              **limits})
        for name, arms in sorted(srv.router.all().items()):
            if t.may_use_route(name):
                card = {"id": name, "object": "model", "created": srv.started, "owned_by": "slimtune",
                        "root": name, "parent": srv.base_name, **limits}
                if t.admin:
                    card["route"] = arms
                cards.append(card)
        return cards

    @app.get("/v1/models")
    async def list_models(t: Tenant = Depends(auth)):
        return {"object": "list", "data": model_cards(t)}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, t: Tenant = Depends(auth)):
        for card in model_cards(t):
            if card["id"] == model:
                return card
        raise not_found(model)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, t: Tenant = Depends(auth)):
        return await handle(srv, request, body, t)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request, t: Tenant = Depends(auth)):
        return await handle(srv, request, body, t)

    @app.post("/v1/audio/transcriptions", openapi_extra=TRANSCRIPTION_FORM,
              responses={200: {"description": "json / verbose_json: {text, ...}; text: the transcript"}})
    async def audio_transcriptions(request: Request, t: Tenant = Depends(auth)):
        return await transcribe(srv, request, t)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoraRequest, t: Tenant = Depends(admin)):
        name = body.lora_name
        if srv.router.get(name) is not None:
            raise APIError(400, f"'{name}' is the name of an A/B route; pick another adapter name.", "lora_name",
                           "name_taken")
        try:
            await on_engine(lambda: srv.registry.add(name, body.lora_path, "api"))
        except AdapterExists as e:
            raise APIError(400, str(e), "lora_name", "adapter_exists") from None
        except AdapterRefused as e:
            raise APIError(400, str(e), "lora_path", "adapter_path_refused") from None
        except AdapterLoadError as e:
            raise APIError(400, str(e), "lora_path", "adapter_load_failed") from None
        except AdapterError as e:
            raise APIError(400, str(e), "lora_name", "invalid_name") from None
        return f"Success: LoRA adapter '{name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoraRequest, t: Tenant = Depends(admin)):
        name = body.lora_name
        used = srv.router.using(name)
        if used:
            raise APIError(409, f"Adapter '{name}' is an arm of route '{used[0]}'; change or delete the route first.",
                           "lora_name", "adapter_in_route")
        try:
            await on_engine(lambda: srv.registry.remove(name))
        except AdapterNotFound:
            raise APIError(404, f"The adapter `{name}` is not loaded.", "lora_name", "model_not_found") from None
        return f"Success: LoRA adapter '{name}' removed successfully."

    @app.get("/v1/routes")
    async def list_routes(t: Tenant = Depends(admin)):
        return {"object": "list", "data": [{"id": n, "arms": a} for n, a in sorted(srv.router.all().items())]}

    @app.put("/v1/routes/{name}")
    async def put_route(name: str, body: RouteBody, t: Tenant = Depends(admin)):
        try:
            srv.registry.check_name(name)
            srv.check_route(name, body.arms)
            srv.router.set(name, body.arms)
        except (RouteError, AdapterError) as e:
            raise APIError(400, str(e).replace("adapter name", "route name"), "arms", "invalid_route") from None
        return {"id": name, "arms": srv.router.get(name)}

    @app.delete("/v1/routes/{name}")
    async def delete_route(name: str, t: Tenant = Depends(admin)):
        if not srv.router.delete(name):
            raise APIError(404, f"No route named `{name}`.", "name", "route_not_found")
        return JSONResponse({"id": name, "deleted": True})

    return app
