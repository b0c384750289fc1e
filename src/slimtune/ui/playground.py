"""The Try it tab: prompts to a running `slimtune serve`, an adapter (or an A/B route) beside the base.

The page never talks to the server itself (another origin): it asks this module, which talks only to
the one server `slimtune ui --serve URL` named (no address comes from the page, so the UI cannot be
used to reach anything else), with `--serve-key` as its bearer key. Greedy decoding (temperature 0),
so the same prompt gives the same answer as `slimtune generate --adapter`.

A speech server (a base whose model cards carry `max_audio_seconds`) takes audio instead: the page
reads the chosen file and sends it here as base64 in its JSON POST (the page's POSTs stay JSON, same
origin), and this module posts it to the server's `/v1/audio/transcriptions` as OpenAI's multipart
form (`file`, `model`; httpx encodes it), temperature 0, the adapter's transcript beside the base's.
"""
from __future__ import annotations

import base64
import binascii
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MAX_TOKENS = 256
TIMEOUT_S = 120
MAX_AUDIO_BYTES = 25 << 20  # OpenAI's upload limit (the server has its own, --max-audio-bytes)


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

    def _form(self, path: str, fields: dict[str, str], name: str, data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
        """A multipart POST (one `file` part and the form fields) to the server; (JSON, headers)."""
        import httpx

        h = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        try:
            r = httpx.post(self.url + path, data=fields, files={"file": (name, data)}, headers=h, timeout=TIMEOUT_S)
        except httpx.HTTPError as e:
            raise PlaygroundError(f"cannot reach the server at {self.url} ({e}); is `slimtune serve` running "
                                  "there?") from None
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.reason_phrase
            raise PlaygroundError(f"the server at {self.url} answered {r.status_code}: {msg}")
        try:
            return r.json(), dict(r.headers)
        except ValueError:
            raise PlaygroundError(f"the server at {self.url} answered {path} with something that is not JSON") from None

    def models(self) -> dict[str, Any]:
        """The base, adapters and routes the server offers (from /v1/models)."""
        if self.url is None:
            return {"server": None, "models": []}
        cards, _ = self._call("/v1/models")
        out = []
        for c in cards.get("data", []):
            # a route's card carries its arms (for an admin key, or with no keys at all)
            kind = "base" if c.get("parent") is None else "route" if "route" in c else "adapter"
            # a speech base's cards carry its audio limits: it takes audio, not prompts
            out.append({"id": c["id"], "kind": kind, "parent": c.get("parent"), "audio": "max_audio_seconds" in c})
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

    def _heard(self, model: str, name: str, data: bytes) -> dict[str, Any]:
        if self.url is None:
            self._call("/v1/models")  # raises the no-server message
        d, h = self._form("/v1/audio/transcriptions", {"model": model, "response_format": "json", "temperature": "0"},
                          name, data)
        hl = {k.lower(): v for k, v in h.items()}
        return {"model": model, "text": d.get("text"), "adapter": hl.get("x-slimtune-adapter"),
                "route": hl.get("x-slimtune-route")}

    def transcribe(self, body: dict[str, Any]) -> dict[str, Any]:
        """The chosen speech model's transcript of the uploaded clip, and the base's beside it when asked."""
        model = str(body.get("model") or "")
        name = str(body.get("name") or "audio.wav")[-200:]
        if not model or not body.get("audio"):
            raise PlaygroundError("choose a model and an audio file (WAV, FLAC, OGG or MP3)")
        if len(str(body["audio"])) > MAX_AUDIO_BYTES * 4 // 3 + 4:
            raise PlaygroundError(f"the file is larger than {MAX_AUDIO_BYTES >> 20} MB; send a shorter clip")
        try:
            data = base64.b64decode(str(body["audio"]), validate=True)
        except (binascii.Error, ValueError):
            raise PlaygroundError("the audio did not arrive as base64 (the page sends the file that way)") from None
        names = [model]
        base = body.get("base")
        if base and base != model:
            names.append(str(base))
        with ThreadPoolExecutor(len(names)) as ex:
            answers = list(ex.map(lambda m: self._heard(m, name, data), names))
        return {"answers": answers}
