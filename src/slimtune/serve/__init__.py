"""`slimtune serve`: one base model serving many adapters over an OpenAI-compatible HTTP API.

    registry.py  adapters known / resident (LRU), lanes (one PeftModel per method), the mix probe
    engine.py    the scheduler thread: continuous batching across adapters over a KV cache
    handles.py   GenRequest in, Handle (events, cancel) out
    kvcache.py   row surgery on the cache (select, join with left padding, trim)
    prefix_cache.py  prompt-prefix KV per adapter, in hashed blocks
    sampling.py  greedy / temperature / top_p / top_k / min_p / penalties / logit_bias / seeds as tensor ops
    logprobs.py  log-probs of chosen and top tokens (and echoed prompts), OpenAI's shapes
    grammar.py   structured output: llguidance masks per row;  tools.py  tool calling
    fields.py    other clients' fields accepted where they change nothing;  paths.py  where API loads may read
    checks.py    a generation request's checks (prompts, limits, tools, response_format)
    text.py      prompts (chat template) and streamed text with stop strings
    tenants.py   keys.yaml: hashed keys, adapter/route globs, rate limits, admin
    routes.py    A/B routes, sticky per user
    schemas.py   OpenAI request bodies;  errors.py  OpenAI error bodies, body-size limit
    generation.py  the two generation endpoints;  app.py  the FastAPI app;  metrics.py  Prometheus
    server.py    assemble and run (uvicorn)
"""
_EXPORTS = {"Engine": "engine", "GenRequest": "engine", "Registry": "registry", "ServeConfig": "config",
            "ServeError": "server", "Server": "app", "build_app": "app", "make_server": "server"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Lazy: `slimtune --help` imports the CLI module, which must not pull in FastAPI."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
