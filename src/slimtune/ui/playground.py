"""The Try it tab: prompts to a running `slimtune serve`, an adapter (or an A/B route) beside the base.

The page never talks to the server itself (another origin): it asks this module, which talks only to
the one server `slimtune ui --serve URL` named (no address comes from the page, so the UI cannot be
used to reach anything else), with `--serve-key` as its bearer key. Greedy decoding (temperature 0),
so the same prompt gives the same answer as `slimtune generate --adapter`.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MAX_TOKENS = 256
TIMEOUT_S = 120


class PlaygroundError(ValueError):
    """No server configured, the server unreachable, or a request it refused (its message kept)."""


class Playground:
    def __init__(self, url: str | None, key: str | None = None) -> None:
        self.url = url.rstrip("/") if url else None
        self.key = key

    def _call(self, path: str, body: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        if self.url is None:
            raise PlaygroundError("no server to try: start one (`slimtune serve --model M --adapter NAME=RUN/best`) and "
                                  "give its address to `slimtune ui --serve http://127.0.0.1:8000`")
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers=h, method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
                return json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = e.reason
            raise PlaygroundError(f"the server at {self.url} answered {e.code}: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            raise PlaygroundError(f"cannot reach the server at {self.url} ({getattr(e, 'reason', e)}); is "
                                  "`slimtune serve` running there?") from None

    def models(self) -> dict[str, Any]:
        """The base, adapters and routes the server offers (from /v1/models)."""
        if self.url is None:
            return {"server": None, "models": []}
        cards, _ = self._call("/v1/models")
        out = []
        for c in cards.get("data", []):
            # a route's card carries its arms (for an admin key, or with no keys at all)
            kind = "base" if c.get("parent") is None else "route" if "route" in c else "adapter"
            out.append({"id": c["id"], "kind": kind, "parent": c.get("parent")})
        return {"server": self.url, "models": out}

    def _one(self, model: str, prompt: str, mode: str, max_tokens: int, user: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0}
        if user:
            body["user"] = user  # routes: the same user gets the same arm
        if mode == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            d, h = self._call("/v1/chat/completions", body)
            text = d["choices"][0]["message"]["content"]
        else:
            body["prompt"] = prompt
            d, h = self._call("/v1/completions", body)
            text = d["choices"][0]["text"]
        hl = {k.lower(): v for k, v in h.items()}
        return {"model": model, "text": text, "usage": d.get("usage"), "adapter": hl.get("x-slimtune-adapter"),
                "route": hl.get("x-slimtune-route")}

    def ask(self, body: dict[str, Any]) -> dict[str, Any]:
        """The chosen model's answer, and the base's beside it when asked (both at once)."""
        model, prompt = str(body.get("model") or ""), str(body.get("prompt") or "")
        mode = body.get("mode", "completion")
        if mode not in ("completion", "chat"):
            raise PlaygroundError(f"mode '{mode}': choose completion or chat")
        if not model or not prompt:
            raise PlaygroundError("choose a model and write a prompt")
        try:
            n = int(body.get("max_tokens") or 32)
        except (TypeError, ValueError):
            raise PlaygroundError(f"max_tokens '{body.get('max_tokens')}' is not a number") from None
        if not 1 <= n <= MAX_TOKENS:
            raise PlaygroundError(f"max_tokens {n}: give 1 to {MAX_TOKENS}")
        user = str(body["user"]) if body.get("user") else None
        names = [model]
        base = body.get("base")
        if base and base != model:
            names.append(str(base))
        with ThreadPoolExecutor(len(names)) as ex:  # the server batches them together
            answers = list(ex.map(lambda m: self._one(m, prompt, mode, n, user), names))
        return {"answers": answers}
